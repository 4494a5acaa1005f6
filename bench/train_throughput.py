"""Student-training throughput: Ray Train + DeepSpeed against a bare PyTorch loop over the same shards.

Same student (the demo's MLP), same soft-label shards, batch size, optimizer (`pipeline.train.engine.adamw`, clip 1.0),
loss (`pipeline.losses.distillation_loss` with the demo's distill section) and torch threads (1 per worker, what `cpus_per_worker` 1 or 0.5 gives):
  (a) bare: pyarrow dataset batches -> table_to_inputs -> forward/backward/step, one process, no Ray;
      timed before Ray starts, between every two (b) runs and after Ray stops: each (b) run's ratio
      divides by the rate of the bare runs right before and right after it;
  (a') the same loop while another process decodes the shards on the other core with one thread;
  (b) pipeline: `pipeline.train.train_model` (TorchTrainer, DeepSpeed, iter_torch_batches, checkpoint)
      with 1 worker at ZeRO 0 and ZeRO 2, and 2 workers at ZeRO 2, in one local Ray this script starts.
Rows/s of (b) are given three ways: inside the training loop (the loop's own timer, all workers' rows),
the whole `train_model` call (worker start-up, DeepSpeed init, checkpoint), and with `ray.init` added.

    .venv/bin/python bench/train_throughput.py                 # 4M rows, batch 4096, recorded (bench/results.py)
    .venv/bin/python bench/train_throughput.py --rows 200000 --no-append   # smoke check
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import shutil
import sys
import time

import pyarrow as pa
import pyarrow.dataset as pads
import torch

import common
import results as bench_results

LR = 0.003
TARGET = "pipeline samples/s over the bare loop's (b/a) >= 0.8, inside the training loop"
STEP_COSTS_TARGET = "none, a diagnostic: DeepSpeed's CPU per step over plain torch's, which other load does not inflate"


def bare_train(files: list[str], spec, model_config, *, batch_size: int, threads: int) -> dict:
    """(a) One process, no Ray: the same student, loss, optimizer and clipping as the pipeline's loop."""
    from pipeline.features import FeatureLayout
    from pipeline.losses import distillation_loss
    from pipeline.models import build_model
    from pipeline.train.engine import adamw

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    layout = FeatureLayout.from_spec(spec.features)
    model = build_model(model_config, layout)
    optimizer = adamw(model.parameters(), spec.train.model_copy(update={"lr": LR}))
    rows, started, cpu = 0, time.perf_counter(), time.process_time()
    model.train()
    for inputs in _shard_batches(files, spec, layout, batch_size):
        logits = model(inputs).float()  # (B,)
        loss = distillation_loss(logits, inputs, spec.distill, "binary")["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        rows += len(logits)
    return {"rows": rows, "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}


def step_costs(files: list[str], spec, model_config, batch_size: int, steps: int = 150,
               rounds: int = 5) -> dict:
    """CPU milliseconds per optimizer step on pre-made batches, one process, no Ray, 1 torch thread:
    a plain torch step (the pipeline's fused AdamW, and torch's default one) against
    `pipeline.train.engine.deepspeed_engine` at ZeRO 0 and 2, and ZeRO 2 with
    DeepSpeed's default contiguous gradients (world size 1, gloo); also minor page faults per step."""
    from pipeline.features import FeatureLayout
    from pipeline.models import build_model
    from pipeline.losses import distillation_loss
    from pipeline.runtime import skip_deepspeed_inference_op
    from pipeline.train.engine import adamw, deepspeed_config, deepspeed_engine

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    skip_deepspeed_inference_op()  # as the pipeline's workers do
    torch.set_num_threads(1)
    layout = FeatureLayout.from_spec(spec.features)
    batches = list(itertools.islice(_shard_batches(files, spec, layout, batch_size), steps))

    def loss_of(logits, batch):
        return distillation_loss(logits.float(), batch, spec.distill, "binary")["loss"]

    hyper = {"lr": LR, "weight_decay": spec.train.weight_decay}  # every variant's optimizer settings
    optimizer_spec = spec.train.model_copy(update=hyper)

    def plain_step(fused: bool = True):
        torch.manual_seed(0)
        model = build_model(model_config, layout)
        # Unfused: torch's default AdamW, which the pipeline used before 2026-11-30.
        optimizer = adamw(model.parameters(), optimizer_spec) if fused else torch.optim.AdamW(model.parameters(), **hyper)

        def step(batch):
            loss = loss_of(model(batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        return step

    def deepspeed_step(zero: int, contiguous_gradients: bool = False):
        import deepspeed

        torch.manual_seed(0)
        model = build_model(model_config, layout)
        optimizer = adamw(model.parameters(), optimizer_spec)
        train = optimizer_spec.model_copy(update={"batch_size": batch_size, "zero_stage": zero, "precision": "fp32"})
        if contiguous_gradients:  # DeepSpeed's default, which the pipeline turns off for one worker
            config = deepspeed_config(train, 1)
            config["zero_optimization"]["contiguous_gradients"] = True
            engine = deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]
        else:
            engine = deepspeed_engine(model, optimizer, None, train)

        def step(batch):
            engine.backward(loss_of(engine(batch), batch))
            engine.step()

        return step

    variants = {"torch": plain_step(), "torch_unfused": plain_step(fused=False), "zero0": deepspeed_step(0),
                "zero2": deepspeed_step(2), "zero2_contiguous": deepspeed_step(2, contiguous_gradients=True)}
    for step in variants.values():
        for batch in batches[:10]:  # warm-up: first-step allocations and lazy set-up are not per-step costs
            step(batch)
    # The machine's speed drifts within seconds (other tenants): the variants take turns, `rounds` times
    # over the same slice of batches each, and each keeps its median.
    per_round = len(batches) // rounds
    samples: dict[str, list[float]] = {name: [] for name in variants}
    faults = dict.fromkeys(variants, 0)  # minor page faults: memory the step gets fresh from the OS
    for index in range(rounds):
        chunk = batches[index * per_round:(index + 1) * per_round]
        for name, step in variants.items():
            started, faulted = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for batch in chunk:
                step(batch)
            samples[name].append((time.process_time() - started) / len(chunk) * 1e3)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted
    costs = {name: statistics.median(values) for name, values in samples.items()}
    return costs | {f"{name}_faults": faults[name] / (per_round * rounds) for name in variants}


def print_step_costs(args) -> None:
    files = common.soft_label_shards(args.rows)
    model_config = common.model_config("student")
    spec = common.bench_spec(common.DATA / "unused", [common.FIRST_DAY], common.DATA / "train-runs")
    rows, figures = [], {}
    for batch_size in (1024, 4096, 16384):
        c = figures[batch_size] = step_costs(files, spec, model_config, batch_size)
        rows.append((batch_size, f"{c['torch']:.2f}",
                     *(f"{c[name]:.2f} ({c[name] / c['torch'] - 1:+.0%})"  # against the plain torch step
                       for name in ("torch_unfused", "zero0", "zero2", "zero2_contiguous")),
                     " / ".join(f"{c[name + '_faults']:.0f}" for name in ("torch", "zero0", "zero2", "zero2_contiguous")),
                     f"{batch_size / c['torch'] * 1e3:,.0f}"))
    table_md = "\n".join([
        "One process, no Ray, 1 torch thread, the same pre-made batches (demo MLP student, the demo's distillation loss, fused AdamW, "
        "clip 1.0), 10 warm-up steps each, then 5 rounds in which the five take turns over the same 30 batches, timed in CPU time "
        "(`time.process_time`, so other load does not count), median round per variant; DeepSpeed with "
        "world size 1 (gloo), built by `pipeline.train.engine.deepspeed_engine` as the workers build it, fp32; the "
        "second variant is plain torch with torch's default (unfused) AdamW, the last is ZeRO 2 with DeepSpeed's "
        "default contiguous gradients, which the pipeline turns off for one worker. "
        "Page faults: minor faults per step, memory a step gets fresh from the OS.", "",
        common.table(rows, ("batch", "plain torch", "plain torch, unfused AdamW", "DeepSpeed ZeRO 0",
                            "DeepSpeed ZeRO 2", "ZeRO 2, contiguous gradients",
                            "page faults per step (torch / 0 / 2 / 2 contiguous)", "plain samples/s per core"))])
    bench_results.publish({
        "benchmark": "train_step_costs", "title": "Train step costs: plain torch vs DeepSpeed (CPU ms per optimizer step)",
        "command": common.command(), "machine": common.machine(), "target": STEP_COSTS_TARGET,
        "figures": {"ms_per_step_by_batch": figures}, "table_md": table_md}, dry_run=args.no_append)


def _shard_batches(files: list[str], spec, layout, batch_size: int):
    """The shards as a user's loop reads them: pyarrow dataset batches of `batch_size` rows -> model inputs,
    plus the label and the teacher's logit."""
    from pipeline.features import table_to_inputs

    columns = [spec.features.label, "teacher_logit"] + spec.features.input_columns()
    for table in _rebatched(pads.dataset(files, format="parquet").to_batches(columns=columns), batch_size):
        inputs = table_to_inputs(table, layout)
        inputs["label"] = torch.from_numpy(table.column(spec.features.label).to_numpy().astype("float32"))
        inputs["teacher_logit"] = torch.from_numpy(table.column("teacher_logit").to_numpy().astype("float32"))
        yield inputs


def _rebatched(batches, size: int):
    """Exact `size`-row tables (the last may be short), like Ray's iter_torch_batches."""
    pending, count = [], 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        if count >= size:
            table = pa.Table.from_batches(pending)
            for start in range(0, count - size + 1, size):
                yield table.slice(start, size)
            rest = table.slice(count - count % size)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)


def pipeline_train(files: list[str], spec, name: str, rows: int) -> dict:
    """(b) The pipeline's training stage on a Ray Dataset over the shards (Ray is already started)."""
    import dataclasses

    from pipeline.data.clicklogs import read_named_files
    from pipeline.stages.students import DISTILLED, student_run
    from pipeline.train import TrainRequest, train_model

    columns = [spec.features.label, "teacher_logit"] + spec.features.input_columns()
    dataset = read_named_files(files, None).select_columns(columns)  # how the pipeline reads its shards
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": 1, "lr": LR})})
    run = dataclasses.replace(student_run(spec, DISTILLED, rows, distill=spec.distill), role=name)
    started = time.perf_counter()
    result = train_model(TrainRequest(run=run, dataset=dataset, run_dir=spec.run_dir,
                                      model_path=str(common.DATA / "train-runs" / f"{name}.pt")))
    seconds = time.perf_counter() - started
    epoch = result.history[-1]
    return {"rows": epoch["rows"], "seconds": seconds, "loop_seconds": epoch["seconds"],
            **{k: epoch.get(k) for k in ("first_batch_seconds", "input_wait_seconds", "loop_cpu_seconds")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--batch-size", type=int, default=4096, help="train.batch_size (per worker)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--runs", default="1x0,1x2,2x2,1x0", help="WORKERSxZERO pipeline runs, comma-separated "
                        "(1x0 twice: right after ray.init, and later in the same Ray, as a job's students train); "
                        "WORKERSxZEROpN sets train.prefetch_batches N for that run (default: the spec's)")
    parser.add_argument("--no-append", action="store_true", help="print only; record nothing (bench/results/, RESULTS.md)")
    parser.add_argument("--step-costs", action="store_true", help="only the CPU cost of one optimizer step: "
                        "plain torch vs DeepSpeed ZeRO 0 and 2, batch 1024, 4096 and 16384, no Ray")
    args = parser.parse_args()
    if args.step_costs:
        return print_step_costs(args)

    load_before = os.getloadavg()
    files = common.soft_label_shards(args.rows)
    model_config = common.model_config("student")
    shutil.rmtree(common.DATA / "train-runs", ignore_errors=True)
    base = common.bench_spec(common.DATA / "unused", [common.FIRST_DAY], common.DATA / "train-runs")

    def timed_bare(when: str) -> dict:
        result = bare_train(files, base, model_config, batch_size=args.batch_size, threads=1)
        print(f"(a) bare, {when}: {result}", flush=True)
        return result

    bares = [timed_bare("before Ray starts")]
    with common.reader_beside(files):
        beside = bare_train(files, base, model_config, batch_size=args.batch_size, threads=1)
    print(f"(a') bare beside a reader: {beside}", flush=True)
    results = []
    with common.RssSampler(interval=0.5, pss_every=10**9) as sampler:  # here for every process's CPU time
        startup = common.start_ray(args.num_cpus)
        try:
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False
            for index, run in enumerate(filter(None, args.runs.split(","))):
                if index:  # every (b) run gets a bare run right before and right after it
                    bares.append(timed_bare(f"between (b) runs {index} and {index + 1}"))
                shape, _, prefetch = run.partition("p")  # e.g. 1x0, or 1x0p2 with train.prefetch_batches 2
                workers, zero = (int(x) for x in shape.split("x"))
                spec = _train_spec(workers, zero, int(prefetch) if prefetch else None, args)
                cpu = sampler.cpu_now()
                # A name per run: a trainer with an earlier run's name would resume that run instead.
                result = pipeline_train(files, spec, f"{index}-w{workers}-zero{zero}",
                                        bares[0]["rows"])
                result["cpu_seconds"] = sampler.cpu_now() - cpu
                print(f"(b) {workers} worker(s), ZeRO {zero}: {result}", flush=True)
                results.append((workers, zero, spec.train.cpus_per_worker, spec.train.prefetch_batches, result))
        finally:
            common.stop_ray()
    bares.append(timed_bare("after Ray stops"))
    bench_results.publish(render(args, bares, beside, results, startup, load_before, os.getloadavg()),
                          dry_run=args.no_append)


def _train_spec(workers: int, zero: int, prefetch_batches: int | None, args):
    # One worker takes one CPU (one torch thread), leaving the other core to Ray Data's readers; two
    # workers take half a CPU each (still one thread each), as jobs/demo.yaml does on 2 cores.
    cpus = 1.0 if workers == 1 else max(0.5, (args.num_cpus - 1) / workers)
    prefetch = {} if prefetch_batches is None else {"prefetch_batches": prefetch_batches}
    return common.bench_spec(common.DATA / "unused", [common.FIRST_DAY], common.DATA / "train-runs", train={
        "num_workers": workers, "cpus_per_worker": cpus, "zero_stage": zero, "batch_size": args.batch_size,
        "epochs": 1, "lr": LR, "precision": "fp32", "shuffle_buffer_rows": 0} | prefetch)


def render(args, bares: list[dict], beside: dict, results: list, startup: float, load_before,
           load_after) -> dict:
    """The run as `bench_results.record`'s arguments: its figures, and its settings, table and ratios in Markdown."""
    # The machine's speed drifts by tens of percent within minutes (other tenants): each (b) run is
    # compared with the bare runs timed right before and right after it (`bares[i]` and `bares[i + 1]`).
    def rate(*runs: dict) -> float:
        return sum(r["rows"] for r in runs) / sum(r["seconds"] for r in runs)

    bare, everything = bares[0], rate(*bares)
    distill = common.BENCH_DISTILL
    base_loss = f"soft_loss {distill.get('soft_loss', 'kd')}, alpha {distill['alpha']}"
    rows = [("(a) bare PyTorch loop, 1 process, 1 thread: before Ray, between the (b) runs, after Ray",
             " / ".join(f"{r['seconds']:.1f}" for r in bares), "-",
             " / ".join(f"{rate(r):,.0f}" for r in bares) + f" (all: {everything:,.0f})", "-", "-", "-", "-", "-", "-")]
    shared = rate(beside)
    rows.append(("(a') the same, another process decoding the shards on the other core (1 thread)",
                 f"{beside['seconds']:.1f}", "-", f"{shared:,.0f}", "-", f"{shared / rate(bare):.2f}", "-", "-", "-",
                 "-"))
    ratios, cpu_ratios, in_loop = [], [], {}
    configurations = [f"{w}w/ZeRO {z}/prefetch {p}" for w, z, _, p, _ in results]
    names = [f"#{i + 1} {configuration}" for i, configuration in enumerate(configurations)]
    waits = ", ".join(f"{n}: {r['input_wait_seconds']:.1f}" for n, (*_, r) in zip(names, results))
    loop_cpu = ", ".join(f"{n}: {r['loop_cpu_seconds']:.1f}" for n, (*_, r) in zip(names, results))
    for index, (name, configuration, result) in enumerate(zip(names, configurations, results)):
        workers, zero, cpus, prefetch, r = result
        a = rate(bares[index], bares[index + 1])
        loop, call = r["rows"] / r["loop_seconds"], r["rows"] / r["seconds"]
        steady = r["rows"] / (r["loop_seconds"] - r["first_batch_seconds"])
        with_init = r["rows"] / (r["seconds"] + startup)
        rows.append((f"(b) #{index + 1} train_model, {workers} worker(s) x {cpus:g} CPU, ZeRO {zero}, "
                     f"prefetch_batches {prefetch}",
                     f"{r['seconds']:.1f}", f"{r['first_batch_seconds']:.1f}", f"{loop:,.0f}", f"{a:,.0f}",
                     f"**{loop / a:.2f}**", f"{steady / a:.2f}", f"{call / a:.2f}", f"{with_init / a:.2f}",
                     f"{loop / everything:.2f}"))
        in_loop.setdefault(configuration, []).append(loop / a)
        ratios.append(f"{name}: {loop / a:.2f} ({steady / a:.2f} after the first batch)")
        cpu_ratios.append(f"{name}: {r['cpu_seconds'] * 1e6 / r['rows']:.1f} "
                          f"(a/b {bare['cpu_seconds'] / r['cpu_seconds']:.2f})")
    machine = (f"{common.machine()}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
               "(1-minute; other agents shared the machine, so not guaranteed idle)")
    lines = [
        f"Student: demo MLP; batch {args.batch_size} per worker, fp32, no shuffle buffer, fused AdamW + clip 1.0, "
        f"the demo's distillation loss ({base_loss}); shards of 250k rows (seeded teacher_logit); Ray num_cpus {args.num_cpus}, "
        f"ray.init {startup:.1f} s.",
        "",
        common.table(rows, ("run", "seconds (call)", "first batch s", "rows/s in loop",
                            "bare rows/s right before + after", "b/a in loop", "b/a after first batch",
                            "b/a whole call", "b/a with ray.init", "b/a in loop, vs all bare runs")),
        "",
        f"Ratio b/a inside the training loop: {', '.join(ratios) or '-'} (target >= 0.8); a is the rate of the "
        "two bare runs timed right before and right after each (b) run (the bare runs between (b) runs share "
        "the machine with an idle Ray). Per configuration: "
        + "; ".join(f"{k} {', '.join(f'{v:.2f}' for v in vs)}" for k, vs in in_loop.items()) + ".",
        "First batch: seconds the worker waited for its first batch once its model and DeepSpeed were set up "
        f"(Ray Data starts reading the shards during that set-up). Total input wait per run (s): {waits or '-'}.",
        f"(a')/(a) = {shared / rate(bare):.2f} (against the first bare run): a second busy core alone changes the "
        f"bare loop's rate by {shared / rate(bare) - 1:+.0%} (the machine's own drift included), with no "
        "pipeline in it; every (b) run reads on the other core while it trains, so this is about its ceiling here.",
        f"CPU seconds of the training thread in the loop (rank 0): {loop_cpu or '-'}; the bare loop's process, "
        "decoding included: " + " / ".join(f"{r['cpu_seconds']:.1f}" for r in bares)
        + f", {beside['cpu_seconds']:.1f} beside the reader.",
        f"CPU seconds per million samples, every process of the whole train_model call: bare "
        f"{bare['cpu_seconds'] * 1e6 / bare['rows']:.1f} (first run); {', '.join(cpu_ratios) or '-'}.",
    ]
    figures = {"rows": bare["rows"], "batch_size": args.batch_size, "ray_init_seconds": startup, "bare": bares,
               "bare_beside_reader": beside, "ratio_in_loop": in_loop,
               "runs": [{"workers": w, "zero_stage": z, "cpus_per_worker": c, "prefetch_batches": p, **r}
                        for w, z, c, p, r in results]}
    return {"benchmark": "train_throughput",
            "title": f"Train throughput: Ray Train + DeepSpeed vs bare PyTorch ({bare['rows']:,} rows, 1 epoch)",
            "command": common.command(), "machine": machine, "target": TARGET, "figures": figures,
            "table_md": "\n".join(lines)}


if __name__ == "__main__":
    main()
