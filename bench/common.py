"""Shared pieces of the benchmarks: inputs (click logs, teacher, soft-label shards), the job spec they run,
a local Ray they start and stop, a resident-memory sampler, and the machine line a run records.

Benchmarks build their inputs under /tmp/bench-data and reuse them; nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BENCH_DATA", "/tmp/bench-data"))
FIRST_DAY = dt.date(2026, 1, 1)
WORLD = {"users": 5000, "items": 20000, "categories": 50, "seq_len": 10, "seed": 7}  # jobs/demo.yaml's world


# One fixed distillation loss for the speed benchmarks (the demo's before it chose among candidates on
# validation, `distill.search`): what they measure must not move with that choice.
BENCH_DISTILL = {"soft_loss": "mse", "alpha": 0.3}
FILE_ROWS = 1_000_000  # rows per generated Parquet file (one generated day each)


@contextlib.contextmanager
def reader_beside(files: list[str]):
    """Another process decodes `files` over and over with one thread, as a pipeline's reader does on the
    other core: a bare loop timed inside this shows what sharing the machine costs it, with no pipeline."""
    reader = subprocess.Popen([sys.executable, "-c", (
        "import sys, pyarrow.dataset as pads\n"
        "while True:\n"
        "    for _ in pads.dataset(sys.argv[1:], format='parquet').to_batches(): pass\n"), *map(str, files)],
        env=os.environ | {"OMP_NUM_THREADS": "1"})  # pyarrow's CPU pool takes its size from it, as in Ray tasks
    try:
        time.sleep(1.0)  # decoding before the timed loop starts
        yield
    finally:
        reader.kill()
        reader.wait()


def click_log(rows: int, days: int = 1) -> tuple[Path, list[dt.date]]:
    """A log of `rows` rows in `days` `date=` partitions, built from generated files of FILE_ROWS rows
    (fewer for a smoke run) by hard links, so every layout of the same rows shares one copy on disk.

    Returns:
        The log's root and its days.
    """
    file_rows = min(rows, FILE_ROWS)
    files = _generated_files(-(-rows // file_rows), file_rows)
    root = DATA / f"log-{rows}-rows-{days}-days"
    dates = [FIRST_DAY + dt.timedelta(days=i) for i in range(days)]
    if not root.exists():
        tmp = root.with_name(root.name + ".tmp")
        for i, source in enumerate(files):  # files round-robin over the days
            target = tmp / f"date={dates[i % days].isoformat()}" / f"part-{i:05d}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target)
        tmp.rename(root)
    return root, dates


def string_id_log(root: Path, id_columns: list[str], sequence: str | None) -> Path:
    """`root`'s log with its ids written as text, as many shops' tools write them: each id column (and the
    sequence's items) as the hex text of the demo's integer id, e.g. 1234 -> "sku-4d2". Same rows, same days."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def text(values: pa.ChunkedArray) -> pa.Array:
        numbers = values.combine_chunks().to_numpy(zero_copy_only=False)
        return pa.array(np.char.add("sku-", np.char.mod("%x", numbers)).astype(object), pa.string())

    target = root.with_name(root.name + "-string-ids")
    if not target.exists():
        tmp = target.with_name(target.name + ".tmp")
        for path in sorted(root.rglob("*.parquet")):
            table = pq.read_table(path)
            for name in id_columns:
                table = table.set_column(table.schema.get_field_index(name), name, text(table.column(name)))
            if sequence:
                lists = table.column(sequence).combine_chunks()
                items = pa.ListArray.from_arrays(lists.offsets, text(pa.chunked_array([lists.flatten()])))
                table = table.set_column(table.schema.get_field_index(sequence), sequence, items)
            out = tmp / path.relative_to(root)
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, out)
        tmp.rename(target)
    return target


def _generated_files(count: int, file_rows: int) -> list[Path]:
    """`count` generated days of `file_rows` rows (demo world); generates the missing ones, timed."""
    from pipeline.data.synthetic import generate_click_logs

    root = DATA / f"generated-{file_rows}-rows"
    dates = [dt.date(2025, 1, 1) + dt.timedelta(days=i) for i in range(count)]
    paths = [root / f"date={d.isoformat()}" / "part-00000.parquet" for d in dates]
    missing = [d for d, p in zip(dates, paths) if not p.exists()]
    if missing:
        started = time.perf_counter()
        for day in missing:
            generate_click_logs(str(root), start_date=day, days=1, rows_per_day=file_rows, **WORLD)
        seconds = time.perf_counter() - started
        print(f"generated {len(missing)} file(s) x {file_rows:,} rows in {seconds:.1f}s "
              f"({len(missing) * file_rows / seconds:,.0f} rows/s) under {root}", flush=True)
    return paths


def job_yaml(job: str = "demo") -> dict:
    """A shipped job spec, `jobs/<job>.yaml`, as raw YAML (the demo's by default)."""
    return yaml.safe_load((ROOT / "jobs" / f"{job}.yaml").read_text())


def model_config(role: str, job: str = "demo"):
    """The `ModelConfig` of a shipped job's `teacher` or `student` section, as the pipeline builds it."""
    from pipeline.models import ModelConfig
    from pipeline.spec import StudentSpec, TeacherSpec

    section = (TeacherSpec if role == "teacher" else StudentSpec).model_validate(job_yaml(job)[role])
    return ModelConfig.from_section(section)  # out_dim 1: a binary CTR logit


def ensure_teacher(role: str = "teacher", job: str = "demo") -> str:
    """An untrained model of a shipped job's `teacher` (or `student`) architecture reading the job's `features`,
    saved like a trained teacher: weights do not change throughput. Cached under a name that changes with the
    job's model section and features, so an edited spec builds a new one."""
    from pipeline.features import FeatureLayout
    from pipeline.models import build_model, save_model
    from pipeline.spec import FeaturesSpec

    raw = job_yaml(job)
    if (raw[role] or {}).get("extra_features"):
        raise ValueError(f"jobs/{job}.yaml's {role} reads teacher-only columns, which this builder leaves out; "
                         "time a teacher that reads them through `features` (jobs/demo.yaml's)")
    config = model_config(role, job)
    layout = FeatureLayout.from_spec(FeaturesSpec.model_validate(raw["features"]))
    digest = hashlib.sha256(json.dumps([config.to_dict(), layout.to_dict()], sort_keys=True).encode()).hexdigest()
    path = DATA / f"labeller-{job}-{role}-{config.model}-{digest[:8]}.pt"
    if not path.exists():
        import torch

        torch.manual_seed(0)
        save_model(str(path), build_model(config, layout), config, layout)
    return str(path)


def bench_spec(data_path: Path, days: list[dt.date], run_root: Path, **sections):
    """The demo spec pointed at the benchmark log; `sections` override whole keys of a section,
    e.g. label={"batch_size": 8192}, ray={"object_store_memory_mb": 100}."""
    from pipeline.spec import parse_spec

    raw = job_yaml()
    raw["name"] = "bench"
    raw["distill"] = dict(BENCH_DISTILL)
    raw["data"] |= {"source": "parquet", "path": str(data_path),
                    "train_days": {"start": days[0], "end": days[-1]},
                    "eval_days": {"start": days[-1] + dt.timedelta(days=1), "end": days[-1] + dt.timedelta(days=1)}}
    raw["output"] = {"root": str(run_root), "run_name": "bench"}
    for name, values in sections.items():
        raw[name] = (raw.get(name) or {}) | values
    return parse_spec(raw, source="bench")


def start_ray(num_cpus: int, object_store_mb: int | None = None, data_memory_limit_mb: int | None = None) -> float:
    """Starts this benchmark's own local Ray (no dashboard); returns the seconds `ray.init` took.

    Applies Ray Data's object-store cap as the pipeline's `ray_session` does (`runtime.limit_data_memory`).
    """
    from pipeline.runtime import limit_data_memory, start_local_ray  # retried when a busy machine delays the node

    os.environ.pop("RAY_ADDRESS", None)  # never join another agent's cluster
    started = time.perf_counter()
    start_local_ray(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING",
                    object_store_memory=object_store_mb * 2**20 if object_store_mb else None)
    seconds = time.perf_counter() - started
    limit_data_memory(data_memory_limit_mb)
    return seconds


def stop_ray() -> None:
    import ray

    ray.shutdown()


class RssSampler:
    """Samples the summed resident memory of this process and all its descendants (the Ray processes
    `ray.init` started: gcs_server, raylet, workers, actors) every `interval` seconds, in a thread.

    RSS counts shared pages (the object store's mmap, torch's libraries) once per process that maps them,
    so the sum overstates the machine's use; PSS (proportional set size, shared pages split among their
    users) is sampled every `pss_every` samples as the fairer number.

    It also keeps each process's latest CPU time (user + system), so `cpu_now()` gives the CPU seconds all
    these processes have used: a cost that, unlike wall time, other load on the machine does not inflate.
    """

    def __init__(self, interval: float = 0.2, pss_every: int = 10):
        self.interval, self.pss_every = interval, pss_every
        self.peak_rss = self.peak_pss = 0
        self.peak_by_name: dict[str, int] = {}
        self.samples = 0
        self._cpu: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            self._sample(me, with_pss=self.samples % self.pss_every == 0)
            self.samples += 1
            self._stop.wait(self.interval)

    def cpu_now(self) -> float:
        """CPU seconds used so far by this process and its descendants (exited ones up to their last sample)."""
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            self._record_cpu(proc)
        with self._lock:
            return sum(self._cpu.values())

    def _record_cpu(self, proc: psutil.Process) -> None:
        try:
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return
        with self._lock:
            self._cpu[proc.pid] = times.user + times.system

    def _sample(self, me: psutil.Process, with_pss: bool) -> None:
        rss = pss = 0
        by_name: dict[str, int] = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                memory = proc.memory_full_info() if with_pss else proc.memory_info()
                name = _process_kind(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self._record_cpu(proc)
            rss += memory.rss
            pss += getattr(memory, "pss", 0)
            by_name[name] = by_name.get(name, 0) + memory.rss
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        if rss == self.peak_rss:
            self.peak_by_name = by_name


def _process_kind(proc: psutil.Process) -> str:
    """A short label: driver, raylet, gcs_server, or the Ray worker's title (e.g. ray::MapWorker)."""
    if proc.pid == os.getpid():
        return "driver"
    title = " ".join(proc.cmdline()[:1]) or proc.name()
    title = title.split("/")[-1]
    if title.startswith("ray::"):
        return title.split("(")[0].split(".")[0]
    return title[:40]


def machine() -> str:
    """Cores, memory, load, versions: a run's machine (`bench/results.py` records its date apart)."""
    import pyarrow
    import ray
    import torch

    load = os.getloadavg()
    return (f"{psutil.cpu_count(logical=True)} cores ({platform.processor() or platform.machine()}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, GPU: "
            f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, Ray {ray.__version__}, "
            f"pyarrow {pyarrow.__version__}")


def table(rows: list, header, left: int = 1) -> str:
    """A Markdown table (also readable in a terminal); the first `left` columns are left-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f}" if seconds > 0 else "-"


def seeded_logits(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(-3.3, 1.0, rows).astype(np.float32)


def soft_label_shards(rows: int, shard_rows: int = 250_000) -> list[str]:
    """Soft-label shards shaped like the label stage's (student inputs, label, `teacher_logit`), made
    without a teacher: the logit is seeded noise, which costs a student exactly what a real one does."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    root = DATA / f"soft-labels-{rows}-rows"
    if not root.exists():
        log_root, _ = click_log(rows, 1)
        tmp = root.with_name(root.name + ".tmp")
        tmp.mkdir(parents=True)
        source = pads.dataset(sorted(str(p) for p in log_root.rglob("*.parquet")), format="parquet")
        pending, count, part = [], 0, 0
        for batch in itertools.chain(source.to_batches(), [None]):  # batches stop at row groups: gather shard_rows
            if batch is not None:
                pending.append(batch)
                count += batch.num_rows
            if pending and (count >= shard_rows or batch is None):
                table = pa.Table.from_batches(pending).drop_columns(["true_ctr"])
                table = table.append_column("teacher_logit", pa.array(seeded_logits(table.num_rows, seed=part)))
                pq.write_table(table, tmp / f"part-{part:05d}.parquet")
                pending, count, part = [], 0, part + 1
        tmp.rename(root)
    return sorted(str(p) for p in root.glob("*.parquet"))


def command() -> str:
    """The command line that ran this benchmark, as its run records it."""
    import sys

    return " ".join([".venv/bin/python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
