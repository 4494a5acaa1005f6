"""Peak memory of the label stage as the log grows: streaming must keep it flat.

For each log size, one `date=` partition of that many rows (one Ray Data execution) is labelled by
`pipeline.stages.label.label_days` with the demo teacher, in a fresh local Ray whose object store is
`ray.object_store_memory_mb` and whose Ray Data budget is `ray.data_memory_limit_mb`. A thread samples
the resident memory of the driver and every process under it (gcs_server, raylet, workers, the actor)
every 0.2 s; the peak sum is reported, with the proportional set size (shared pages split) beside it.

    .venv/bin/python bench/memory.py                                   # 5M and 20M rows, recorded (bench/results.py)
    .venv/bin/python bench/memory.py --string-ids --teacher student    # the same logs with text ids, recorded
    .venv/bin/python bench/memory.py --sizes 200000,400000 --no-append # smoke check
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import time

import common
import results as bench_results

MIB = 2**20
TARGET = "flat: peak memory does not grow with the log (4x the rows, 10x to 41x the object store)"


def label_with_sampling(rows: int, args) -> dict:
    """Labels a one-day log of `rows` rows; returns time, rows, peak memory and Ray's spill statistics."""
    import ray

    from pipeline.stages.label import label_days

    data_root, days = prepare_log(rows, args.string_ids)  # made already, in another process (see main)
    spec = common.bench_spec(data_root, days, common.DATA / "runs", ray={
        "object_store_memory_mb": args.object_store_mb, "data_memory_limit_mb": args.data_memory_limit_mb,
    }, label={"batch_size": args.batch_size, "actors": [1, 1], "cpus_per_actor": 1})
    log_bytes = _arrow_bytes(data_root, [spec.features.id, spec.features.label] + spec.features.input_columns())
    out = common.DATA / "memory-out"
    shutil.rmtree(out, ignore_errors=True)
    with common.RssSampler() as sampler:
        startup = common.start_ray(args.num_cpus, spec.ray.object_store_memory_mb, spec.ray.data_memory_limit_mb)
        try:
            from ray.data import DataContext

            context = DataContext.get_current()
            context.enable_progress_bars = False
            wiring = _pipeline_wiring(spec)
            if args.target_block_mb:  # an explicit size wins over the one the pipeline derives from its cap
                context.target_max_block_size = args.target_block_mb * MIB
            block_mib = context.target_max_block_size / MIB
            idle_rss = sampler.peak_rss
            started = time.perf_counter()
            labelled = label_days(spec, common.ensure_teacher(args.teacher), str(out), days)
            seconds = time.perf_counter() - started
            spill = _spill_lines(ray)
        finally:
            common.stop_ray()
    return {"rows": labelled.shard_set.total_rows, "log_mib": log_bytes / MIB, "seconds": seconds,
            "startup": startup, "peak_rss": sampler.peak_rss, "peak_pss": sampler.peak_pss, "idle_rss": idle_rss,
            "by_name": sampler.peak_by_name, "samples": sampler.samples, "spill": spill, "wiring": wiring,
            "block_mib": block_mib}


def prepare_log(rows: int, string_ids: bool):
    """The one-day log of `rows` rows (its ids as text with `string_ids`), made once and kept on disk."""
    data_root, days = common.click_log(rows, 1)
    if string_ids:  # the same rows with text ids, hashed by the pipeline in the read tasks
        features = common.bench_spec(data_root, days, common.DATA / "runs").features
        data_root = common.string_id_log(data_root, [features.id, *features.categorical], features.sequence.column)
    return data_root, days


def _prepare_logs(sizes: list[int], string_ids: bool) -> None:
    for rows in sizes:
        prepare_log(rows, string_ids)


def _arrow_bytes(root, columns: list[str]) -> int:
    """In-memory (Arrow) size of the log's labelled columns: one row group's bytes per row x all rows."""
    import pyarrow.parquet as pq

    files = sorted(root.rglob("*.parquet"))
    first = pq.ParquetFile(files[0])
    sample = first.read_row_group(0, columns=columns)
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return int(sample.nbytes / sample.num_rows * rows)


def _pipeline_wiring(spec) -> str:
    """Whether the pipeline's own `ray_session` helper applies `ray.data_memory_limit_mb` (checked, not assumed).

    `common.start_ray` has already applied the limit, so the stage runs capped either way."""
    from ray.data import DataContext

    from pipeline.runtime import limit_data_memory

    before = DataContext.get_current().execution_options.resource_limits
    limit_data_memory(spec.ray.data_memory_limit_mb)
    after = DataContext.get_current().execution_options.resource_limits
    return f"pipeline.runtime.limit_data_memory ran; Ray Data limits {before} -> {after}"


def _spill_lines(ray) -> str:
    """Ray's object-store summary lines about spilling and fallback allocation."""
    from ray._private.internal_api import memory_summary

    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    keep = [line.strip() for line in summary.splitlines() if "pill" in line or "allback" in line or "estor" in line]
    return "; ".join(keep) or "no spilling reported"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000000,20000000", help="log sizes in rows, comma-separated")
    parser.add_argument("--object-store-mb", type=int, default=75, help="ray.object_store_memory_mb (Ray's minimum)")
    parser.add_argument("--data-memory-limit-mb", type=int, default=48, help="ray.data_memory_limit_mb")
    parser.add_argument("--target-block-mb", type=int, default=0,
                        help="Ray Data's target_max_block_size (0: what the pipeline sets, 1/8 of the cap)")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--teacher", choices=("teacher", "student"), default="teacher",
                        help="the labelling model: the demo teacher, or the demo student's architecture (a "
                             "fast labeller, so Parquet reads and writes, not the model, set the pace)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--string-ids", action="store_true", help="the log's ids (row id, categorical ids, sequence "
                        "items) written as text, hashed by the pipeline; recorded as memory_string_ids")
    parser.add_argument("--no-append", action="store_true", help="print only; record nothing (bench/results/, RESULTS.md)")
    args = parser.parse_args()

    sizes = [int(s) for s in args.sizes.split(",")]
    # Made in a child process: the memory a conversion leaves in this process's allocator is not the stage's.
    maker = multiprocessing.get_context("spawn").Process(target=_prepare_logs, args=(sizes, args.string_ids))
    maker.start()
    maker.join()
    if maker.exitcode != 0:
        raise SystemExit(f"making the logs failed (exit code {maker.exitcode})")
    load_before = os.getloadavg()
    results = []
    for rows in sizes:
        result = label_with_sampling(rows, args)
        print(f"{rows:,} rows: {result}", flush=True)
        results.append(result)
    bench_results.publish(render(args, results, load_before, os.getloadavg()), dry_run=args.no_append)


def render(args, results: list[dict], load_before, load_after) -> dict:
    """The run as `bench_results.record`'s arguments: its figures, and its settings and table in Markdown."""
    rows = []
    for r in results:
        top = sorted(r["by_name"].items(), key=lambda kv: -kv[1])[:4]
        rows.append((f"{r['rows']:,}", f"{r['log_mib']:,.0f}", f"{r['log_mib'] / args.object_store_mb:.0f}x",
                     f"{r['seconds']:.0f}", f"{r['rows'] / r['seconds']:,.0f}", f"{r['idle_rss'] / MIB:,.0f}",
                     f"**{r['peak_rss'] / MIB:,.0f}**", f"{r['peak_pss'] / MIB:,.0f}",
                     ", ".join(f"{k} {v / MIB:,.0f}" for k, v in top)))
    machine = (f"{common.machine()}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
               "(1-minute; other agents shared the machine, so not guaranteed idle)")
    lines = [
        f"Settings: ray.object_store_memory_mb {args.object_store_mb}, ray.data_memory_limit_mb "
        f"{args.data_memory_limit_mb}, target_max_block_size in effect {results[0]['block_mib']:g} MiB; label batch "
        f"{args.batch_size}, labelling model: demo {args.teacher} (untrained), 1 actor x 1 CPU, Ray num_cpus {args.num_cpus}; "
        f"ids {'as text (sku-<hex>, hashed by the pipeline)' if args.string_ids else 'integers'}; each log is one date= partition "
        "(files of 1M rows); memory of the driver and all its descendant processes, sampled every 0.2 s "
        "(PSS every 2 s).",
        f"Limit wiring: {results[0]['wiring']}.",
        "",
        common.table(rows, ("rows", "log MiB (Arrow)", "log / object store", "label s", "rows/s",
                            "RSS after ray.init MiB", "peak RSS MiB", "peak PSS MiB", "largest at peak (RSS MiB)")),
        "",
        *[f"- {r['rows']:,} rows, object store: {r['spill']}" for r in results],
    ]
    name, title = ("memory_string_ids", "Label-stage peak memory vs log size, text ids") if args.string_ids else \
        ("memory", "Label-stage peak memory vs log size")
    return {"benchmark": name, "title": title, "command": common.command(),
            "machine": machine, "target": TARGET, "figures": {"runs": results}, "table_md": "\n".join(lines)}


if __name__ == "__main__":
    main()
