"""The training loop that runs in each Ray Train worker, for the one or more models of a pass.

The driver sends each model's `TrainingRun.to_config()` (plain dicts); the worker's first line rebuilds
them. Each model gets its own DeepSpeed engine (`engine.py`); the loop streams batches once with
`iter_torch_batches`, steps every model on each, and reports a checkpoint (per model: DeepSpeed state for
resume and the exported `model.pt`) after every epoch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time

import numpy as np
import torch

from pipeline import losses, metrics, runtime
from pipeline.models import build_model, load_model, save_model
from pipeline.shards import ShardCollate
from pipeline.train.batches import arrow_collate, asked_early, epoch_batches
from pipeline.train.plan import TrainingRun
from pipeline.train.engine import DistillModule, adamw, deepspeed_engine, full_state_dict, lr_lambda

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"
PROGRESS_FILE = "progress.json"
TERMS = ("loss", "hard_loss", "soft_loss", "hint_loss", "listwise_loss")  # what an epoch's history averages


def train_loop_per_worker(config: dict) -> None:
    """Runs in each Ray Train worker: every model of the pass reads the same batches (one read of the data),
    each with its own DeepSpeed engine, optimizer, loss and epochs. Resumes from Ray Train's latest
    checkpoint, if any, then trains the remaining epochs and reports a checkpoint after each."""
    import ray.train  # lazy: this module is imported by the driver too, before Ray starts

    runs = [TrainingRun.from_config(c) for c in config["runs"]]
    lead = runs[0].train  # the data settings every model of a pass shares (the driver checks)
    runtime.skip_deepspeed_inference_op()
    runtime.quiet_training_worker()
    torch.set_num_threads(max(1, int(lead.cpus_per_worker)))
    batches_for = epoch_batches(runs, ray.train.get_dataset_shard("train"))
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as directory:
        progress = _progress(directory, runs)
        members = [Member(run, progress["models"][run.role]) for run in runs]
        start_epoch = progress["epochs"]
        # Ray Data's first batch takes seconds (read tasks, and with several workers a split coordinator,
        # start in new worker processes): ask for it now, so the wait overlaps building models and DeepSpeed.
        batches = asked_early(batches_for(start_epoch)) if _training(members, start_epoch) else None
        for member in members:
            member.build(directory)
        if directory:
            log.warning("resumed from the checkpoint after epoch %d (restart %d)", start_epoch, progress["restarts"])
    validation = ray.train.get_dataset_shard("validation") if runs[0].validate else None
    epoch = start_epoch
    while active := _training(members, epoch):
        stats = _train_epoch(active, batches)
        scores = _validation_metrics(active, validation) if validation is not None else {}
        for member in active:
            member.history.append({"epoch": epoch + 1, **stats[member.run.role], **scores.get(member.run.role, {})})
        epoch = progress["epochs"] = epoch + 1
        if _training(members, epoch):  # the next epoch's read starts while this one's checkpoint is saved
            batches = asked_early(batches_for(epoch))
        _report(members, active, progress)


class Member:
    """One model of a pass: its plan, DeepSpeed engine, history, and its own torch RNG stream, so that its
    initial weights and dropout draws are those of a run of its own with the same seed."""

    def __init__(self, run: TrainingRun, record: dict):
        self.run, self.history, self.steps = run, record["history"], record["steps"]
        self.log_every = max(1, run.total_steps // 200)  # about 200 points per run for the loss curves
        self.engine = self.rng = None

    def build(self, checkpoint_dir: str | None) -> None:
        torch.manual_seed(self.run.train.seed)
        self.engine = _engine(self.run, resumed=checkpoint_dir is not None)
        if checkpoint_dir:  # weights, optimizer and lr schedule of the last finished epoch
            self.engine.load_checkpoint(os.path.join(checkpoint_dir, self.run.role))
        self.rng = torch.get_rng_state()

    def active(self, epoch: int) -> bool:
        return epoch < self.run.train.epochs and not _stopped_early(self.history, self.run.train.early_stopping)

    @contextlib.contextmanager
    def own_rng(self):
        torch.set_rng_state(self.rng)
        yield
        self.rng = torch.get_rng_state()


def _training(members: list[Member], epoch: int) -> list[Member]:
    """The models that train in `epoch`: not past their epochs and not stopped early."""
    return [m for m in members if m.active(epoch)]


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


def _validation_metrics(members: list[Member], shard) -> dict[str, dict]:
    """{role: val_auc (or val_accuracy), val_log_loss, val_rows} of each model on the whole validation split,
    read once for all of them.

    Every worker scores every validation row (the split is not sharded: under ZeRO-3 each forward needs
    all ranks), and rank 0's numbers are the ones every rank uses, so all ranks stop together.
    """
    lead = members[0].run
    collate = arrow_collate(ShardCollate(lead.layout, lead.label, None, None, lead.task))
    labels, logits = [], {m.run.role: [] for m in members}
    for member in members:
        member.engine.eval()
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=lead.train.batch_size, collate_fn=collate):
            labels.append(batch["label"].numpy())
            for member in members:
                out, _ = member.engine({k: v.to(member.engine.device) for k, v in batch.items()})
                logits[member.run.role].append(out.float().cpu().numpy())
    y = np.concatenate(labels)
    return {role: _scores(y, np.concatenate(z), lead.task) for role, z in logits.items()}


def _scores(y: np.ndarray, z: np.ndarray, task: str) -> dict:
    if task == "multiclass":
        scores = metrics.multiclass_metrics(y, z)
        values = torch.tensor([scores["accuracy"], scores["log_loss"]], dtype=torch.float64)
        names = ("val_accuracy", "val_log_loss")
    else:
        values = torch.tensor([metrics.auc(y, z), metrics.log_loss(y, z)], dtype=torch.float64)
        names = ("val_auc", "val_log_loss")
    if torch.distributed.is_initialized():
        values = _collective(torch.distributed.broadcast, values, src=0)
    counts = {"val_rows": int(len(y))} | ({"val_positives": int(y.sum())} if task != "multiclass" else {})
    return dict(zip(names, values.tolist())) | counts


def _collective(op, tensor: torch.Tensor, **kwargs) -> torch.Tensor:
    """Runs a collective on a CPU tensor, through the GPU when the process group is NCCL's (which moves
    only CUDA tensors; gloo moves CPU ones); returns the result on the CPU."""
    if torch.distributed.get_backend() != "nccl":
        op(tensor, **kwargs)
        return tensor
    import ray.train.torch

    on_gpu = tensor.to(ray.train.torch.get_device())
    op(on_gpu, **kwargs)
    return on_gpu.cpu()


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


def _train_epoch(members: list[Member], batches) -> dict[str, dict]:
    """One pass over this worker's shard, every model stepping on each batch; returns {role: loss terms
    averaged over all workers' rows, and where the time went}, and appends a sample of (step, lr, loss
    terms) to each model's steps every `log_every` optimizer steps."""
    for member in members:
        member.engine.train()
    totals = {m.run.role: torch.zeros(1 + len(TERMS), dtype=torch.float64) for m in members}  # rows, term sums
    seen: dict[str, set[str]] = {m.run.role: {"loss", "hard_loss"} for m in members}  # the terms each model has
    waits = []  # seconds blocked on Ray Data before each batch
    start = asked = time.perf_counter()
    cpu = time.thread_time()
    for batch in batches:
        waits.append(time.perf_counter() - asked)
        for member in members:
            with member.own_rng():
                values = _step(member, batch)
            seen[member.run.role] |= set(values)
            rows = float(len(batch["label"]))
            totals[member.run.role] += torch.tensor([rows] + [rows * values.get(n, 0.0) for n in TERMS],
                                                    dtype=torch.float64)
        asked = time.perf_counter()
    timing = {"seconds": time.perf_counter() - start, "waits": waits, "loop_cpu": time.thread_time() - cpu}
    return {role: _epoch_stats(total, seen[role], **timing) for role, total in totals.items()}


def _step(member: Member, batch: dict) -> dict[str, float]:
    """One optimizer step of one model on one batch; its loss terms."""
    run, engine = member.run, member.engine
    inputs = {k: v.to(engine.device) for k, v in batch.items()}
    logits, hint_pred = engine(inputs)
    terms = losses.distillation_loss(logits.float(), inputs, run.distill, run.task,
                                     None if hint_pred is None else hint_pred.float())
    engine.backward(terms["loss"])
    engine.step()  # also steps the lr scheduler
    values = {k: v.item() for k, v in terms.items()}
    if engine.global_steps % member.log_every == 0:
        member.steps.append({"step": engine.global_steps, "lr": engine.get_lr()[0], **values})
    return values


def _epoch_stats(totals: torch.Tensor, seen: set[str], *, seconds: float, waits: list[float],
                 loop_cpu: float) -> dict:
    """An epoch's history entry: loss terms averaged over every worker's rows, and where the time went."""
    if torch.distributed.is_initialized():
        totals = _collective(torch.distributed.all_reduce, totals)
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


def _progress(checkpoint_dir: str | None, runs: list[TrainingRun]) -> dict:
    """The progress record of Ray Train's latest checkpoint (epochs done, restarts, and each model's
    history and sampled steps), or a new one."""
    if checkpoint_dir is None:
        return {"epochs": 0, "restarts": 0, "models": {r.role: {"history": [], "steps": []} for r in runs}}
    with open(os.path.join(checkpoint_dir, PROGRESS_FILE)) as handle:
        progress = json.load(handle)
    return progress | {"restarts": progress["restarts"] + 1}


def _report(members: list[Member], trained: list[Member], progress: dict) -> None:
    """Saves every model's DeepSpeed state on every rank and its exported model on rank 0 (`<role>/`), then
    reports the metrics of the models trained this epoch as `<role>/<metric>`."""
    import ray.train
    from ray.train import Checkpoint

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as directory:
        for member in members:
            state = full_state_dict(member.engine)  # collective under ZeRO-3: every rank calls it
            folder = os.path.join(directory, member.run.role)
            member.engine.save_checkpoint(folder, tag="last")
            if rank == 0:
                save_model(os.path.join(folder, MODEL_FILE), state, member.run.model, member.run.layout)
        if rank == 0:
            models = {m.run.role: {"history": m.history, "steps": m.steps} for m in members}
            with open(os.path.join(directory, PROGRESS_FILE), "w") as handle:
                json.dump(progress | {"models": models}, handle)
        reported = {f"{m.run.role}/{k}": v for m in trained for k, v in m.history[-1].items() if v is not None}
        ray.train.report(reported | {"epoch": progress["epochs"], "restarts": progress["restarts"]},
                         checkpoint=Checkpoint.from_directory(directory))
