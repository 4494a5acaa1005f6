"""The driver side of training: one Ray Train `TorchTrainer` call per `TrainRequest`.

A trainer with the same storage path and name resumes from its last checkpoint, so a crashed call
rerun with the same request continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline import runtime, storage
from pipeline.train.plan import TrainingRun
from pipeline.train.worker import MODEL_FILE, PROGRESS_FILE, train_loop_per_worker

log = logging.getLogger(__name__)


# What the models of one pass share, because they read the same batches in the same workers.
SHARED_SETTINGS = ("batch_size", "num_workers", "cpus_per_worker", "use_gpu", "seed", "shuffle_buffer_rows",
                   "prefetch_batches", "max_failures", "early_stopping")


@dataclass(frozen=True)
class TrainRequest:
    """One model's training call: the plan the workers get, their dataset, and where results go."""

    run: TrainingRun
    dataset: Any  # a Ray Dataset of click-log rows or soft-label shards
    model_path: str  # the exported final model (`models/<role>.pt`)
    run_dir: str  # Ray Train keeps its runs and checkpoints under <run_dir>/train/
    validation: Any = None  # a Ray Dataset of validation rows (label and inputs), scored after every epoch
    callbacks: tuple = ()  # Ray Train run callbacks, e.g. Tune's report callback when a Tune trial trains


@dataclass(frozen=True)
class TrainPass:
    """Several models trained in one call on one read of the same data (e.g. the teacher and the hard-label
    student, or every distillation candidate): one fixed cost, N models, each with its own optimizer,
    loss and epochs."""

    name: str  # the Ray Train run name: a rerun with the same name resumes
    runs: tuple[TrainingRun, ...]
    model_paths: dict[str, str]  # {role: the exported final model}
    dataset: Any
    run_dir: str
    validation: Any = None
    callbacks: tuple = ()


@dataclass
class TrainResult:
    model_path: str
    history: list[dict]  # one entry per epoch: rows, loss terms, rows/s
    steps: list[dict] = field(default_factory=list)  # sampled per optimizer step: lr and loss terms
    restarts: int = 0  # times the run resumed from a checkpoint (worker failure or a rerun)
    best_epoch: int | None = None  # the epoch whose weights were kept (early stopping), else the last


def train_model(request: TrainRequest) -> TrainResult:
    """Trains `request.run` on `request.dataset` and exports the kept weights to `request.model_path`."""
    role = request.run.role
    return train_pass(TrainPass(name=role, runs=(request.run,), model_paths={role: request.model_path},
                                dataset=request.dataset, run_dir=request.run_dir, validation=request.validation,
                                callbacks=request.callbacks))[role]


def train_pass(request: TrainPass) -> dict[str, TrainResult]:
    """Trains every model of `request` in one TorchTrainer call; exports each model's kept weights (its best
    epoch on validation with early stopping, else its last) to its path. Returns {role: TrainResult}."""
    from ray.train.torch import TorchTrainer  # lazy: Ray Train takes seconds to import

    runs = [dataclasses.replace(r, validate=request.validation is not None) for r in request.runs]
    check_shared(runs)
    lead = runs[0]
    if warning := zero_stage_warning(lead.train.num_workers, lead.train.zero_stage):
        log.warning("%s: %s", request.name, warning)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"runs": [r.to_config() for r in runs]},
        scaling_config=_scaling(lead),
        run_config=_run_config(lead, request.name, request.run_dir, request.callbacks),
        datasets={"train": request.dataset, **({"validation": request.validation} if lead.validate else {})},
        dataset_config=data_config(lead.train.num_workers),
    )
    with runtime.train_call_environment():
        result = trainer.fit()
    with result.checkpoint.as_directory() as directory:  # the latest (downloaded when on S3): every epoch's history
        with open(os.path.join(directory, PROGRESS_FILE)) as handle:
            progress = json.load(handle)
    return {r.role: _export(result, r, progress, request.model_paths[r.role]) for r in runs}


def check_shared(runs: list[TrainingRun]) -> None:
    """Models of one pass must agree on what they read and how (they share every batch)."""
    lead = runs[0]
    for run in runs[1:]:
        differ = [k for k in SHARED_SETTINGS if getattr(run.train, k) != getattr(lead.train, k)]
        if differ or (run.rows, run.label, run.task, run.layout) != (lead.rows, lead.label, lead.task, lead.layout):
            raise ValueError(f"{run.role} cannot train in one pass with {lead.role}: they differ in "
                             f"{differ or 'rows, label, task or features'}")


def _export(result, run: TrainingRun, progress: dict, model_path: str) -> TrainResult:
    record = progress["models"][run.role]
    checkpoint, best_epoch = _kept_checkpoint(result, run.role, run.train.early_stopping)
    with checkpoint.as_directory() as kept:
        with open(os.path.join(kept, run.role, MODEL_FILE), "rb") as handle:
            storage.atomic_write_bytes(model_path, handle.read())
    return TrainResult(model_path=model_path, history=record["history"], steps=record["steps"],
                       restarts=progress["restarts"], best_epoch=best_epoch or len(record["history"]))


def _kept_checkpoint(result, role: str, stopping):
    """(checkpoint, epoch) of the model's best epoch on validation when training stops early (Ray Train kept
    every epoch's checkpoint with its reported scores), else (the latest, None)."""
    if stopping is None:
        return result.checkpoint, None
    key, sign = f"{role}/val_{stopping.metric}", 1.0 if stopping.mode == "max" else -1.0
    scored = [(checkpoint, metrics) for checkpoint, metrics in result.best_checkpoints if key in metrics]
    checkpoint, metrics = max(scored, key=lambda pair: sign * pair[1][key])
    return checkpoint, metrics["epoch"]


def _scaling(run: TrainingRun):
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=run.train.num_workers, use_gpu=run.train.use_gpu,
                         resources_per_worker={"CPU": run.train.cpus_per_worker})


def _run_config(run: TrainingRun, name: str, run_dir: str, callbacks: tuple = ()):
    from ray.train import FailureConfig, RunConfig

    # Local: an absolute path (Ray needs one). S3: the path inside our filesystem, which knows the endpoint.
    (storage_path,), storage_filesystem = storage.arrow_paths([storage.join(run_dir, "train")])
    # Every epoch's checkpoint is kept (the latest resumes; each model's best on validation is exported).
    return RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                     failure_config=FailureConfig(max_failures=run.train.max_failures), callbacks=list(callbacks))


def zero_stage_warning(num_workers: int, zero_stage: int) -> str | None:
    """Why ZeRO stages 1-3 on a single worker only cost time, or None when they can pay off."""
    if num_workers > 1 or zero_stage == 0:
        return None
    return (f"train.zero_stage {zero_stage} with one worker: ZeRO splits optimizer state, gradients and "
            "(at stage 3) weights across workers, so one worker saves nothing and pays DeepSpeed's "
            "bookkeeping on every step (docs/SCALING.md); use zero_stage 0 unless train.num_workers grows")


def data_config(num_workers: int):
    """How Ray Train hands the dataset to the workers: split in equal parts when there are several.

    One worker reads the whole dataset through a plain iterator, which runs Ray Data's executor inside
    the worker. `streaming_split` would start a coordinator actor (a new process, seconds before the
    first batch) and send every block through it (a share of a core during the loop; docs/SCALING.md).
    """
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=["train"] if num_workers > 1 else [])  # every worker scores all validation

