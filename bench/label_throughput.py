"""Label-stage throughput: the pipeline's teacher actor pool against a bare single-process loop.

Same teacher (the demo's DCN-v2, untrained), same log, same batch size and torch thread count:
  (a) bare: pyarrow dataset batches -> table_to_inputs -> teacher -> pyarrow Parquet writer, one process;
      timed before and after the (b) runs, which the ratios divide by the rate over both;
  (a') the same loop while another process decodes the log on the other core with one thread;
  (b) pipeline: `pipeline.stages.label.label_days` (Ray Data read + row checks -> TeacherPredictor actor pool ->
      write_parquet -> manifests) inside a local Ray this script starts; Ray's start-up is timed separately,
      and the stage runs twice: right after `ray.init`, then again in the same Ray (as in a job).

    .venv/bin/python bench/label_throughput.py                  # 5M rows (one day, 5 files of 1M rows), recorded (bench/results.py)
    .venv/bin/python bench/label_throughput.py --string-ids     # the same log with text ids (hashed), recorded
    .venv/bin/python bench/label_throughput.py --runtime onnxruntime   # (b) runs the teacher's ONNX export; (a) stays eager
    .venv/bin/python bench/label_throughput.py --rows 200000 --no-append   # smoke check
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

import common
import results as bench_results
from pipeline.data.normalise import Normaliser

TARGET = "pipeline rows/s over the bare loop's (b/a) >= 0.8, after `ray.init`"
HASH_TARGET = "hashing the ids costs <= 10% of the teacher's time per row"
ORT_RUN = ", run in (b) by ONNX Runtime (label.runtime onnxruntime, its parity-checked export), in (a) by eager PyTorch"
ORT_TARGET = "pipeline rows/s with label.runtime onnxruntime over the eager bare loop's (b/a) >= 1.4, after `ray.init`"
TEXT_IDS = "; ids written as text (e.g. sku-4d2), hashed in the read and, in (a), by the same normalise()"
COSTS_TARGET = "none, a diagnostic: the per-core CPU costs `docs/SCALING.md` sizes a cluster with"


def bare_label(data_root, days, teacher: str, columns: list[str], out_dir, *, batch_size: int, threads: int,
               logit_dtype: str, shard_rows: int, plan=None) -> dict:
    """(a) One process, no Ray: read batches, run the teacher, write shards of about `shard_rows` rows.

    `plan`: a `Normaliser` (string ids): read and normalised as the pipeline's read does it (text ids as
    Parquet dictionaries, then `pipeline.data.normalise`), the normalising timed on its own as "hash"."""
    from pipeline.data.normalise import normalise
    from pipeline.features import table_to_inputs
    from pipeline.models import load_model

    torch.set_num_threads(threads)
    model, _, layout = load_model(teacher)
    seconds = {"read": 0.0, "hash": 0.0, "teacher": 0.0, "write": 0.0}
    rows = 0
    started, cpu = time.perf_counter(), time.process_time()
    for day in days:
        files = sorted(str(p) for p in (data_root / f"date={day.isoformat()}").glob("*.parquet"))
        batches = pads.dataset(files, format=_parquet_format(files[0], columns, plan)).to_batches(
            columns=columns, batch_size=batch_size)
        day_dir = out_dir / f"date={day.isoformat()}"
        day_dir.mkdir(parents=True)
        writer, in_file, part = None, 0, 0
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            t1 = time.perf_counter()
            seconds["read"] += t1 - t0
            if batch is None:
                break
            table = pa.Table.from_batches([batch])
            if plan is not None:
                table = normalise(table, plan)
                hashed = time.perf_counter()
                seconds["hash"] += hashed - t1
                t1 = hashed
            with torch.inference_mode():
                logits = model(table_to_inputs(table, layout)).float().numpy()  # (B,)
            table = table.append_column("teacher_logit", pa.array(logits.astype(logit_dtype)))
            t2 = time.perf_counter()
            seconds["teacher"] += t2 - t1
            if writer is None:
                writer = pq.ParquetWriter(day_dir / f"part-{part:05d}.parquet", table.schema)
            writer.write_table(table)
            in_file += table.num_rows
            if in_file >= shard_rows:
                writer.close()
                writer, in_file, part = None, 0, part + 1
            seconds["write"] += time.perf_counter() - t2
            rows += table.num_rows
        if writer is not None:
            writer.close()
    return {"rows": rows, "seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu, **seconds}


def _parquet_format(first_file: str, columns: list[str], plan) -> pads.ParquetFileFormat:
    """Parquet read as the pipeline reads it: with a `plan` (text ids), its text id columns as dictionaries."""
    from pipeline.data.formats import dictionary_paths

    if plan is None:
        return pads.ParquetFileFormat()
    paths = dictionary_paths(first_file, [c for c in plan.text_id_columns() if c in columns])
    return pads.ParquetFileFormat(read_options=pads.ParquetReadOptions(dictionary_columns=paths))


def stage_costs(data_root, teacher: str, columns: list[str], out_dir, *, batch_size: int, rows: int) -> dict:
    """CPU seconds per million rows of each step, run one after the other over the same `rows` rows and
    timed with `time.process_time` (this process's CPU time, all its threads; other load on the machine
    does not count): Parquet decode, Arrow -> tensors + forward (1 torch thread), Parquet write (snappy)."""
    from pipeline.features import table_to_inputs
    from pipeline.models import load_model

    torch.set_num_threads(1)
    model, _, layout = load_model(teacher)
    files = sorted(str(p) for p in data_root.rglob("*.parquet"))
    cpu = {}
    t0 = time.process_time()
    tables, done = [], 0
    for batch in pads.dataset(files, format="parquet").to_batches(columns=columns, batch_size=batch_size):
        tables.append(pa.Table.from_batches([batch]))
        done += batch.num_rows
        if done >= rows:
            break
    cpu["decode"] = time.process_time() - t0
    t0 = time.process_time()
    with torch.inference_mode():
        tables = [t.append_column("teacher_logit", pa.array(model(table_to_inputs(t, layout)).float().numpy()))
                  for t in tables]
    cpu["teacher"] = time.process_time() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.process_time()
    with pq.ParquetWriter(out_dir / "costs.parquet", tables[0].schema) as writer:
        for table in tables:
            writer.write_table(table)
    cpu["write"] = time.process_time() - t0
    return {"rows": done, **{k: v * 1e6 / done for k, v in cpu.items()}}


def pipeline_label(spec, teacher: str, shard_root, days, num_cpus: int) -> list[dict]:
    """(b) The pipeline's own label stage, twice in a local Ray this function starts and stops: first right
    after `ray.init` (Ray Data's own actors and worker processes start with it), then again into a new
    directory, as in a job, where the label stage follows the teacher's training in the same Ray."""
    from pipeline.stages.label import label_days

    runs = []
    with common.RssSampler(interval=0.5, pss_every=10**9) as sampler:  # here for the CPU time of every process
        startup = common.start_ray(num_cpus, spec.ray.object_store_memory_mb, spec.ray.data_memory_limit_mb)
        try:
            _quiet_ray_data()
            for name in ("first", "again"):
                cpu, started = sampler.cpu_now(), time.perf_counter()
                labelled = label_days(spec, teacher, str(shard_root / name), days)
                seconds, cpu = time.perf_counter() - started, sampler.cpu_now() - cpu
                runs.append({"rows": labelled.shard_set.total_rows, "seconds": seconds, "startup": startup,
                             "cpu": cpu, "shards": len(labelled.shard_set.shards)})
        finally:
            common.stop_ray()
    return runs


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # keeps the log readable; no effect on the work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--days", type=int, default=1, help="date= partitions the rows are spread over")
    parser.add_argument("--batch-size", type=int, default=8192, help="label.batch_size and the bare loop's")
    parser.add_argument("--threads", type=int, default=1, help="torch threads = label.cpus_per_actor")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--logit-dtype", default="float32")
    parser.add_argument("--shard-rows", type=int, default=250_000)
    parser.add_argument("--string-ids", action="store_true", help="the same log with its ids (row id, "
                        "categorical ids, sequence items) written as text, hashed by the pipeline; recorded "
                        "as label_throughput_string_ids")
    parser.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch", help="label.runtime of (b); "
                        "(a) is always the eager loop; onnxruntime is recorded as label_throughput_onnxruntime")
    parser.add_argument("--no-append", action="store_true", help="print only; record nothing (bench/results/, RESULTS.md)")
    parser.add_argument("--costs", action="store_true", help="only the per-step CPU cost (1 thread, first "
                        "1M rows): decode, teacher, write, in CPU seconds per million rows")
    args = parser.parse_args()
    if args.costs:
        return print_costs(args)

    load_before = os.getloadavg()
    data_root, days = common.click_log(args.rows, args.days)
    teacher = common.ensure_teacher()
    if args.string_ids:
        features = common.bench_spec(data_root, days, common.DATA / "runs").features
        data_root = common.string_id_log(data_root, [features.id, *features.categorical], features.sequence.column)
    spec = common.bench_spec(data_root, days, common.DATA / "runs", label={
        "batch_size": args.batch_size, "actors": [args.actors, args.actors], "cpus_per_actor": args.threads,
        "logit_dtype": args.logit_dtype, "shard_rows": args.shard_rows, "runtime": args.runtime})
    plan = Normaliser.from_spec(spec) if args.string_ids else None
    columns = [spec.features.id, spec.features.label] + spec.features.input_columns()
    out = common.DATA / "label-out"
    shutil.rmtree(out, ignore_errors=True)

    bare = bare_label(data_root, days, teacher, columns, out / "bare", batch_size=args.batch_size,
                      threads=args.threads, logit_dtype=args.logit_dtype, shard_rows=args.shard_rows, plan=plan)
    print(f"(a) bare: {bare}", flush=True)
    with common.reader_beside(sorted(data_root.rglob("*.parquet"))):
        beside = bare_label(data_root, days, teacher, columns, out / "bare-beside", batch_size=args.batch_size,
                            threads=args.threads, logit_dtype=args.logit_dtype, shard_rows=args.shard_rows, plan=plan)
    print(f"(a') bare beside a reader: {beside}", flush=True)
    piped, again = pipeline_label(spec, teacher, out / "pipeline", days, args.num_cpus)
    print(f"(b) pipeline: {piped}\n(b) again: {again}", flush=True)
    after = bare_label(data_root, days, teacher, columns, out / "bare-after", batch_size=args.batch_size,
                       threads=args.threads, logit_dtype=args.logit_dtype, shard_rows=args.shard_rows, plan=plan)
    print(f"(a) bare, after the pipeline runs: {after}", flush=True)
    assert bare["rows"] == piped["rows"] == again["rows"], (bare["rows"], piped["rows"], again["rows"])
    bench_results.publish(render(args, bare, after, beside, piped, again, load_before, os.getloadavg()),
                          dry_run=args.no_append)


def print_costs(args) -> None:
    data_root, _ = common.click_log(args.rows, args.days)
    spec = common.bench_spec(data_root, [common.FIRST_DAY], common.DATA / "runs")
    columns = [spec.features.id, spec.features.label] + spec.features.input_columns()
    out = common.DATA / "label-costs"
    shutil.rmtree(out, ignore_errors=True)
    lines = ["Each step alone over the same rows, timed in this process's CPU time (`time.process_time`, all its "
             "threads), so other load on the machine does not count; "
             f"first {min(args.rows, 1_000_000):,} rows of the log, batch {args.batch_size}; pyarrow decode "
             "defaults, torch 1 thread, writer pyarrow defaults (snappy).", ""]
    rows, figures = [], {}
    for role in ("teacher", "student"):
        costs = figures[role] = stage_costs(data_root, common.ensure_teacher(role), columns, out / role,
                                            batch_size=args.batch_size, rows=min(args.rows, 1_000_000))
        rows.append((f"demo {role} as labeller", f"{costs['decode']:.2f}", f"{costs['teacher']:.2f}",
                     f"{costs['write']:.2f}", f"{1e6 / sum(costs[k] for k in ('decode', 'teacher', 'write')):,.0f}"))
    lines += [common.table(rows, ("model", "Parquet decode", "tensors + forward", "Parquet write",
                                  "rows/s per core, all three"))]
    bench_results.publish({
        "benchmark": "label_step_costs", "title": "Label step costs, one thread (CPU seconds per million rows)",
        "command": common.command(), "machine": common.machine(), "target": COSTS_TARGET,
        "figures": {"cpu_seconds_per_million_rows": figures}, "table_md": "\n".join(lines)}, dry_run=args.no_append)


def render(args, bare: dict, after: dict, beside: dict, piped: dict, again: dict, load_before, load_after) -> dict:
    """The run as `bench_results.record`'s arguments: its figures, and its settings, table and ratios in Markdown."""
    rows = bare["rows"]
    strings, ort = args.string_ids, args.runtime == "onnxruntime"
    # The bare loop before and after the pipeline runs: the machine's speed drifts over minutes (other
    # tenants), and the pipeline runs sit between the two.
    a = 2 * rows / (bare["seconds"] + after["seconds"])
    b_steady, b_total = rows / piped["seconds"], rows / (piped["seconds"] + piped["startup"])
    b_again = rows / again["seconds"]
    shared = rows / beside["seconds"]
    machine = (f"{common.machine()}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
               "(1-minute; other agents shared the machine, so not guaranteed idle)")
    lines = [
        f"Log: {rows:,} rows in {args.days} date= partition(s), files of up to 1M rows (synthetic, demo "
        f"world{TEXT_IDS if strings else ''}); teacher: demo DCN-v2 (untrained){ORT_RUN if ort else ''}; "
        f"batch {args.batch_size}, torch threads {args.threads}, actors {args.actors}, Ray num_cpus "
        f"{args.num_cpus}, logit {args.logit_dtype}, shard_rows {args.shard_rows:,}.",
        "",
        common.table([
            ("(a) bare loop, one process", f"{bare['seconds']:.1f}", f"{rows / bare['seconds']:,.0f}",
             f"read {bare['read']:.1f} s, " + (f"hash {bare['hash']:.1f} s, " if strings else "")
             + f"teacher {bare['teacher']:.1f} s, write {bare['write']:.1f} s"),
            ("(a) the same, after the (b) runs", f"{after['seconds']:.1f}", f"{rows / after['seconds']:,.0f}",
             f"teacher {after['teacher']:.1f} s; both (a) runs: {a:,.0f} rows/s, what the ratios divide by"),
            ("(a') the same, another process decoding the log on the other core (1 thread)",
             f"{beside['seconds']:.1f}", f"{shared:,.0f}", f"{shared / a:.2f} of (a); teacher {beside['teacher']:.1f} s"),
            ("(b) label_days, steady (after ray.init)", f"{piped['seconds']:.1f}", f"{b_steady:,.0f}",
             f"{piped['shards']} shard files, {args.days} manifest(s)"),
            ("(b) including ray.init", f"{piped['seconds'] + piped['startup']:.1f}", f"{b_total:,.0f}",
             f"ray.init {piped['startup']:.1f} s"),
            ("(b) label_days again in the same Ray, into a new directory", f"{again['seconds']:.1f}",
             f"{b_again:,.0f}", f"{again['shards']} shard files"),
        ], ("run", "seconds", "rows/s", "notes")),
        "",
        f"Ratio b/a: **{b_steady / a:.2f}** for the first stage after `ray.init`, {b_total / a:.2f} counting "
        f"`ray.init`, **{b_again / a:.2f}** for the stage run again in the same Ray (what a job's label stage "
        "is: it follows the teacher's training, so Ray Data's own actors and Ray's worker processes are up) "
        f"(target >= {1.4 if ort else 0.8}).",
        f"(a')/(a) = {shared / a:.2f}: a second busy core alone changes the bare "
        f"loop's rate by {shared / a - 1:+.0%} (the machine's own drift included), with no "
        "pipeline in it; the label stage reads and writes on the other core while the teacher runs, so this is "
        "about its ceiling here.",
        f"Teacher compute alone (bare loop's teacher seconds): {rows / bare['teacher']:,.0f} rows/s.",
        f"CPU seconds per million rows (all processes; other load does not count): bare {bare['cpu'] * 1e6 / rows:.1f}, "
        f"pipeline {piped['cpu'] * 1e6 / rows:.1f} (driver, raylet, gcs, agents, read/write tasks, actor), "
        f"{again['cpu'] * 1e6 / rows:.1f} run again; CPU-cost ratio a/b **{bare['cpu'] / piped['cpu']:.2f}**, "
        f"{bare['cpu'] / again['cpu']:.2f} run again.",
    ]
    if strings:
        share = (bare["hash"] + after["hash"]) / (bare["teacher"] + after["teacher"])
        lines.append(f"Hashing the ids (normalise: the hash and the null fills) costs **{share:.1%}** of the "
                     f"teacher's time per row in the bare loop (both (a) runs; target <= 10%): "
                     f"{(bare['hash'] + after['hash']) * 1e6 / (2 * rows):.2f} s against "
                     f"{(bare['teacher'] + after['teacher']) * 1e6 / (2 * rows):.2f} s per million rows.")
    figures = {"rows": rows, "bare": bare, "bare_after": after, "bare_beside_reader": beside, "pipeline": piped,
               "pipeline_again": again, "ratio_first_stage_after_ray_init": b_steady / a,
               "ratio_with_ray_init": b_total / a, "ratio_again_in_same_ray": b_again / a}
    name, title, target = "label_throughput", "Label throughput", TARGET
    if ort:
        name, title, target = f"{name}_onnxruntime", f"{title} with the teacher on ONNX Runtime", ORT_TARGET
    if strings:
        figures["hash_share_of_teacher"] = share
        name, title, target = f"{name}_string_ids", f"{title} with string ids", f"{TARGET}; {HASH_TARGET}"
    return {"benchmark": name, "title": f"{title}: pipeline vs bare loop ({rows:,} rows)",
            "command": common.command(), "machine": machine, "target": target, "figures": figures,
            "table_md": "\n".join(lines)}


if __name__ == "__main__":
    main()
