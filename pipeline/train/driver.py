"""The driver side of training: one Ray Train `TorchTrainer` call per `TrainRequest`.

A trainer with the same storage path and name resumes from its last checkpoint, so a crashed call
rerun with the same request continues where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline import runtime, storage
from pipeline.train.worker import MODEL_FILE, PROGRESS_FILE, TrainingRun, train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRequest:
    """One training call: the plan the workers get, their dataset, and where results go."""

    run: TrainingRun
    dataset: Any  # a Ray Dataset of click-log rows or soft-label shards
    model_path: str  # the exported final model (`models/<role>.pt`)
    run_dir: str  # Ray Train keeps its runs and checkpoints under <run_dir>/train/
    validation: Any = None  # a Ray Dataset of validation rows (label and inputs), scored after every epoch


@dataclass
class TrainResult:
    model_path: str
    history: list[dict]  # one entry per epoch: rows, loss terms, rows/s
    steps: list[dict] = field(default_factory=list)  # sampled per optimizer step: lr and loss terms
    restarts: int = 0  # times the run resumed from a checkpoint (worker failure or a rerun)
    best_epoch: int | None = None  # the epoch whose weights were kept (early stopping), else the last


def train_model(request: TrainRequest) -> TrainResult:
    """Trains `request.run` on `request.dataset` and exports the final weights to `request.model_path`."""
    from ray.train.torch import TorchTrainer  # lazy: Ray Train takes seconds to import

    run = dataclasses.replace(request.run, validate=request.validation is not None)
    runtime.quick_health_checks()
    if warning := zero_stage_warning(run.train.num_workers, run.train.zero_stage):
        log.warning("%s: %s", run.role, warning)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=run.to_config(),
        scaling_config=_scaling(run),
        run_config=_run_config(run, request.run_dir),
        datasets={"train": request.dataset, **({"validation": request.validation} if run.validate else {})},
        dataset_config=data_config(run.train.num_workers),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:  # the latest (downloaded when on S3): every epoch's history
        with open(os.path.join(directory, PROGRESS_FILE)) as handle:
            progress = json.load(handle)
        best, best_epoch = _best_checkpoint(result, run.train.early_stopping)
        with best.as_directory() if best else contextlib.nullcontext(directory) as kept:
            with open(os.path.join(kept, MODEL_FILE), "rb") as handle:
                storage.atomic_write_bytes(request.model_path, handle.read())
    return TrainResult(model_path=request.model_path, history=progress["history"], steps=progress["steps"],
                       restarts=progress["restarts"], best_epoch=best_epoch or len(progress["history"]))


def _best_checkpoint(result, stopping):
    """(checkpoint, epoch) of the best epoch on validation when training stops early (Ray Train scored every
    checkpoint on it), else (None, None): the latest is kept."""
    if stopping is None:
        return None, None
    sign = 1.0 if stopping.mode == "max" else -1.0
    checkpoint, metrics = max(result.best_checkpoints, key=lambda pair: sign * pair[1][f"val_{stopping.metric}"])
    return checkpoint, metrics["epoch"]


def _scaling(run: TrainingRun):
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=run.train.num_workers, use_gpu=run.train.use_gpu,
                         resources_per_worker={"CPU": run.train.cpus_per_worker})


def _run_config(run: TrainingRun, run_dir: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    # Local: an absolute path (Ray needs one). S3: the path inside our filesystem, which knows the endpoint.
    (storage_path,), storage_filesystem = storage.arrow_paths([storage.join(run_dir, "train")])
    stopping = run.train.early_stopping
    # Every epoch's checkpoint is kept (the latest resumes, the best is exported), scored on validation.
    scoring = CheckpointConfig(checkpoint_score_attribute=f"val_{stopping.metric}",
                               checkpoint_score_order=stopping.mode) if stopping else None
    return RunConfig(name=run.role, storage_path=storage_path, storage_filesystem=storage_filesystem,
                     failure_config=FailureConfig(max_failures=run.train.max_failures), checkpoint_config=scoring)


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

