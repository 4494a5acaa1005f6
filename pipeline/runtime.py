"""How this process runs on Ray, and every environment-specific tweak in one place.

The Ray session (join a cluster or start a local Ray, and shut down only what we started), and the
settings we change in Ray, Ray Data, Ray Train and DeepSpeed for speed or start-up time. Each tweak
says why; the measurements behind them are in docs/SCALING.md ("What the benchmark journal taught").
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import sys
import time

from pipeline import console, storage

log = logging.getLogger(__name__)
# Seconds between Ray Train's checks on its workers (Ray's default: 2). The driver's value reaches the controller.
HEALTH_CHECK_ENV, HEALTH_CHECK_SECONDS = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
_local_ray_address: str | None = None  # the GCS address of the local Ray this process started, if any


@contextlib.contextmanager
def ray_session(spec):
    """Joins `ray.address` or starts a local Ray (dashboard on loopback); shuts down only what it started."""
    import ray  # lazy: Ray takes seconds to import, and the pure commands (validate, report) need none

    if ray.is_initialized():
        yield
        return
    # Workers are other processes: hand them the S3 endpoint, region and profile (never credentials: those
    # come from the environment they inherit locally, or the cluster's IAM role).
    runtime_env = {"env_vars": storage.worker_env()} if storage.worker_env() else None
    address = spec.ray.address or os.environ.get("RAY_ADDRESS")  # a spec's address, or the job server's
    # A quiet console (pipeline/console.py) leaves the workers' output in Ray's session logs.
    forward = not console.is_quiet()
    if address:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env, log_to_driver=forward)
    else:
        store = spec.ray.object_store_memory_mb
        start_local_ray(num_cpus=spec.ray.num_cpus, dashboard_host="127.0.0.1", logging_level=logging.WARNING,
                        runtime_env=runtime_env, object_store_memory=store * 2**20 if store else None,
                        log_to_driver=forward)
    limit_data_memory(spec.ray.data_memory_limit_mb)
    try:
        yield
    finally:
        ray.shutdown()


def start_local_ray(attempts: int = 3, **options) -> None:
    """`ray.init` for a new local Ray of our own, tried again when its node times out starting (a busy machine).

    Never a stranger's: `address="local"` starts one even when `ray start` left another running. And the
    processes it starts are told its address (RAY_ADDRESS, with the GCS port chosen here), because Ray Train's
    placement-group cleaner looks the cluster up by itself, and with two Rays on the machine it fails with
    "Found multiple active Ray instances" tracebacks. Set only while the node starts: this process's own
    environment stays as it was (its subprocesses must not join our Ray)."""
    import ray

    global _local_ray_address
    for attempt in range(1, attempts + 1):
        port = _free_port()
        address = f"{ray.util.get_node_ip_address()}:{port}"
        try:
            with _environment(RAY_GCS_SERVER_PORT=str(port), RAY_ADDRESS=address):
                ray.init(address="local", **options)
            if ray.is_initialized():  # (a test may stand in for ray.init)
                _local_ray_address = address  # what `ray.get_runtime_context().gcs_address` gives there
            return
        except Exception as exc:  # Ray raises a bare Exception for a node start-up timeout
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            log.warning("local Ray did not start in time (attempt %d of %d); trying again", attempt, attempts)
            ray.shutdown()
            time.sleep(5 * attempt)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _environment(**values: str):
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def limit_data_memory(limit_mb: int | None) -> None:
    """Caps the object store Ray Data fills with in-flight blocks: its streaming executor then applies
    back-pressure (reads wait for the teacher and the writer), so memory stays flat as the log grows.
    Blocks shrink with the cap, or a few default-sized blocks would overflow it and spill to disk."""
    if not limit_mb:
        return
    from ray.data import DataContext

    context = DataContext.get_current()
    limit = limit_mb * 2**20
    options = context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=limit)
    context.target_max_block_size = max(2**20, limit // 8)


def configure_storage(endpoint_url: str | None = None, region: str | None = None, profile: str | None = None) -> None:
    """Sets the S3 endpoint, region and profile for this process and the Ray workers it starts.

    Environment variables, not module globals, because Ray workers are other processes (`storage.worker_env`
    hands them on). Unset arguments keep what the environment already says, so
    `export DISTILL_S3_ENDPOINT_URL=...` (or `AWS_PROFILE`) works without a spec field.
    """
    for name, value in {"endpoint_url": endpoint_url, "region": region, "profile": profile}.items():
        if value:
            os.environ[storage.SETTINGS_ENV[name]] = value


def quick_health_checks() -> None:
    """Has Ray Train check on its workers every 0.5 s, unless the user set their own interval.

    Each step of a run (workers started, scheduled, finished) waits for the next check, so at Ray's 2 s a
    small model's training call spends seconds waiting. A check is one small remote call per worker.
    """
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_SECONDS)


@contextlib.contextmanager
def train_call_environment():
    """The settings of one Ray Train call (read by its controller, which inherits the driver's values):
    quick health checks, and on the local Ray this process started, no preemption watcher.

    The watcher is an actor (a new process importing Ray: 1.2-1.4 CPU-seconds of every training call's fixed
    cost on 2 cores, docs/SCALING.md) that waits for a cloud's notice that a node will be taken away; a local
    machine gets none. A user's own `RAY_TRAIN_ENABLE_PREEMPTION_WATCHER` wins; on a cluster it stays on.
    """
    import ray

    quick_health_checks()
    local = _local_ray_address is not None and ray.get_runtime_context().gcs_address == _local_ray_address
    with _environment(**({PREEMPTION_WATCHER_ENV: "0"} if local and PREEMPTION_WATCHER_ENV not in os.environ else {})):
        yield


@contextlib.contextmanager
def parquet_reader_v1():
    """Ray Data's V1 Parquet reader for files we already know (a day's log files, a manifest's shards), with
    its size sample read in this process.

    Ray 2.60's default V2 reader first lists the files again, in a task with a pool of footer readers,
    seconds before the first row. V1 reads the footers here, then samples the first 1,024 rows of 2 to 10 of
    the files (to estimate their size in memory) in remote tasks: 0.9 s before every read on 2 cores (docs/
    SCALING.md), for rows this process reads in milliseconds. Set at call time only, and restored.
    """
    from ray.data import DataContext
    from ray.data._internal.datasource import parquet_datasource

    context = DataContext.get_current()
    default, context.use_datasource_v2 = context.use_datasource_v2, False
    remote_sample, parquet_datasource._fetch_file_infos = parquet_datasource._fetch_file_infos, _sample_here
    try:
        yield
    finally:
        context.use_datasource_v2 = default
        parquet_datasource._fetch_file_infos = remote_sample


def _sample_here(fragments: list, *, columns, schema, local_scheduling) -> list:
    """What Ray Data's `_fetch_file_infos` returns (one sample per fragment), read in this process."""
    from ray.data._internal.datasource import parquet_datasource

    return [parquet_datasource._fetch_parquet_file_info(f, columns=columns, schema=schema) for f in fragments]


def quiet_training_worker() -> None:
    """In a Ray Train worker: no Ray Data progress bars (the validation split is read after every epoch, one
    bar per read) and no INFO line per report (Ray Train logs the whole metrics dict, every model's, from
    every rank). Warnings and errors still show."""
    from ray.data import DataContext
    from ray.train.v2._internal.execution import context

    DataContext.get_current().enable_progress_bars = False
    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # that module names its logger by its path


# DeepSpeed's ZeRO code imports its Muon optimizer, whose module `torch.compile`s kernels as it is imported
# (torch._inductor: 1.3 s more in every worker at ZeRO 1-3). Every model here trains with AdamW (engine.adamw).
DEEPSPEED_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def lean_deepspeed() -> None:
    """Imports DeepSpeed in a training worker without two costs of its start that training never uses.

    - mlflow: DeepSpeed's autotuner imports it whenever it is installed (it is: the driver tracks runs with
      it), 0.9-1.3 s of DeepSpeed's 1.6 s import. Workers never log to MLflow, the driver does
      (pipeline/tracking.py). Hidden from that import (DeepSpeed takes it as absent).
    - Muon's kernels (`DEEPSPEED_MUON`): imported with `torch.compile` as a no-op, so they stay plain
      functions and torch._inductor is not loaded; the optimizer class is the real one.
    """
    if "deepspeed" in sys.modules:
        return
    import torch

    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which DeepSpeed handles
    compile_ = torch.compile
    torch.compile = lambda model=None, **_: model if model is not None else (lambda function: function)
    try:
        importlib.import_module("deepspeed")
        importlib.import_module(DEEPSPEED_MUON)
    finally:
        torch.compile = compile_
        if hide:
            del sys.modules["mlflow"]


def skip_deepspeed_inference_op() -> None:
    """Stops DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op.

    That op serves only tensor-parallel *inference* (`inference_all_reduce`); training all-reduces
    through torch.distributed (gloo). Compiling it takes minutes on a small CPU machine, and again
    whenever the virtual environment's path changes (a fresh clone), for nothing we use.
    """
    lean_deepspeed()
    # By module name: the attribute `deepspeed.comm.torch` is the torch package, re-exported.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def skip_one_worker_allreduce(engine, world_size: int) -> None:
    """One worker at ZeRO 0 has nothing to average, but DeepSpeed would still flatten every gradient,
    all-reduce it with itself and copy it back after each backward (a few percent of a CPU step)."""
    if world_size == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False
