"""Which default weight decay fits sparse ids: validation AUC of the student and the teacher at several
`train.weight_decay` values, on the quality benchmark's four data sets (bench/quality.py's specs).

AdamW's decay is decoupled and scaled by the learning rate: each step shrinks every weight, embedding rows
of ids the batch did not see included, by `lr * weight_decay`. Rare ids, whose rows get few gradient
steps, are pulled towards zero (the "unknown id" embedding) while frequent ones are held up by their
gradients. All the models of a data set train in one pass over its click logs (one call, one read), each
with its own weight decay, so the comparison shares batches, seed and epochs.

    .venv/bin/python bench/regularisation.py            # 4 data sets, recorded
    .venv/bin/python bench/regularisation.py --quick    # small logs; prints only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

import common
import quality
import results as bench_results

from pipeline.models import ModelConfig
from pipeline.runtime import ray_session
from pipeline.stages.click_logs import ensure_click_logs
from pipeline.stages.profile import data_aware_spec
from pipeline.stages.students import kept_validation
from pipeline.stages.training import click_log_model, train_on_click_logs, training_records

DECAYS = (0.0, 0.1, 1.0)
RATES = (0.001, 0.003, 0.01, 0.03)  # the student's learning rate: train.lr's default is the first
TARGET = ("none, a measurement: it chooses the defaults of train.weight_decay and train.lr (the settings whose mean "
          "validation AUC rank over the data sets is best)")


def measure(dataset: str, scratch: Path, quick: bool) -> dict:
    """{role: {decay: validation AUC at the kept epoch}} for the student and the default teacher."""
    spec = quality.bench_spec(dataset, 0, scratch, quick, ["teacher.search=null"])
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"root": str(scratch / "regularisation")})})
    started = time.perf_counter()
    ensure_click_logs(spec)  # the demo world's log is generated on first use
    with ray_session(spec):
        spec = data_aware_spec(spec)
        planned = []
        for kind, section in (("student", spec.student), ("teacher", spec.teacher[0])):
            model = ModelConfig.from_section(section, spec.features.out_dim)
            for setting in settings(kind):
                train = spec.train.model_copy(update=dict(zip(("lr", "weight_decay"), setting)))
                planned.append(click_log_model(spec, role(kind, setting), model, train, extra={"setting": setting}))
        train_on_click_logs(spec, planned)
    records = training_records(spec.run_dir)
    scores = {kind: {name(s): kept_validation(records[role(kind, s)], "auc") for s in settings(kind)}
              for kind in ("student", "teacher")}
    return {"dataset": dataset, "scores": scores, "seconds": round(time.perf_counter() - started, 1)}


def settings(kind: str) -> list[tuple[float, float]]:
    """(lr, weight_decay) pairs: every pair for the student; the teacher at its default lr (its search's job)."""
    rates = RATES if kind == "student" else RATES[:1]
    return [(lr, decay) for lr in rates for decay in DECAYS]


def name(setting: tuple[float, float]) -> str:
    return f"lr {setting[0]:g}, wd {setting[1]:g}"


def role(kind: str, setting: tuple[float, float]) -> str:
    return f"{kind}-lr{setting[0]:g}-wd{setting[1]:g}"


def mean_ranks(results: list[dict]) -> dict[str, dict[str, float]]:
    """{role: {setting: mean rank over data sets}}, rank 1 the best validation AUC."""
    ranks = {}
    for kind in ("student", "teacher"):
        names = list(results[0]["scores"][kind])
        per_set = [np.argsort(np.argsort([-r["scores"][kind][n] for n in names])) + 1 for r in results]
        ranks[kind] = {n: float(np.mean([ranks_[i] for ranks_ in per_set])) for i, n in enumerate(names)}
    return ranks


def render(results: list[dict], argv: list[str], load_before) -> dict:
    ranks = mean_ranks(results)
    names = list(results[0]["scores"]["student"])
    rows = [[n, *(f"{r['scores']['student'][n]:.4f}" for r in results), f"{ranks['student'][n]:.2f}"] for n in names]
    teacher = list(results[0]["scores"]["teacher"])
    rows += [[f"teacher, {n}", *(f"{r['scores']['teacher'][n]:.4f}" for r in results), f"{ranks['teacher'][n]:.2f}"]
             for n in teacher]
    header = ["model, setting", *(f"{r['dataset']} ({r['seconds']:.0f} s)" for r in results), "mean rank"]
    lines = ["Validation AUC at each model's kept epoch (early stopping on validation, at most 3 epochs); one "
             f"training pass per data set trains all {len(names) + len(teacher)} models (student MLP with "
             "`hash_buckets: auto`, batch 512; the default DCN-v2 teacher at its default lr), seed 0, the quality "
             "benchmark's data and settings. Rank 1 is the best on a data set.", "",
             common.table(rows, header, left=1)]
    return {"benchmark": "regularisation", "title": "Default learning rate and weight decay for sparse ids (`bench/regularisation.py`)",
            "command": " ".join([".venv/bin/python", "bench/regularisation.py", *argv]),
            "machine": f"{common.machine()}; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}", "target": TARGET,
            "figures": {"results": results, "mean_ranks": ranks}, "table_md": "\n".join(lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(quality.DATASETS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scratch", default="/tmp/bench-quality")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()
    scratch = Path(args.scratch + ("-quick" if args.quick else ""))
    results = [measure(dataset, scratch, args.quick) for dataset in args.datasets.split(",")]
    for result in results:
        print(result, flush=True)
    argv = [a for a in sys.argv[1:] if a != "--no-append"]
    bench_results.publish(render(results, argv, load_before), dry_run=args.quick or args.no_append)


if __name__ == "__main__":
    main()
