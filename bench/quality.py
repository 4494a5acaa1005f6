"""Quality benchmark of record: teacher vs distilled vs hard-label student, with the settings the pipeline
chooses by itself, over seeds, on four click logs.

Every data set runs the same spec template (GENERIC): a Ray Tune teacher search over the default space,
`hash_buckets: auto` for the student, `distill.search: true` (the default grid of candidates, chosen on
validation), early stopping on validation. Only what describes the data differs (DATASETS: where it is,
its columns, how validation is held out). Nothing is tuned per data set. The data sets:

- demo: the demo world (pipeline/data/synthetic_world.py), 3 training days;
- marketplace: a second synthetic world with a differently built click model (bench/worlds.py);
- criteo: the public Criteo sample (../shared/data/criteo), train on one file, evaluate on the other;
- movielens: MovieLens ratings (../shared/data/movielens), rating >= 4, cut into time slices: train on the
  first four, validate on the fourth, evaluate on the fifth.

Each seed (`train.seed`; the data stay the same) runs the whole job (`pipeline.job.run_job`), then trains
hard-label students of the other student families (`fm`, a small `dcn_v2`) in one pass on the same click
logs, so the teacher is checked against every family. Records the run with `bench/results.py`.

    .venv/bin/python bench/quality.py                       # 3 seeds x 4 data sets
    .venv/bin/python bench/quality.py --seeds 0             # one seed (what fits a session on 2 cores)
    .venv/bin/python bench/quality.py --quick               # smoke check: small logs, 2 trials; prints only
    .venv/bin/python bench/quality.py --from-records /tmp/bench-quality/records-demo-marketplace-criteo-movielens.json
    .venv/bin/python bench/quality.py --pfd                 # privileged-feature distillation (below), 3 seeds

`--pfd`: privileged-feature distillation on the demo world with its privileged signal (`data.synthetic.privileged`:
`affinity_hint`, a noisy view of the hidden user-item affinity, in the log but not at serving). Per seed, two whole
jobs of the same GENERIC template on the same log: a plain teacher, and a privileged teacher that also reads
`affinity_hint` (`teacher.extra_features`); the students read only `features` in both. Reports the privileged
teacher against the plain one, and the students distilled from each against the hard-label student.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import common
import results as bench_results
import worlds

from pipeline.data.synthetic import PRIVILEGED_COLUMN
from pipeline.job import run_job
from pipeline.models import ModelConfig
from pipeline.runtime import ray_session
from pipeline.spec import JobSpec, apply_override, parse_spec
from pipeline.stages.scoring import evaluate_models
from pipeline.stages.training import click_log_model, train_on_click_logs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# The same settings on every data set: what a user gets who writes only the data and features sections.
GENERIC = {
    "teacher": {"search": {"trials": 4, "max_concurrent_trials": 1, "grace_epochs": 1, "time_budget_s": 1200}},
    "student": {"model": "mlp", "embedding_dim": 4, "hash_buckets": "auto", "hidden": [32]},
    "distill": {"search": True, "on_weak_teacher": "warn"},  # warn: a refused teacher is still measured here
    "label": {"batch_size": 8192, "actors": [1, 1]},
    "train": {"num_workers": 1, "cpus_per_worker": 1, "epochs": 3, "batch_size": 512,
              "early_stopping": {"metric": "auc", "patience": 1}},
    "ray": {"num_cpus": 2},
}
DEMO_FEATURES = {"label": "clicked", "id": "event_id", "group": "user_id",
                 "categorical": ["user_id", "item_id", "category_id", "hour", "device", "position"],
                 "dense": ["price", "user_activity", "item_popularity"],
                 "sequence": {"column": "hist_item_ids", "length": 10, "embedding_of": "item_id"}}
MARKETPLACE_FEATURES = {"label": "clicked", "id": "event_id", "group": "query_id",
                        "categorical": ["query_id", "shop_id", "product_id", "brand_id", "region", "weekday", "slot",
                                        "device"],
                        "dense": ["discount", "rating", "shipping_days"]}
CRITEO_FEATURES = {"label": "label", "id": "row_id", "group": None,
                   "categorical": [f"C{i}" for i in range(1, 27)], "dense": [f"I{i}" for i in range(1, 14)]}
MOVIELENS_FEATURES = {"label": "label", "id": "event_id", "group": "userId",
                      "categorical": ["userId", "movieId", "hour", "weekday"], "dense": []}
DATASETS = ("demo", "marketplace", "criteo", "movielens")
HARD_FAMILIES = {"hard_fm": {"model": "fm"}, "hard_dcn_v2": {"model": "dcn_v2", "hidden": [32], "cross_layers": 1}}
TITLE = "Quality of record: teacher vs distilled vs hard-label, settings chosen by the pipeline (`bench/quality.py`)"
TARGET = ("per data set, means over seeds: the teacher beats the best hard-label student of every family by >= 0.003 "
          "AUC; the distilled student beats the same-architecture hard-label student by >= 0.001 AUC; gap recovery "
          ">= 50%; and the student the run recommends is never below the hard-label one")


def data_section(dataset: str, scratch: Path, quick: bool) -> tuple[dict, dict]:
    """(data section, features section) of a data set; its files are prepared under `scratch/data`."""
    data_root = scratch / "data"
    if dataset == "demo":
        rows = 10_000 if quick else 40_000  # the demo's 100k a day would take ~3x as long a seed on 2 cores
        return ({"source": "synthetic", "path": str(data_root / f"demo-{rows}"),
                 "train_days": {"start": "2026-11-01", "end": "2026-11-03"},
                 "eval_days": {"start": "2026-11-04", "end": "2026-11-04"},
                 "synthetic": {"rows_per_day": rows, "users": 5000, "items": 20000, "categories": 50, "seq_len": 10,
                               "seed": 7},
                 "validation": {"fraction": 0.1}}, DEMO_FEATURES)
    if dataset == "marketplace":
        partitions = worlds.marketplace_world(data_root, rows_per_day=10_000 if quick else 40_000)
        return _partitioned(partitions, train=3, validation={"fraction": 0.1}), MARKETPLACE_FEATURES
    if dataset == "criteo":
        partitions = worlds.criteo_with_ids(data_root, SHARED / "criteo" / "criteo_indexed_train.parquet",
                                            SHARED / "criteo" / "criteo_indexed_test.parquet")
        return _partitioned(partitions, train=1, validation={"fraction": 0.1}), CRITEO_FEATURES
    partitions = worlds.movielens_days(data_root, SHARED / "movielens" / "ml_latest_small_ratings.parquet")
    return _partitioned(partitions, train=4, validation={"days": 1}), MOVIELENS_FEATURES


def _partitioned(partitions: dict[str, str], train: int, validation: dict) -> dict:
    days = sorted(partitions)
    return {"source": "parquet", "partitions": partitions, "validation": validation,
            "train_days": {"start": days[0], "end": days[train - 1]},
            "eval_days": {"start": days[train], "end": days[train]}}


def bench_spec(dataset: str, seed: int, scratch: Path, quick: bool, overrides: list[str]) -> JobSpec:
    data, features = data_section(dataset, scratch, quick)
    raw = copy.deepcopy(GENERIC) | {"name": f"quality-{dataset}", "data": data, "features": copy.deepcopy(features),
                                    "output": {"root": str(scratch / "runs" / dataset / f"seed{seed}")}}
    raw["train"]["seed"] = seed
    if quick:
        raw["teacher"]["search"]["trials"] = 2
        raw["train"]["epochs"] = 2
    for override in overrides:
        apply_override(raw, override)
    return parse_spec(raw)


def hard_families(spec: JobSpec) -> dict[str, str]:
    """{name: path} of hard-label students of the other families, trained in one pass on the click logs."""
    student = spec.student.model_dump()
    planned = []
    for name, family in HARD_FAMILIES.items():
        section = spec.student.model_validate({**student, **family})
        planned.append(click_log_model(spec, name, ModelConfig.from_section(section, spec.features.out_dim),
                                       spec.train, extra={"family": name}))
    return train_on_click_logs(spec, planned)


def run_seed(dataset: str, seed: int, scratch: Path, quick: bool, overrides: list[str]) -> dict:
    """One seed: the whole job, then the other hard-label families, all scored on the eval days."""
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    spec = bench_spec(dataset, seed, scratch, quick, overrides)
    metrics = run_job(spec)
    with ray_session(spec):
        from pipeline.stages.profile import data_aware_spec

        resolved = data_aware_spec(spec)  # the student's hash_buckets as the job resolved them (profile reused)
        paths = hard_families(resolved)
        scored = evaluate_models(resolved, paths, roles={name: "hard" for name in paths})
    models = {name: {k: m[k] for k in ("auc", "log_loss", "params") if k in m}
              for name, m in (metrics["models"] | scored["models"]).items()}
    trials = Path(spec.run_dir, "search", "trials.json")
    return {"dataset": dataset, "seed": seed, "run_dir": spec.run_dir, "overrides": overrides,
            "rows": metrics["eval"]["rows"], "positives": metrics["eval"].get("positives"),
            "ceiling_auc": metrics["eval"].get("ceiling_auc"), "summary": metrics["summary"],
            "selection": metrics["selection"], "models": models,
            "search": json.loads(trials.read_text()) if trials.exists() else None,
            "job_seconds": metrics["wall_seconds"], "seconds": round(time.perf_counter() - started, 1),
            "load_avg": [load_at_start, os.getloadavg()[0]]}


# --- aggregation and the Markdown section ------------------------------------------------------------

def auc(record: dict, model: str) -> float:
    return record["models"][model]["auc"]


def recommended_auc(record: dict) -> float:
    return auc(record, record["selection"]["recommended"])


def mean_std(values: list[float], digits: int = 4) -> str:
    values = np.asarray(values, dtype=float)
    std = f"{values.std(ddof=1):.{digits}f}" if len(values) > 1 else "-"
    return f"{values.mean():.{digits}f} ± {std}"


def numbers(records: list[dict]) -> dict:
    """Means over seeds of what the targets are made of."""
    mean = lambda f: float(np.mean([f(r) for r in records]))  # noqa: E731
    teacher, distilled, hard = (mean(lambda r, m=m: auc(r, m)) for m in ("teacher", "student_distilled", "student_hard"))
    best_hard = mean(lambda r: max(auc(r, m) for m in ("student_hard", *HARD_FAMILIES)))
    return {"teacher": teacher, "distilled": distilled, "hard": hard, "best_hard": best_hard,
            "recommended": mean(recommended_auc), "teacher_lead": teacher - best_hard, "gain": distilled - hard,
            "recovery": (distilled - hard) / (teacher - hard) if teacher > hard else None,
            "recommended_minus_hard": mean(lambda r: recommended_auc(r) - auc(r, "student_hard"))}


def target_rows(n: dict) -> list[list[str]]:
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    recovery = "n/a (teacher <= hard-label)" if n["recovery"] is None else f"{100 * n['recovery']:.0f}%"
    return [["teacher - best hard-label of every family >= 0.003", f"{n['teacher_lead']:+.4f}",
             met(n["teacher_lead"] >= 0.003)],
            ["distilled - hard-label (same architecture) >= 0.001", f"{n['gain']:+.4f}", met(n["gain"] >= 0.001)],
            ["gap recovery >= 50%", recovery, met((n["recovery"] or -1) >= 0.5)],
            ["recommended student - hard-label >= 0 (never worse than plain)", f"{n['recommended_minus_hard']:+.4f}",
             met(n["recommended_minus_hard"] >= -1e-12)]]


def seed_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        summary, selection = r["summary"], r["selection"]
        ci = summary.get("distilled_minus_hard_ci")
        gate = selection.get("gate") or {}
        best_trial = next((t for t in (r["search"] or {}).get("trials", []) if t["trial"] == r["search"]["best"]), None)
        chosen = next((c["role"].removeprefix("student_distilled-") for c in selection.get("candidates", [])
                       if c["chosen"]), "-")
        rows.append([r["seed"], f"{auc(r, 'teacher'):.4f}", f"{auc(r, 'student_distilled'):.4f}",
                     f"{auc(r, 'student_hard'):.4f}", f"{auc(r, 'hard_fm'):.4f}", f"{auc(r, 'hard_dcn_v2'):.4f}",
                     f"{summary['distilled_minus_hard']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""),
                     summary.get("gap_recovery_reason") or (f"{100 * summary['gap_recovery']:.0f}%"
                                                            if summary.get("gap_recovery") is not None else "-"),
                     f"{gate.get('lift', float('nan')):+.4f} ({'passed' if gate.get('passed') else 'refused'})",
                     chosen, selection["recommended"].removeprefix("student_"),
                     _trial_text(best_trial), f"{r['seconds'] / 60:.1f}"])
    return rows


def _trial_text(trial: dict | None) -> str:
    if trial is None:
        return "-"
    config = trial["config"]
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in config.items())


def dataset_section(dataset: str, records: list[dict]) -> list[str]:
    n, first = numbers(records), records[0]
    lines = [f"### {dataset}: seeds {[r['seed'] for r in records]}, {first['rows']:,} eval rows"
             + (f", {first['positives']:,} positives" if first.get("positives") else "")
             + (f", ceiling AUC {first['ceiling_auc']:.4f}" if first.get("ceiling_auc") else ""), ""]
    models = [("teacher (searched)", "teacher"), ("distilled student (chosen on validation)", "student_distilled"),
              ("hard-label student (same architecture)", "student_hard"), ("hard-label fm", "hard_fm"),
              ("hard-label dcn_v2", "hard_dcn_v2")]
    rows = [[label, f"{first['models'][m]['params']['total']:,}", mean_std([auc(r, m) for r in records]),
             mean_std([r["models"][m]["log_loss"] for r in records])] for label, m in models]
    rows.append(["recommended student (better on validation)", "-", mean_std([recommended_auc(r) for r in records]), "-"])
    lines += common.table(rows, ["model", "params", "AUC mean ± std", "log-loss mean ± std"], left=1).splitlines()
    lines += ["", "Per seed (AUC on the eval day; distilled - hard with its paired-bootstrap 95% CI):", ""]
    lines += common.table(seed_rows(records), ["seed", "teacher", "distilled", "hard", "hard fm", "hard dcn_v2",
                                                "distilled - hard", "gap recovery", "gate lift (validation)",
                                                "chosen candidate", "recommended", "best teacher trial",
                                                "minutes"]).splitlines()
    lines += ["", *common.table(target_rows(n), ["target (means over seeds)", "value", ""], left=1).splitlines(), ""]
    return lines


def machine_line(records: list[dict]) -> str:
    import ray
    import torch

    loads = [load for r in records for load in r.get("load_avg", [])]
    return (f"{os.cpu_count()} cores, no GPU; 1-minute load average {min(loads):.1f} to {max(loads):.1f} at the "
            f"seeds' starts and ends; Python {platform.python_version()}, torch {torch.__version__}, "
            f"Ray {ray.__version__}")


def render(records: list[dict], argv: list[str]) -> dict:
    minutes = sum(r["seconds"] for r in records) / 60
    lines = [f"Time: {minutes:.0f} min, summed over the seeds' runs. One spec template for every data set "
             f"(`GENERIC` in bench/quality.py: teacher search of {GENERIC['teacher']['search']['trials']} trials over "
             "the default space, student MLP with `hash_buckets: auto`, `distill.search: true`, early stopping); "
             "each seed sets `train.seed`. AUC on the held-out eval day; std is over seeds.", ""]
    for dataset in DATASETS:
        chosen = [r for r in records if r["dataset"] == dataset]
        if chosen:
            lines += dataset_section(dataset, chosen)
    return {"benchmark": "quality", "title": TITLE, "command": " ".join([".venv/bin/python", "bench/quality.py", *argv]),
            "machine": machine_line(records), "target": TARGET, "figures": {"records": records},
            "table_md": "\n".join(lines)}


# --- privileged-feature distillation (--pfd) -----------------------------------------------------------

PFD_TITLE = ("Privileged-feature distillation: a teacher with a teacher-only column vs a plain teacher, settings "
             "chosen by the pipeline (`bench/quality.py --pfd`)")
PFD_TARGET = ("means over seeds, demo world with its privileged signal: the student distilled from the privileged "
              "teacher beats the hard-label student by >= 0.003 AUC, and the student distilled from the plain "
              "teacher by >= 0.002 AUC")
PFD_KINDS = ("plain", "privileged")


def pfd_spec(seed: int, scratch: Path, quick: bool, overrides: list[str], kind: str) -> JobSpec:
    """The demo data set with the privileged column in its log (its own path: the plain demo log stays cached);
    the privileged teacher reads it, the plain one and every student do not."""
    data, _ = data_section("demo", scratch, quick)
    extra = [f"name=quality-pfd-{kind}", f"data.path={data['path']}-privileged", "data.synthetic.privileged=true"]
    if kind == "privileged":
        extra.append(f"teacher.extra_features={{dense: [{PRIVILEGED_COLUMN}]}}")
    return bench_spec("demo", seed, scratch, quick, [*extra, *overrides])


def run_pfd_seed(seed: int, scratch: Path, quick: bool, overrides: list[str]) -> dict:
    """One seed: the plain-teacher job and the privileged-teacher job, on the same log and fit rows."""
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    runs = {}
    for kind in PFD_KINDS:
        spec = pfd_spec(seed, scratch, quick, overrides, kind)
        metrics = run_job(spec)
        trials = Path(spec.run_dir, "search", "trials.json")
        runs[kind] = {"run_dir": spec.run_dir, "summary": metrics["summary"], "selection": metrics["selection"],
                      "models": {name: {k: m[k] for k in ("auc", "log_loss", "params") if k in m}
                                 for name, m in metrics["models"].items()},
                      "search": json.loads(trials.read_text()) if trials.exists() else None,
                      "job_seconds": metrics["wall_seconds"], "eval": metrics["eval"]}
    evaluation = runs["plain"].pop("eval")
    runs["privileged"].pop("eval")
    return {"dataset": "demo-privileged", "seed": seed, "overrides": overrides, "rows": evaluation["rows"],
            "positives": evaluation.get("positives"), "ceiling_auc": evaluation.get("ceiling_auc"), "runs": runs,
            "seconds": round(time.perf_counter() - started, 1), "load_avg": [load_at_start, os.getloadavg()[0]]}


def pfd_auc(record: dict, kind: str, model: str) -> float:
    return record["runs"][kind]["models"][model]["auc"]


def pfd_numbers(records: list[dict]) -> dict:
    """Means over seeds: each teacher, the student distilled from each, the hard-label student (plain run's)."""
    mean = lambda kind, model: float(np.mean([pfd_auc(r, kind, model) for r in records]))  # noqa: E731
    n = {f"{model}_{kind}": mean(kind, model) for kind in PFD_KINDS for model in ("teacher", "student_distilled")}
    n["hard"] = mean("plain", "student_hard")
    n["gain_over_hard"] = n["student_distilled_privileged"] - n["hard"]
    n["gain_over_plain"] = n["student_distilled_privileged"] - n["student_distilled_plain"]
    return n


def pfd_seed_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        plain, privileged = r["runs"]["plain"], r["runs"]["privileged"]
        ci = privileged["summary"].get("distilled_minus_hard_ci")
        lift = lambda run: f"{(run['selection'].get('gate') or {}).get('lift', float('nan')):+.4f}"  # noqa: E731
        rows.append([r["seed"], f"{pfd_auc(r, 'plain', 'teacher'):.4f}", f"{pfd_auc(r, 'privileged', 'teacher'):.4f}",
                     f"{pfd_auc(r, 'plain', 'student_distilled'):.4f}",
                     f"{pfd_auc(r, 'privileged', 'student_distilled'):.4f}",
                     f"{pfd_auc(r, 'plain', 'student_hard'):.4f} / {pfd_auc(r, 'privileged', 'student_hard'):.4f}",
                     f"{pfd_auc(r, 'privileged', 'student_distilled') - pfd_auc(r, 'plain', 'student_hard'):+.4f}"
                     + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""),
                     f"{pfd_auc(r, 'privileged', 'student_distilled') - pfd_auc(r, 'plain', 'student_distilled'):+.4f}",
                     f"{lift(plain)} / {lift(privileged)}",
                     privileged["selection"]["recommended"].removeprefix("student_"), f"{r['seconds'] / 60:.1f}"])
    return rows


def render_pfd(records: list[dict], argv: list[str]) -> dict:
    n, first = pfd_numbers(records), records[0]
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    minutes = sum(r["seconds"] for r in records) / 60
    lines = [f"Time: {minutes:.0f} min, summed over the seeds (two jobs a seed). The demo world "
             f"(`data.synthetic.privileged: true`, {first['rows']:,} eval rows, {first['positives']:,} positives, "
             f"ceiling AUC {first['ceiling_auc']:.4f}): `{PRIVILEGED_COLUMN}` is the hidden user-item affinity "
             "(0.55 x affinity in the click logit) plus N(0, 0.6^2) noise, in the log but not at serving. Both jobs "
             "run the GENERIC template (teacher search, `distill.search: true`, early stopping) on the same log; the "
             f"privileged one adds `teacher.extra_features: {{dense: [{PRIVILEGED_COLUMN}]}}`. The students read "
             "`features` only. AUC on the held-out eval day; std is over seeds.", ""]
    rows = [[label, mean_std([pfd_auc(r, kind, model) for r in records])] for label, kind, model in (
        ("plain teacher (searched)", "plain", "teacher"), ("privileged teacher (searched)", "privileged", "teacher"),
        ("student distilled from the plain teacher", "plain", "student_distilled"),
        ("student distilled from the privileged teacher", "privileged", "student_distilled"),
        ("hard-label student (plain job's)", "plain", "student_hard"))]
    lines += common.table(rows, ["model", "AUC mean ± std"], left=1).splitlines()
    lines += ["", "Per seed (distilled from privileged - hard with the privileged run's paired-bootstrap 95% CI; "
              "hard: the plain / the privileged job's own, the same model trained twice):", ""]
    lines += common.table(pfd_seed_rows(records), ["seed", "plain teacher", "privileged teacher", "distilled (plain)",
                                                   "distilled (privileged)", "hard", "privileged distilled - hard",
                                                   "privileged - plain distilled", "gate lift plain / privileged",
                                                   "recommended (privileged job)", "minutes"]).splitlines()
    targets = [["distilled from privileged - hard-label >= 0.003", f"{n['gain_over_hard']:+.4f}",
                met(n["gain_over_hard"] >= 0.003)],
               ["distilled from privileged - distilled from plain >= 0.002", f"{n['gain_over_plain']:+.4f}",
                met(n["gain_over_plain"] >= 0.002)],
               ["(privileged teacher - plain teacher)", f"{n['teacher_privileged'] - n['teacher_plain']:+.4f}", "-"]]
    lines += ["", *common.table(targets, ["target (means over seeds)", "value", ""], left=1).splitlines(), ""]
    command = " ".join([".venv/bin/python", "bench/quality.py", *argv])
    return {"benchmark": "quality_pfd", "title": PFD_TITLE, "command": command, "machine": machine_line(records),
            "target": PFD_TARGET, "figures": {"records": records, "means": n}, "table_md": "\n".join(lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="KEY=VALUE for every spec")
    parser.add_argument("--quick", action="store_true", help="1 seed, small logs, 2 trials; prints only")
    parser.add_argument("--scratch", default="/tmp/bench-quality")
    parser.add_argument("--from-records", help="records-*.json of earlier runs (comma-separated): render and record only")
    parser.add_argument("--no-append", action="store_true", help="print only; record nothing")
    parser.add_argument("--pfd", action="store_true", help="privileged vs plain teacher on the demo world (see above)")
    args = parser.parse_args()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    scratch = Path(args.scratch + ("-quick" if args.quick else ""))
    scratch.mkdir(parents=True, exist_ok=True)
    records = []
    if args.from_records:
        records = [r for path in args.from_records.split(",") for r in json.loads(Path(path).read_text())]
    progress = scratch / ("records-pfd.json" if args.pfd else f"records-{args.datasets.replace(',', '-')}.json")
    for seed in [] if args.from_records else seeds:  # seed-major: an interrupted run still covers every data set
        for dataset in ["demo-privileged"] if args.pfd else args.datasets.split(","):
            records.append(run_pfd_seed(seed, scratch, args.quick, args.overrides) if args.pfd
                           else run_seed(dataset, seed, scratch, args.quick, args.overrides))
            progress.write_text(json.dumps(records, indent=1, default=str))
    argv = [a for a in sys.argv[1:] if a != "--no-append" and not a.startswith("--from-records")]
    rendered = render_pfd(records, argv) if args.pfd else render(records, argv)
    bench_results.publish(rendered, dry_run=args.quick or args.no_append)


if __name__ == "__main__":
    main()
