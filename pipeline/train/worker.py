"""Training stage: one loop for the teacher and the students, on Ray Train `TorchTrainer` + DeepSpeed.

The driver side (`train_model`) builds the trainer; `train_loop_per_worker` runs in each worker:
it rebuilds the typed spec from a plain dict, wraps the model with `deepspeed.initialize` (ZeRO
stage and precision from the spec), streams batches with `iter_torch_batches`, and reports a
checkpoint (DeepSpeed state for resume + an exported `model.pt`) after every epoch. A trainer with
the same storage path and name resumes from its last checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline import losses, storage
from pipeline.features import FeatureLayout, table_to_inputs

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"
PROGRESS_FILE = "progress.json"
_END = object()  # the end of an iterator
# Seconds between Ray Train's checks on its workers (Ray's default: 2). The driver's value reaches the controller.
HEALTH_CHECK_ENV, HEALTH_CHECK_SECONDS = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


@dataclass
class TrainResult:
    model_path: str
    history: list[dict]  # one entry per epoch: rows, loss terms, rows/s
    steps: list[dict] = field(default_factory=list)  # sampled per optimizer step: lr and loss terms
    restarts: int = 0  # times the run resumed from a checkpoint (worker failure or a rerun)


def train_model(*, role: str, spec, model_config: dict, dataset, rows: int, distill: dict | None,
                epochs: int, lr: float, model_path: str, init_model: str | None = None,
                targets: dict | None = None) -> TrainResult:
    """Trains `model_config` on `dataset` (`rows` rows) and exports the final weights to `model_path`.

    Args:
        role: run name inside `<run_dir>/train/`, e.g. "teacher" or "student_distilled".
        distill: the spec's `distill` section as a dict to train on the teacher's soft labels too;
            None for hard labels only.
        targets: which teacher columns the shards hold (`soft_label_targets`); None for hard labels.
        init_model: a saved model of the same architecture to start from (warm start).
    """
    from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train_config = spec.train.model_dump() | {"epochs": epochs, "lr": lr}
    quick_health_checks()
    if warning := zero_stage_warning(spec.train.num_workers, spec.train.zero_stage):
        log.warning("%s: %s", role, warning)
    steps_per_epoch = math.ceil(rows / (spec.train.batch_size * spec.train.num_workers))
    # Local: an absolute path (Ray needs one). S3: the path inside our filesystem, which knows the endpoint.
    (storage_path,), storage_filesystem = storage.arrow_paths([storage.join(spec.run_dir, "train")])
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "role": role,
            "model": model_config,
            "layout": FeatureLayout.from_spec(spec.features).__dict__,
            "label": spec.features.label,
            "group": spec.features.group,
            "task": spec.features.task,
            "train": train_config,
            "total_steps": max(1, steps_per_epoch * epochs),
            "distill": distill,
            "targets": targets if distill else None,
            "init_model": init_model,
        },
        scaling_config=ScalingConfig(
            num_workers=spec.train.num_workers,
            use_gpu=spec.train.use_gpu,
            resources_per_worker={"CPU": spec.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=role,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
        ),
        datasets={"train": dataset},
        dataset_config=data_config(spec.train.num_workers),
    )
    result = trainer.fit()
    checkpoint: Checkpoint = result.checkpoint
    with checkpoint.as_directory() as directory:  # a local copy, downloaded when the checkpoint is on S3
        storage.atomic_write_bytes(model_path, open(os.path.join(directory, MODEL_FILE), "rb").read())
        progress = json.load(open(os.path.join(directory, PROGRESS_FILE)))
    return TrainResult(model_path=model_path, history=progress["history"], steps=progress.get("steps", []),
                       restarts=progress.get("restarts", 0))


def quick_health_checks() -> None:
    """Has Ray Train check on its workers every 0.5 s, unless the user set their own interval.

    Each step of a run (workers started, scheduled, finished) waits for the next check, so at Ray's 2 s a
    small student's training call spends 2-3 s of its 13-17 s waiting (2 cores, bench/RESULTS.md). A check
    is one small remote call per worker.
    """
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_SECONDS)


def zero_stage_warning(num_workers: int, zero_stage: int) -> str | None:
    """Why ZeRO stages 1-3 on a single worker only cost time, or None when they can pay off."""
    if num_workers > 1 or zero_stage == 0:
        return None
    return (f"train.zero_stage {zero_stage} with one worker: ZeRO splits optimizer state, gradients and "
            "(at stage 3) weights across workers, so one worker saves nothing and pays the bookkeeping "
            "(1-3 ms of CPU per step for the demo student at batch 4096 on 2 cores, bench/RESULTS.md); "
            "use zero_stage 0 unless train.num_workers grows")


def data_config(num_workers: int):
    """How Ray Train hands the dataset to the workers: split in equal parts when there are several.

    One worker reads the whole dataset through a plain iterator, which runs Ray Data's executor inside
    the worker. `streaming_split` would start a coordinator actor (a new process: 1-3 s before the first
    batch on 2 cores, in a loop of about 10 s per 4M rows) and send every block through it (a quarter
    of a core during the loop).
    """
    from ray.train import DataConfig

    return DataConfig(datasets_to_split="all" if num_workers > 1 else [])


def read_shards(files: list[str], filesystem, columns: list[str]):
    """A Ray Dataset over soft-label shard files named by the manifests, `columns` only."""
    from pipeline.data.clicklogs import read_named_files

    return read_named_files(files, filesystem).select_columns(columns)


def soft_label_targets(spec, hidden_dim: int | None = None) -> dict:
    """The teacher columns of the soft-label shards for this spec, and their shapes."""
    multiclass = spec.features.task == "multiclass"
    return {
        "task": spec.features.task,
        "logit": None if multiclass else "teacher_logit",
        "logits": "teacher_logits" if multiclass and not spec.label.top_k else None,
        "top_k": spec.label.top_k if multiclass else None,
        "hidden": "teacher_hidden" if spec.label.store_hidden and spec.distill.hint_weight > 0 else None,
        "hidden_dim": hidden_dim,
    }


def target_columns(targets: dict) -> list[str]:
    """The shard columns a distilled student reads for `targets` (see `soft_label_targets`)."""
    topk = ["teacher_topk_indices", "teacher_topk_values"] if targets["top_k"] else []
    return [c for c in (targets["logit"], targets["logits"], *topk, targets["hidden"]) if c]


def deepspeed_config(train: dict, world_size: int) -> dict:
    """DeepSpeed config from the spec's `train` section (plain dict), for `world_size` workers."""
    zero = {"stage": train["zero_stage"]}
    if world_size == 1 and zero["stage"] in (1, 2):
        # Contiguous gradients serve the reduce, and one worker has nothing to reduce. DeepSpeed would
        # still copy every gradient into a bucket that it frees and allocates again each step (5e8
        # elements, so always fresh pages from the OS): 120 page faults per step for the demo student.
        zero["contiguous_gradients"] = False
    return {
        "train_micro_batch_size_per_gpu": train["batch_size"],
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": train["precision"] == "bf16"},
        "fp16": {"enabled": train["precision"] == "fp16"},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,  # we log per step ourselves
        "wall_clock_breakdown": False,
    }


def adamw(params, train: dict) -> torch.optim.AdamW:
    """The optimizer every model trains with: AdamW with the spec's `train.lr` and `train.weight_decay`.

    Fused: one kernel per parameter per step, where the default runs about ten element-wise passes over it.
    For the demo student on 2 CPU cores that took 8-19% off a plain step at batch 4096, and 10-16% at 1024
    (`bench/train_throughput.py --step-costs`, bench/RESULTS.md). Torch has the fused kernel for CPU and CUDA.
    """
    return torch.optim.AdamW(params, lr=train["lr"], weight_decay=train["weight_decay"], fused=True)


def deepspeed_engine(module: torch.nn.Module, optimizer, scheduler, train: dict):
    """`deepspeed.initialize` with the spec's `train` section (torch.distributed set up, or its
    environment variables set, as Ray Train does)."""
    import deepspeed

    distributed = torch.distributed.is_initialized()
    world_size = torch.distributed.get_world_size() if distributed else int(os.environ.get("WORLD_SIZE", "1"))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(train, world_size))
    if world_size == 1 and engine.zero_optimization_stage() == 0:
        # One worker has nothing to average, but DeepSpeed would still flatten every gradient, all-reduce
        # it with itself and copy it back after each backward (about 5% of a CPU step in a profile).
        engine.enable_backward_allreduce = False
    return engine


def lr_lambda(schedule: dict, total_steps: int):
    """Multiplier of the base lr at optimizer step `step` (0-based), from the spec's `train.lr_schedule`.

    1) linear warmup from 0 over `warmup_steps`; 2) then constant, cosine or linear decay to
    `min_lr_ratio`, or step decay by `gamma` every `step_size` steps.
    """
    kind, warmup, floor = schedule["kind"], schedule["warmup_steps"], schedule["min_lr_ratio"]

    def multiplier(step: int) -> float:
        if kind == "step":
            return schedule["gamma"] ** (step // schedule["step_size"])
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "warmup_cosine" else 1.0 - progress
        return floor + (1.0 - floor) * decay

    return multiplier


class DistillModule(torch.nn.Module):
    """What DeepSpeed trains: the model, plus the hint projection (student hidden -> teacher hidden)
    when the hint loss is on. Only `model` is exported."""

    def __init__(self, model: torch.nn.Module, hint_dim: int | None):
        super().__init__()
        self.model = model
        self.projection = None
        if hint_dim:
            if not hasattr(model, "forward_with_hidden"):
                raise ValueError("distill.hint_weight > 0 needs a student with forward_with_hidden(inputs)")
            self.projection = torch.nn.Linear(model.hidden_dim, hint_dim)

    def forward(self, inputs: dict[str, torch.Tensor]):
        if self.projection is None:
            return self.model(inputs), None
        logits, hidden = self.model.forward_with_hidden(inputs)
        return logits, self.projection(hidden)  # (B,) or (B, C); (B, d_teacher)


class ShardCollate:
    """Arrow batch -> flat dict of tensors (model inputs, label, teacher targets) for `iter_torch_batches`."""

    def __init__(self, layout: FeatureLayout, label: str, targets: dict | None, group: str | None,
                 task: str = "binary"):
        self.layout, self.label, self.targets, self.group, self.task = layout, label, targets or {}, group, task

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        tensors = table_to_inputs(batch, self.layout)
        label = batch.column(self.label).to_numpy()
        tensors["label"] = torch.from_numpy(label.astype("int64" if self.task == "multiclass" else "float32"))
        t = self.targets
        if t.get("logit"):
            tensors["teacher_logit"] = torch.from_numpy(batch.column(t["logit"]).to_numpy().astype("float32"))
        if t.get("logits"):
            tensors["teacher_logits"] = _matrix(batch.column(t["logits"]), "float32")
        if t.get("top_k"):
            tensors["teacher_topk_indices"] = _matrix(batch.column("teacher_topk_indices"), "int64")
            tensors["teacher_topk_values"] = _matrix(batch.column("teacher_topk_values"), "float32")
        if t.get("hidden"):
            tensors["teacher_hidden"] = _matrix(batch.column(t["hidden"]), "float32")
        if self.group and self.group in batch.column_names:
            tensors["group"] = torch.from_numpy(batch.column(self.group).to_numpy().astype("int64"))
        return tensors


def _matrix(column, dtype: str) -> torch.Tensor:
    """A list column whose rows all have the same length -> (B, K) tensor, without per-row Python."""
    import pyarrow.compute as pc

    rows = len(column)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(dtype)
    return torch.from_numpy(values.reshape(rows, -1) if rows else values.reshape(0, 0))


def _arrow_collate(layout: FeatureLayout, label: str, targets: dict | None, group: str | None, task: str):
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _Collate(ArrowBatchCollateFn):  # Ray hands Arrow batches only to this subclass
        def __init__(self):
            super().__init__()
            self.inner = ShardCollate(layout, label, targets, group, task)

        def __call__(self, batch):
            return self.inner(batch)

    return _Collate()


def train_loop_per_worker(config: dict) -> None:
    """Runs in each Ray Train worker. `config` crossed a process boundary: rebuild typed parts first."""
    import ray.train

    from pipeline.models import build_model

    _skip_inference_comm_op()
    train, layout, distill = config["train"], FeatureLayout(**config["layout"]), config["distill"]
    targets = config["targets"]
    torch.manual_seed(train["seed"])
    torch.set_num_threads(max(1, int(train["cpus_per_worker"])))
    shard = ray.train.get_dataset_shard("train")
    listwise = distill is not None and distill["listwise_weight"] > 0
    collate = _arrow_collate(layout, config["label"], targets, config["group"] if listwise else None, config["task"])

    def epoch_batches(epoch: int):
        return shard.iter_torch_batches(
            batch_size=train["batch_size"], collate_fn=collate, prefetch_batches=train["prefetch_batches"],
            local_shuffle_buffer_size=train["shuffle_buffer_rows"] or None,
            local_shuffle_seed=train["seed"] + epoch if train["shuffle_buffer_rows"] else None,
        )

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as directory:
        progress = _progress(directory)
        start_epoch = len(progress["history"])
        # Ray Data's first batch takes seconds (read tasks, and with several workers a split coordinator,
        # start in new worker processes): ask for it now, so the wait overlaps building model and DeepSpeed.
        batches = _asked_early(epoch_batches(start_epoch)) if start_epoch < train["epochs"] else None
        model = build_model(config["model"], layout)
        if config.get("init_model") and checkpoint is None:  # a resumed run has newer weights
            from pipeline.models import load_model

            model.load_state_dict(load_model(config["init_model"])[0].state_dict())
        hint_dim = targets["hidden_dim"] if distill and distill["hint_weight"] > 0 else None
        module = DistillModule(model, hint_dim)
        optimizer = adamw(module.parameters(), train)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train["lr_schedule"], config["total_steps"]))
        engine = deepspeed_engine(module, optimizer, scheduler, train)
        if directory:  # weights, optimizer and lr schedule of the last finished epoch
            engine.load_checkpoint(directory)
            log.warning("resumed from the checkpoint after epoch %d (restart %d)", start_epoch, progress["restarts"])

    log_every = max(1, config["total_steps"] // 200)  # about 200 points per run for the loss curves
    for epoch in range(start_epoch, train["epochs"]):
        stats = _train_epoch(engine, batches, distill, config["task"], progress["steps"], log_every)
        progress["history"].append({"epoch": epoch + 1, **stats})
        if epoch + 1 < train["epochs"]:  # the next epoch's read starts while this one's checkpoint is saved
            batches = _asked_early(epoch_batches(epoch + 1))
        _report(engine, config, layout, progress)


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


def loss_terms(logits: torch.Tensor, hint_pred: torch.Tensor | None, batch: dict[str, torch.Tensor],
               distill: dict | None, task: str) -> dict[str, torch.Tensor]:
    """Every loss term of one batch and their weighted sum `loss`.

        loss = alpha * hard + (1 - alpha) * soft + hint_weight * hint + listwise_weight * listwise

    hard: BCE (binary) or cross-entropy (multiclass) on the labels; soft: tempered KD (`kd`) or logit
    matching (`mse`) against the teacher; hint: FitNets MSE to the teacher's hidden vector; listwise:
    softmax over each group's items in the batch. Without `distill` the loss is the hard term alone.
    """
    label = batch["label"]
    if task == "multiclass":
        hard = F.cross_entropy(logits, label)
    else:
        hard = F.binary_cross_entropy_with_logits(logits, label.to(logits.dtype))
    terms = {"hard_loss": hard}
    if distill is None:
        return terms | {"loss": hard}
    temperature, alpha = distill["temperature"], distill["alpha"]
    if task == "multiclass" and "teacher_topk_indices" in batch:
        soft = losses.topk_kd_loss(logits, batch["teacher_topk_indices"], batch["teacher_topk_values"], temperature)
    elif task == "multiclass" and distill["soft_loss"] == "mse":
        soft = F.mse_loss(logits, batch["teacher_logits"].to(logits.dtype))
    elif task == "multiclass":
        soft = losses.multiclass_kd_loss(logits, batch["teacher_logits"], temperature)
    elif distill["soft_loss"] == "mse":
        soft = losses.logit_mse_loss(logits, batch["teacher_logit"])
    else:
        soft = losses.binary_soft_loss(logits, batch["teacher_logit"], temperature)
    terms["soft_loss"] = soft
    loss = alpha * hard + (1.0 - alpha) * soft
    if hint_pred is not None:
        terms["hint_loss"] = F.mse_loss(hint_pred, batch["teacher_hidden"].to(hint_pred.dtype))
        loss = loss + distill["hint_weight"] * terms["hint_loss"]
    if distill["listwise_weight"] > 0 and task == "binary":
        terms["listwise_loss"] = losses.listwise_kd_loss(logits, batch["teacher_logit"], batch["group"], temperature)
        loss = loss + distill["listwise_weight"] * terms["listwise_loss"]
    return terms | {"loss": loss}


def _skip_inference_comm_op() -> None:
    """Stops DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op.

    That op serves only tensor-parallel *inference* (`inference_all_reduce`); training all-reduces
    through torch.distributed (gloo). Compiling it costs 1-2 minutes on 2 cores, and again whenever the
    virtual environment's path changes (a fresh clone), for nothing we use.
    """
    import importlib

    # By module name: the attribute `deepspeed.comm.torch` is the torch package, re-exported.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _train_epoch(engine, batches, distill: dict | None, task: str, steps: list[dict], log_every: int) -> dict:
    """One pass over this worker's shard; returns loss terms averaged over all workers' rows, and
    appends a sample of (step, lr, loss terms) to `steps` every `log_every` optimizer steps."""
    engine.train()
    names = ["loss", "hard_loss", "soft_loss", "hint_loss", "listwise_loss"]
    totals = torch.zeros(1 + len(names), dtype=torch.float64)  # rows, then row-weighted sums of each term
    seen: set[str] = set()
    waits = []  # seconds blocked on Ray Data before each step
    start = asked = time.perf_counter()
    cpu = time.thread_time()
    for batch in batches:
        waits.append(time.perf_counter() - asked)
        inputs = {k: v.to(engine.device) for k, v in batch.items()}
        logits, hint_pred = engine(inputs)
        terms = loss_terms(logits.float(), None if hint_pred is None else hint_pred.float(), inputs, distill, task)
        engine.backward(terms["loss"])
        engine.step()  # also steps the lr scheduler
        rows = float(len(logits))
        values = {k: v.item() for k, v in terms.items()}
        seen |= set(values)
        totals += torch.tensor([rows] + [rows * values.get(n, 0.0) for n in names], dtype=torch.float64)
        if engine.global_steps % log_every == 0:
            steps.append({"step": engine.global_steps, "lr": engine.get_lr()[0], **values})
        asked = time.perf_counter()
    seconds = time.perf_counter() - start
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    rows = max(totals[0].item(), 1.0)
    averages = {n: totals[1 + i].item() / rows if n in seen | {"loss", "hard_loss"} else None
                for i, n in enumerate(names)}
    return {"rows": int(totals[0].item()), **averages, "seconds": seconds,
            "rows_per_s": totals[0].item() / max(seconds, 1e-9),
            # Where the epoch went on this worker: waiting for the first batch (pipeline start-up; in a run's
            # first epoch only what is left after the set-up it overlaps), and waiting for data in all; a
            # wait share well above the first batch means input-bound training.
            "first_batch_seconds": waits[0] if waits else 0.0, "input_wait_seconds": sum(waits),
            # CPU time of the training thread: well below (seconds - input wait), the worker lost its
            # core to other processes; above what a bare loop takes for the same steps, each step cost more.
            "loop_cpu_seconds": time.thread_time() - cpu}


def _progress(checkpoint_dir: str | None) -> dict:
    """The progress record (history, sampled steps, restarts) of Ray Train's latest checkpoint, or a new one."""
    if checkpoint_dir is None:
        return {"history": [], "steps": [], "restarts": 0}
    progress = json.load(open(os.path.join(checkpoint_dir, PROGRESS_FILE)))
    progress["restarts"] = progress.get("restarts", 0) + 1
    progress.setdefault("steps", [])
    return progress


def _report(engine, config: dict, layout: FeatureLayout, progress: dict) -> None:
    """Saves DeepSpeed state on every rank and the exported model on rank 0, then reports."""
    import ray.train
    from ray.train import Checkpoint

    from pipeline.models import save_model

    state = _full_state_dict(engine)  # collective under ZeRO-3: every rank calls it
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag="last")
        if rank == 0:
            save_model(os.path.join(directory, MODEL_FILE), state, config["model"], layout)
            with open(os.path.join(directory, PROGRESS_FILE), "w") as handle:
                json.dump({"role": config["role"], **progress}, handle)
        metrics = {k: v for k, v in progress["history"][-1].items() if v is not None}
        ray.train.report(metrics | {"restarts": progress["restarts"]}, checkpoint=Checkpoint.from_directory(directory))


def _full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Float32 weights of the exported model (without the hint projection), gathering ZeRO-3 partitions."""
    import deepspeed

    module = engine.module.model
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().clone() if v.is_floating_point() else v for k, v in module.state_dict().items()}
