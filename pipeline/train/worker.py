"""The training loop that runs in each Ray Train worker, and `TrainingRun`, the typed plan it receives.

The driver sends `TrainingRun.to_config()` (plain dicts: `model_dump()`s of the spec's sections); the
worker's first line rebuilds it. The loop wraps the model with DeepSpeed (`engine.py`), streams
batches with `iter_torch_batches`, and reports a checkpoint (DeepSpeed state for resume and the
exported `model.pt`) after every epoch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import losses, metrics, runtime
from pipeline.features import FeatureLayout
from pipeline.models import ModelConfig, build_model, load_model, save_model
from pipeline.shards import ShardCollate, SoftLabelTargets
from pipeline.spec import DistillSpec, TrainSpec
from pipeline.train.engine import DistillModule, adamw, deepspeed_engine, full_state_dict, lr_lambda

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"
PROGRESS_FILE = "progress.json"
TERMS = ("loss", "hard_loss", "soft_loss", "hint_loss", "listwise_loss")  # what an epoch's history averages
_END = object()  # the end of an iterator


@dataclass(frozen=True)
class TrainingRun:
    """What one training call trains, and how: everything a worker needs besides its dataset shard."""

    role: str  # run name inside <run_dir>/train/, e.g. "teacher-<fingerprint>"
    model: ModelConfig
    layout: FeatureLayout
    train: TrainSpec  # epochs and lr already resolved for this model
    task: str  # binary or multiclass
    label: str
    rows: int  # rows in the dataset, for the lr schedule's length
    group: str | None = None
    distill: DistillSpec | None = None  # None: hard labels only
    targets: SoftLabelTargets | None = None  # the teacher columns a distilled student reads
    init_model: str | None = None  # a saved model of the same architecture to start from (warm start)
    validate: bool = False  # score the "validation" dataset after every epoch (val_* metrics, early stopping)

    @property
    def total_steps(self) -> int:
        steps_per_epoch = math.ceil(self.rows / (self.train.batch_size * self.train.num_workers))
        return max(1, steps_per_epoch * self.train.epochs)

    def to_config(self) -> dict:
        """Plain dicts for `train_loop_config` (it crosses a process boundary)."""
        return {"role": self.role, "model": self.model.to_dict(), "layout": self.layout.to_dict(),
                "train": self.train.model_dump(), "task": self.task, "label": self.label, "rows": self.rows,
                "group": self.group, "distill": self.distill.model_dump() if self.distill else None,
                "targets": dataclasses.asdict(self.targets) if self.targets else None,
                "init_model": self.init_model, "validate": self.validate}

    @classmethod
    def from_config(cls, config: dict) -> TrainingRun:
        distill, targets = config["distill"], config["targets"]
        return cls(**config | {"model": ModelConfig.from_dict(config["model"]),
                               "layout": FeatureLayout.from_dict(config["layout"]),
                               "train": TrainSpec(**config["train"]),
                               "distill": DistillSpec(**distill) if distill else None,
                               "targets": SoftLabelTargets(**targets) if targets else None})


def train_loop_per_worker(config: dict) -> None:
    """Runs in each Ray Train worker: resumes from Ray Train's latest checkpoint, if any, then trains the
    remaining epochs and reports a checkpoint after each."""
    import ray.train  # lazy: this module is imported by the driver too, before Ray starts

    run = TrainingRun.from_config(config)
    runtime.skip_deepspeed_inference_op()
    torch.manual_seed(run.train.seed)
    torch.set_num_threads(max(1, int(run.train.cpus_per_worker)))
    batches_for = _epoch_batches(run, ray.train.get_dataset_shard("train"))
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as directory:
        progress = _progress(directory)
        start_epoch = len(progress["history"])
        # Ray Data's first batch takes seconds (read tasks, and with several workers a split coordinator,
        # start in new worker processes): ask for it now, so the wait overlaps building model and DeepSpeed.
        batches = _asked_early(batches_for(start_epoch)) if start_epoch < run.train.epochs else None
        engine = _engine(run, resumed=directory is not None)
        if directory:  # weights, optimizer and lr schedule of the last finished epoch
            engine.load_checkpoint(directory)
            log.warning("resumed from the checkpoint after epoch %d (restart %d)", start_epoch, progress["restarts"])
    log_every = max(1, run.total_steps // 200)  # about 200 points per run for the loss curves
    validation = ray.train.get_dataset_shard("validation") if run.validate else None
    for epoch in range(start_epoch, run.train.epochs):
        if _stopped_early(progress["history"], run.train.early_stopping):
            break  # a resumed run that had already stopped
        stats = _train_epoch(engine, batches, run, progress["steps"], log_every)
        if validation is not None:
            stats |= _validation_metrics(engine, run, validation)
        progress["history"].append({"epoch": epoch + 1, **stats})
        last = epoch + 1 == run.train.epochs or _stopped_early(progress["history"], run.train.early_stopping)
        if not last:  # the next epoch's read starts while this one's checkpoint is saved
            batches = _asked_early(batches_for(epoch + 1))
        _report(engine, run, progress)
        if last:
            break


def _stopped_early(history: list[dict], stopping) -> bool:
    """True when the validation metric has not improved by `min_delta` on its best for `patience` epochs."""
    if stopping is None or not history:
        return False
    values = [entry[f"val_{stopping.metric}"] for entry in history]
    sign = 1.0 if stopping.mode == "max" else -1.0
    best_epoch, best = 0, sign * values[0]
    for epoch, value in enumerate(values[1:], start=1):
        if sign * value > best + stopping.min_delta:
            best_epoch, best = epoch, sign * value
    return len(values) - 1 - best_epoch >= stopping.patience


def _validation_metrics(engine, run: TrainingRun, shard) -> dict:
    """`val_auc` (or `val_accuracy`) and `val_log_loss` of the model on the whole validation split.

    Every worker scores every validation row (the split is not sharded: under ZeRO-3 each forward needs
    all ranks), and rank 0's numbers are the ones every rank uses, so all ranks stop together.
    """
    collate = _arrow_collate(ShardCollate(run.layout, run.label, None, None, run.task))
    labels, logits = [], []
    engine.eval()
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=run.train.batch_size, collate_fn=collate):
            out, _ = engine({k: v.to(engine.device) for k, v in batch.items()})
            labels.append(batch["label"].numpy())
            logits.append(out.float().cpu().numpy())
    y, z = np.concatenate(labels), np.concatenate(logits)
    if run.task == "multiclass":
        scores = metrics.multiclass_metrics(y, z)
        values = torch.tensor([scores["accuracy"], scores["log_loss"]], dtype=torch.float64)
        names = ("val_accuracy", "val_log_loss")
    else:
        values = torch.tensor([metrics.auc(y, z), metrics.log_loss(y, z)], dtype=torch.float64)
        names = ("val_auc", "val_log_loss")
    if torch.distributed.is_initialized():
        torch.distributed.broadcast(values, src=0)
    return dict(zip(names, values.tolist())) | {"val_rows": int(len(y))}


def _epoch_batches(run: TrainingRun, shard):
    """A function of the epoch giving that epoch's collated batches from this worker's dataset shard."""
    listwise = run.distill is not None and run.distill.listwise_weight > 0
    collate = _arrow_collate(ShardCollate(run.layout, run.label, run.targets if run.distill else None,
                                          run.group if listwise else None, run.task))
    train = run.train

    def epoch_batches(epoch: int):
        return shard.iter_torch_batches(
            batch_size=train.batch_size, collate_fn=collate, prefetch_batches=train.prefetch_batches,
            local_shuffle_buffer_size=train.shuffle_buffer_rows or None,
            local_shuffle_seed=train.seed + epoch if train.shuffle_buffer_rows else None,
        )

    return epoch_batches


def _arrow_collate(inner: ShardCollate):
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _Collate(ArrowBatchCollateFn):  # Ray hands Arrow batches only to this subclass
        def __call__(self, batch):
            return inner(batch)

    return _Collate()


def _engine(run: TrainingRun, resumed: bool):
    """The model (warm-started from `init_model` unless resuming: a resumed run has newer weights), its
    hint projection, optimizer and lr schedule, wrapped by DeepSpeed."""
    model = build_model(run.model, run.layout)
    if run.init_model and not resumed:
        model.load_state_dict(load_model(run.init_model)[0].state_dict())
    hint_dim = run.targets.hint_dim if run.distill and run.targets and run.distill.hint_weight > 0 else None
    module = DistillModule(model, hint_dim)
    optimizer = adamw(module.parameters(), run.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(run.train.lr_schedule, run.total_steps))
    return deepspeed_engine(module, optimizer, scheduler, run.train)


def _asked_early(batches):
    """Iterates `batches`, having started to fetch the first one on a background thread right away."""
    iterator, first = iter(batches), concurrent.futures.Future()

    def fetch():
        try:
            first.set_result(next(iterator, _END))
        except BaseException as error:  # re-raised in the training loop, where it is handled
            first.set_exception(error)

    threading.Thread(target=fetch, name="first-batch", daemon=True).start()

    def all_batches():
        batch = first.result()
        if batch is not _END:
            yield batch
            yield from iterator

    return all_batches()


def _train_epoch(engine, batches, run: TrainingRun, steps: list[dict], log_every: int) -> dict:
    """One pass over this worker's shard; returns loss terms averaged over all workers' rows, and
    appends a sample of (step, lr, loss terms) to `steps` every `log_every` optimizer steps."""
    engine.train()
    totals = torch.zeros(1 + len(TERMS), dtype=torch.float64)  # rows, then row-weighted sums of each term
    seen: set[str] = {"loss", "hard_loss"}
    waits = []  # seconds blocked on Ray Data before each step
    start = asked = time.perf_counter()
    cpu = time.thread_time()
    for batch in batches:
        waits.append(time.perf_counter() - asked)
        inputs = {k: v.to(engine.device) for k, v in batch.items()}
        logits, hint_pred = engine(inputs)
        terms = losses.distillation_loss(logits.float(), inputs, run.distill, run.task,
                                         None if hint_pred is None else hint_pred.float())
        engine.backward(terms["loss"])
        engine.step()  # also steps the lr scheduler
        rows, values = float(len(logits)), {k: v.item() for k, v in terms.items()}
        seen |= set(values)
        totals += torch.tensor([rows] + [rows * values.get(n, 0.0) for n in TERMS], dtype=torch.float64)
        if engine.global_steps % log_every == 0:
            steps.append({"step": engine.global_steps, "lr": engine.get_lr()[0], **values})
        asked = time.perf_counter()
    return _epoch_stats(totals, seen, seconds=time.perf_counter() - start, waits=waits,
                        loop_cpu=time.thread_time() - cpu)


def _epoch_stats(totals: torch.Tensor, seen: set[str], *, seconds: float, waits: list[float],
                 loop_cpu: float) -> dict:
    """An epoch's history entry: loss terms averaged over every worker's rows, and where the time went."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    rows = max(totals[0].item(), 1.0)
    averages = {n: totals[1 + i].item() / rows if n in seen else None for i, n in enumerate(TERMS)}
    return {"rows": int(totals[0].item()), **averages, "seconds": seconds,
            "rows_per_s": totals[0].item() / max(seconds, 1e-9),
            # Where the epoch went on this worker: waiting for the first batch (pipeline start-up; in a run's
            # first epoch only what is left after the set-up it overlaps), and waiting for data in all; a
            # wait share well above the first batch means input-bound training.
            "first_batch_seconds": waits[0] if waits else 0.0, "input_wait_seconds": sum(waits),
            # CPU time of the training thread: well below (seconds - input wait), the worker lost its
            # core to other processes; above what a bare loop takes for the same steps, each step cost more.
            "loop_cpu_seconds": loop_cpu}


def _progress(checkpoint_dir: str | None) -> dict:
    """The progress record (history, sampled steps, restarts) of Ray Train's latest checkpoint, or a new one."""
    if checkpoint_dir is None:
        return {"history": [], "steps": [], "restarts": 0}
    with open(os.path.join(checkpoint_dir, PROGRESS_FILE)) as handle:
        progress = json.load(handle)
    return progress | {"restarts": progress["restarts"] + 1}


def _report(engine, run: TrainingRun, progress: dict) -> None:
    """Saves DeepSpeed state on every rank and the exported model on rank 0, then reports."""
    import ray.train
    from ray.train import Checkpoint

    state = full_state_dict(engine)  # collective under ZeRO-3: every rank calls it
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag="last")
        if rank == 0:
            save_model(os.path.join(directory, MODEL_FILE), state, run.model, run.layout)
            with open(os.path.join(directory, PROGRESS_FILE), "w") as handle:
                json.dump({"role": run.role, **progress}, handle)
        metrics = {k: v for k, v in progress["history"][-1].items() if v is not None}
        ray.train.report(metrics | {"restarts": progress["restarts"]}, checkpoint=Checkpoint.from_directory(directory))
