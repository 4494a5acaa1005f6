"""Can the demo's students leave the click history to the teacher? `jobs/demo.yaml` (every model reads the history)
against `jobs/demo_pfd.yaml` (only the teacher does: `teacher.extra_features`), each job whole and unchanged, on
the same synthetic world, for several worlds (`data.synthetic.seed`; 7 is the demo's own).

`--data movielens`: the same two jobs' model, distillation, training and evaluation sections on real behaviour: the
MovieLens ratings (../shared/data) in five time slices (`bench/worlds.py`: train on three, validate on the fourth,
evaluate on the fifth; rating >= 4 is the label), with each user's previous 10 rated movies as the history; the
seeds are `train.seed`. Recorded as its own benchmark (`student_history_movielens`).

Per world and job: the validation and eval-day AUC of the teacher, the distilled and the hard-label student, and
what the job recommends. Then the two shipped students against each other on the eval day: each job's exported
ONNX student scores the eval-day log with `distill score`'s code (`pipeline.serving.score_log`), and a paired
bootstrap over those rows gives the history-free student's AUC minus the demo student's, with its 95% interval.
The speed side of the same question is `bench/serving.py`'s.

    .venv/bin/python bench/student_history.py                 # worlds 7, 11, 23; recorded (bench/results.py)
    .venv/bin/python bench/student_history.py --seeds 7 --no-append
    .venv/bin/python bench/student_history.py --data movielens     # seeds 0, 1, 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import common
import results as bench_results
import worlds
from pipeline.metrics import auc
from pipeline.job import run_job
from pipeline.serving import score_log
from pipeline.spec import JobSpec, load_spec, parse_spec
from pipeline.verdict import paired_bootstrap

JOBS = {"demo": common.ROOT / "jobs" / "demo.yaml", "demo_pfd": common.ROOT / "jobs" / "demo_pfd.yaml"}
MODELS = ("teacher", "student_distilled", "student_hard")
BOOTSTRAP_ROUNDS = 1000
MOVIELENS_HISTORY = {"column": "hist_movie_ids", "length": 10, "embedding_of": "movieId"}
MOVIELENS_FEATURES = {"label": "label", "id": "event_id", "group": "userId",
                      "categorical": ["userId", "movieId", "hour", "weekday"], "dense": []}
TITLES = {"demo": "The demo's students without the click history: `jobs/demo.yaml` vs `jobs/demo_pfd.yaml` "
                  "(`bench/student_history.py`)",
          "movielens": "Students without the history on real behaviour: MovieLens with each user's previous movies, "
                       "the demo jobs' settings (`bench/student_history.py --data movielens`)"}
TARGET = ("none, a measurement: whether the history-free student (demo_pfd) ships a student as good as the demo's, "
          "on validation and on the eval day")


def demo_jobs(seed: int, scratch: Path) -> dict[str, JobSpec]:
    """The two shipped jobs, unchanged but for the world (`data.synthetic.seed`) and where they write."""
    return {name: load_spec(path, [f"name={name}-world{seed}", f"data.synthetic.seed={seed}",
                                   f"data.path={scratch / f'world{seed}'}", f"output.root={scratch / 'runs'}"])
            for name, path in JOBS.items()}


def movielens_jobs(seed: int, scratch: Path) -> dict[str, JobSpec]:
    """The two shipped jobs' sections but `data` and `features`, on MovieLens with the history; `train.seed`."""
    partitions = worlds.movielens_days(scratch / "data", common.ROOT.parent / "shared" / "data" / "movielens" /
                                       "ml_latest_small_ratings.parquet", history=MOVIELENS_HISTORY["length"])
    days = sorted(partitions)
    data = {"source": "parquet", "partitions": partitions, "validation": {"days": 1},
            "train_days": {"start": days[0], "end": days[3]}, "eval_days": {"start": days[4], "end": days[4]}}
    jobs = {}
    for name in JOBS:
        raw = common.job_yaml("demo")
        raw |= {"name": f"{name}-movielens-seed{seed}", "data": data, "output": {"root": str(scratch / "runs")},
                "features": MOVIELENS_FEATURES | ({"sequence": MOVIELENS_HISTORY} if name == "demo" else {})}
        raw["train"]["seed"] = seed
        raw["distill"]["on_weak_teacher"] = "warn"  # measured either way; the report says whether the gate passed
        if name == "demo_pfd":
            raw["teacher"]["extra_features"] = {"sequence": MOVIELENS_HISTORY}
        jobs[name] = parse_spec(raw, source=f"{name} on movielens")
    return jobs


def eval_logs(spec: JobSpec, days: list[str]) -> list[str]:
    """The log files or `date=` folders of the eval days, as the job read them."""
    if spec.data.partitions:
        partitions = {str(day): path for day, path in spec.data.partitions.items()}
        return [partitions[day] for day in days]
    return [str(Path(spec.data.path) / f"date={day}") for day in days]


def run_seed(data_set: str, seed: int, scratch: Path) -> dict:
    """Both jobs on one world or seed, and their shipped students on the same eval rows."""
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    jobs = {}
    specs = (demo_jobs if data_set == "demo" else movielens_jobs)(seed, scratch)
    for name, spec in specs.items():
        metrics = run_job(spec)
        jobs[name] = {"run_dir": spec.run_dir, "eval_logs": eval_logs(spec, [str(d) for d in metrics["eval"]["days"]]),
                      "recommended": metrics["export"]["recommended"],
                      "validation": {m: s["auc"] for m, s in metrics["selection"]["scores"].items()}
                      | {"teacher": metrics["selection"]["gate"]["teacher"]},
                      "eval": {m: metrics["models"][m]["auc"] for m in MODELS},
                      "distilled_minus_hard": metrics["summary"]["distilled_minus_hard"],
                      "distilled_minus_hard_ci": metrics["summary"]["distilled_minus_hard_ci"],
                      "gate": {k: metrics["selection"]["gate"][k] for k in ("lift", "passed")},
                      "job_seconds": metrics["wall_seconds"]}
    labels, logits = shipped_logits(jobs, specs["demo"].features.label, scratch / "scored" / f"{data_set}{seed}")
    bootstrap = paired_bootstrap(labels, logits, BOOTSTRAP_ROUNDS, pairs={"pfd_minus_demo": ("demo_pfd", "demo")})
    return {"data": data_set, "seed": seed, "jobs": jobs, "eval_rows": len(labels), "eval_positives": int(labels.sum()),
            "shipped_auc": {name: auc(labels, z) for name, z in logits.items()},
            "shipped_pfd_minus_demo_ci": bootstrap["differences"]["pfd_minus_demo"],
            "seconds": round(time.perf_counter() - started, 1), "load_avg": [load_at_start, os.getloadavg()[0]]}


def shipped_logits(jobs: dict, label: str, out: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(clicks, {job: logits}) of each job's recommended student, exported to ONNX, on the eval days' rows."""
    logits, labels = {}, None
    for name, job in jobs.items():
        model_dir = str(Path(job["run_dir"]) / "export" / job["recommended"] / "onnx")
        scored = []
        for index, log in enumerate(job["eval_logs"]):
            path = out / f"{name}-{index}.parquet"
            score_log(model_dir, log, str(path))
            scored.append(pq.read_table(path, columns=[label, "logit"]))
        clicks = np.concatenate([t[label].to_numpy() for t in scored]).astype(np.int64)
        if labels is not None and not np.array_equal(labels, clicks):
            raise RuntimeError("the two jobs scored different eval rows")
        labels, logits[name] = clicks, np.concatenate([t["logit"].to_numpy() for t in scored])
    return labels, logits


def render(data_set: str, records: list[dict], argv: str) -> dict:
    rows = []
    for r in records:
        demo, pfd = r["jobs"]["demo"], r["jobs"]["demo_pfd"]
        for name, job in (("demo", demo), ("demo_pfd", pfd)):
            rows.append([r["seed"], name, *(f"{job['validation'][m]:.4f} / {job['eval'][m]:.4f}" for m in MODELS),
                         f"{job['distilled_minus_hard']:+.4f} [{job['distilled_minus_hard_ci'][0]:+.4f}, "
                         f"{job['distilled_minus_hard_ci'][1]:+.4f}]",
                         f"{job['gate']['lift']:+.4f} ({'passed' if job['gate']['passed'] else 'failed'})",
                         job["recommended"], f"{job['job_seconds']:.0f}"])
    shipped = [[r["seed"], f"{r['shipped_auc']['demo']:.4f}", f"{r['shipped_auc']['demo_pfd']:.4f}",
                f"{r['shipped_auc']['demo_pfd'] - r['shipped_auc']['demo']:+.4f} "
                f"[{r['shipped_pfd_minus_demo_ci'][0]:+.4f}, {r['shipped_pfd_minus_demo_ci'][1]:+.4f}]",
                f"{r['jobs']['demo_pfd']['validation']['student_distilled'] - r['jobs']['demo']['validation']['student_distilled']:+.4f}",
                f"{r['eval_rows']:,} ({r['eval_positives']:,})"] for r in records]
    mean = lambda f: float(np.mean([f(r) for r in records]))  # noqa: E731
    shipped_diff = mean(lambda r: r["shipped_auc"]["demo_pfd"] - r["shipped_auc"]["demo"])
    validation_diff = mean(lambda r: r["jobs"]["demo_pfd"]["validation"]["student_distilled"]
                           - r["jobs"]["demo"]["validation"]["student_distilled"])
    settings = ("Both shipped jobs, whole and unchanged, per synthetic world (`data.synthetic.seed`; 7 is the demo's)"
                if data_set == "demo" else "The two jobs' settings on MovieLens (rating >= 4; each user's previous 10 "
                "movies as the history, in `features` for demo, in `teacher.extra_features` for demo_pfd; a teacher "
                "that fails the gate is reported, not refused: `distill.on_weak_teacher: warn`), per `train.seed`")
    lines = [
        f"{settings}; validation AUC / eval-day AUC per model. {BOOTSTRAP_ROUNDS} paired-bootstrap rounds.", "",
        common.table(rows, ["world" if data_set == "demo" else "seed", "job", "teacher", "distilled", "hard-label", "distilled - hard (eval, 95% CI)", "gate lift (validation)",
                            "recommended", "job s"], left=2), "",
        "The shipped (recommended, exported, calibrated) students on the same eval rows, scored by `distill score`'s "
        "code:", "",
        common.table(shipped, ["world" if data_set == "demo" else "seed", "demo student", "history-free student", "history-free - demo (95% CI)",
                               "same on validation (distilled)", "eval rows (clicks)"]), "",
        f"- Means over {len(records)} {'world' if data_set == 'demo' else 'seed'}(s): the history-free student minus the demo's, "
        f"**{shipped_diff:+.4f}** AUC on the eval day and **{validation_diff:+.4f}** on validation.",
    ]
    return {"benchmark": "student_history" + ("" if data_set == "demo" else f"_{data_set}"),
            "title": TITLES[data_set], "command": argv,
            "machine": f"{common.machine()}; load average at each pair's start and end "
                       f"{', '.join(f'{a:.2f}-{b:.2f}' for a, b in (r['load_avg'] for r in records))}",
            "target": TARGET, "figures": {"records": records, "mean_shipped_pfd_minus_demo": shipped_diff,
                                          "mean_validation_pfd_minus_demo": validation_diff},
            "table_md": "\n".join(lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(TITLES), default="demo")
    parser.add_argument("--seeds", help="synthetic worlds (data.synthetic.seed; default 7,11,23) or, with --data "
                        "movielens, train.seed (default 0,1,2)")
    parser.add_argument("--scratch", default="/tmp/bench-student-history")
    parser.add_argument("--no-append", action="store_true", help="print only; record nothing")
    args = parser.parse_args()
    scratch = Path(args.scratch)
    records = []
    seeds = args.seeds or ("7,11,23" if args.data == "demo" else "0,1,2")
    for seed in (int(s) for s in seeds.split(",")):
        records.append(run_seed(args.data, seed, scratch))
        (scratch / f"records-{args.data}.json").write_text(json.dumps(records, indent=1, default=str))
        print(json.dumps({k: records[-1][k] for k in ("seed", "shipped_auc", "shipped_pfd_minus_demo_ci")}),
              flush=True)
    bench_results.publish(render(args.data, records, common.command()), dry_run=args.no_append)


if __name__ == "__main__":
    main()
