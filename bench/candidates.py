"""Distillation candidates in one pass: the wall time of one training call with 8 student candidates over
the time of the same call with one, on the same soft-label shards, in one local Ray this script starts.

The pass reads and collates each batch once and steps every candidate on it (`pipeline.train.train_pass`),
so the call's fixed cost (worker start-up, DeepSpeed set-up, Ray Data's first batch, checkpoints) is paid
once, and N candidates cost N models' compute, not N calls. Run in the order 1, 8, 1: the ratio divides
by the mean of the two single-candidate calls around it (the machine's speed drifts).

    .venv/bin/python bench/candidates.py              # the demo's shard size (300k rows), 2 epochs, recorded
    .venv/bin/python bench/candidates.py --rows 50000 --no-append   # smoke check
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import common
import results as bench_results

TARGET = "8 candidates in one pass take at most 3x the wall time of one candidate (whole call)"


def candidate_runs(spec, count: int, rows: int) -> list:
    """`count` distilled students of the spec's student, over the default search grid and then alphas."""
    from pipeline.spec.validation import DistillSearchSpec
    from pipeline.stages.students import candidate_role, student_run

    grid = DistillSearchSpec(alpha=[0.1, 0.3, 0.5, 0.7]).candidates()[:count]
    return [student_run(spec, candidate_role(c), rows, distill=spec.distill.model_copy(update=c)) for c in grid]


def timed_pass(files: list[str], spec, count: int, name: str, rows: int) -> dict:
    from pipeline.data.clicklogs import read_named_files
    from pipeline.train import TrainPass, train_pass

    columns = [spec.features.label, "teacher_logit"] + spec.features.input_columns()
    runs = candidate_runs(spec, count, rows)
    out = common.DATA / "candidate-runs"
    started = time.perf_counter()
    results = train_pass(TrainPass(name=name, runs=tuple(runs), dataset=read_named_files(files, None).select_columns(columns),
                                   run_dir=spec.run_dir, model_paths={r.role: str(out / f"{name}-{r.role}.pt") for r in runs}))
    seconds = time.perf_counter() - started
    epochs = next(iter(results.values())).history
    return {"candidates": count, "seconds": seconds, "loop_seconds": sum(e["seconds"] for e in epochs),
            "first_batch_seconds": epochs[0]["first_batch_seconds"], "rows": sum(e["rows"] for e in epochs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000, help="shard rows (the demo labels 300k)")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--no-append", action="store_true", help="print only; record nothing")
    args = parser.parse_args()
    load_before = os.getloadavg()
    files = common.soft_label_shards(args.rows)
    shutil.rmtree(common.DATA / "candidate-runs", ignore_errors=True)
    spec = common.bench_spec(common.DATA / "unused", [common.FIRST_DAY], common.DATA / "candidate-runs")
    common.start_ray(os.cpu_count())
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        runs = [timed_pass(files, spec, count, f"{i}-x{count}", args.rows)
                for i, count in enumerate([1, args.candidates, 1])]
    finally:
        common.stop_ray()
    for run in runs:
        print(run, flush=True)
    bench_results.publish(render(args, runs, load_before, os.getloadavg()), dry_run=args.no_append)


def render(args, runs: list[dict], load_before, load_after) -> dict:
    one = (runs[0]["seconds"] + runs[2]["seconds"]) / 2
    many = runs[1]
    ratio = many["seconds"] / one
    header = ("call", "candidates", "seconds (call)", "seconds in the loop", "first batch s", "fixed s (call - loop)")
    rows = [(f"#{i + 1}", r["candidates"], f"{r['seconds']:.1f}", f"{r['loop_seconds']:.1f}",
             f"{r['first_batch_seconds']:.1f}", f"{r['seconds'] - r['loop_seconds']:.1f}") for i, r in enumerate(runs)]
    verdict = "meets" if ratio <= 3 else "misses"
    table_md = "\n".join([
        f"The demo's student (MLP) and batch ({args.rows:,} shard rows, 2 epochs, 2 workers x 0.5 CPU, ZeRO 2); "
        "the candidates are the default `distill.search` grid (kd and mse, alphas, temperatures).", "",
        common.table(rows, header), "",
        f"**{args.candidates} candidates / 1 candidate: {ratio:.2f}x** the whole call's wall time ({verdict} the "
        f"3x target); the loop itself: {many['loop_seconds'] / ((runs[0]['loop_seconds'] + runs[2]['loop_seconds']) / 2):.2f}x."])
    return {"benchmark": "candidates", "title": "Distillation candidates in one pass", "command": common.command(),
            "machine": common.machine() + f"; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}",
            "target": TARGET, "figures": {"ratio": ratio, "runs": runs}, "table_md": table_md}


if __name__ == "__main__":
    main()
