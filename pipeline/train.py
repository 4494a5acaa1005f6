"""Training stage: one loop for the teacher and the students, on Ray Train `TorchTrainer` + DeepSpeed.

The driver side (`train_model`) builds the trainer; `train_loop_per_worker` runs in each worker:
it rebuilds the typed spec from a plain dict, wraps the model with `deepspeed.initialize` (ZeRO
stage and precision from the spec), streams batches with `iter_torch_batches`, and reports a
checkpoint (DeepSpeed state for resume + an exported `model.pt`) after every epoch. A trainer with
the same storage path and name resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from pipeline import storage
from pipeline.features import FeatureLayout, table_to_inputs
from pipeline.losses import binary_kd_loss

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"
PROGRESS_FILE = "progress.json"


@dataclass
class TrainResult:
    model_path: str
    history: list[dict]


def train_model(*, role: str, spec, model_config: dict, dataset, distill: dict | None,
                epochs: int, lr: float, model_path: str, init_model: str | None = None) -> TrainResult:
    """Trains `model_config` on `dataset` and exports the final weights to `model_path`.

    Args:
        role: run name inside `<run_dir>/train/`, e.g. "teacher" or "student_distilled".
        distill: {"alpha", "temperature"} to train on `teacher_logit` too; None for hard labels only.
        init_model: a saved model of the same architecture to start from (warm start).
    """
    from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train_config = spec.train.model_dump() | {"epochs": epochs, "lr": lr}
    # Local: an absolute path (Ray needs one). S3: the path inside our filesystem, which knows the endpoint.
    (storage_path,), storage_filesystem = storage.arrow_paths([storage.join(spec.run_dir, "train")])
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "role": role,
            "model": model_config,
            "layout": FeatureLayout.from_spec(spec.features).__dict__,
            "label": spec.features.label,
            "train": train_config,
            "distill": distill,
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
    )
    result = trainer.fit()
    checkpoint: Checkpoint = result.checkpoint
    with checkpoint.as_directory() as directory:  # a local copy, downloaded when the checkpoint is on S3
        storage.atomic_write_bytes(model_path, open(os.path.join(directory, MODEL_FILE), "rb").read())
        history = json.load(open(os.path.join(directory, PROGRESS_FILE)))["history"]
    return TrainResult(model_path=model_path, history=history)


def deepspeed_config(train: dict) -> dict:
    """DeepSpeed config from the spec's `train` section (plain dict)."""
    return {
        "train_micro_batch_size_per_gpu": train["batch_size"],
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": train["zero_stage"]},
        "bf16": {"enabled": train["precision"] == "bf16"},
        "fp16": {"enabled": train["precision"] == "fp16"},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,  # we log per epoch ourselves
        "wall_clock_breakdown": False,
    }


class ShardCollate:
    """Arrow batch -> flat dict of tensors (model inputs, label, teacher_logit) for `iter_torch_batches`."""

    def __init__(self, layout: FeatureLayout, label: str, with_teacher: bool):
        self.layout, self.label, self.with_teacher = layout, label, with_teacher

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        tensors = table_to_inputs(batch, self.layout)
        tensors["label"] = torch.from_numpy(batch.column(self.label).to_numpy().astype("float32"))
        if self.with_teacher:
            logits = batch.column("teacher_logit").to_numpy().astype("float32")
            tensors["teacher_logit"] = torch.from_numpy(logits)
        return tensors


def _arrow_collate(layout: FeatureLayout, label: str, with_teacher: bool):
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _Collate(ArrowBatchCollateFn):  # Ray hands Arrow batches only to this subclass
        def __init__(self):
            super().__init__()
            self.inner = ShardCollate(layout, label, with_teacher)

        def __call__(self, batch):
            return self.inner(batch)

    return _Collate()


def train_loop_per_worker(config: dict) -> None:
    """Runs in each Ray Train worker. `config` crossed a process boundary: rebuild typed parts first."""
    import deepspeed
    import ray.train

    from pipeline.models import build_model

    _skip_inference_comm_op()
    train, layout, distill = config["train"], FeatureLayout(**config["layout"]), config["distill"]
    torch.manual_seed(train["seed"])
    torch.set_num_threads(max(1, int(train["cpus_per_worker"])))

    model = build_model(config["model"], layout)
    if config.get("init_model") and ray.train.get_checkpoint() is None:  # a resumed run has newer weights
        from pipeline.models import load_model

        model.load_state_dict(load_model(config["init_model"])[0].state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(train))
    start_epoch, history = _restore(engine)

    shard = ray.train.get_dataset_shard("train")
    collate = _arrow_collate(layout, config["label"], with_teacher=distill is not None)
    for epoch in range(start_epoch, train["epochs"]):
        batches = shard.iter_torch_batches(
            batch_size=train["batch_size"], collate_fn=collate, prefetch_batches=2,
            local_shuffle_buffer_size=train["shuffle_buffer_rows"] or None,
            local_shuffle_seed=train["seed"] + epoch if train["shuffle_buffer_rows"] else None,
        )
        stats = _train_epoch(engine, batches, distill)
        history.append({"epoch": epoch + 1, **stats})
        _report(engine, config, layout, history)


def _skip_inference_comm_op() -> None:
    """Stops DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op.

    That op serves only tensor-parallel *inference* (`inference_all_reduce`); training all-reduces
    through torch.distributed (gloo). Compiling it costs 1-2 minutes on 2 cores, and again whenever the
    virtual environment's path changes (a fresh clone), for nothing we use.
    """
    import importlib

    # By module name: the attribute `deepspeed.comm.torch` is the torch package, re-exported.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _train_epoch(engine, batches, distill: dict | None) -> dict:
    """One pass over this worker's shard; returns loss terms averaged over all workers' rows."""
    engine.train()
    alpha = distill["alpha"] if distill else 1.0
    temperature = distill["temperature"] if distill else 1.0
    totals = torch.zeros(4, dtype=torch.float64)  # rows, loss, hard, soft (row-weighted sums)
    start = time.perf_counter()
    for batch in batches:
        inputs = {k: v.to(engine.device) for k, v in batch.items()}
        logits = engine(inputs).float()  # (B,)
        teacher = inputs.get("teacher_logit", logits.detach())
        losses = binary_kd_loss(logits, teacher, inputs["label"], alpha=alpha, temperature=temperature)
        engine.backward(losses["loss"])
        engine.step()
        rows = float(len(logits))
        totals += torch.tensor([rows, rows * losses["loss"].item(), rows * losses["hard"].item(),
                                rows * losses["soft"].item()], dtype=torch.float64)
    seconds = time.perf_counter() - start
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    rows = max(totals[0].item(), 1.0)
    return {"rows": int(totals[0].item()), "loss": totals[1].item() / rows, "hard_loss": totals[2].item() / rows,
            "soft_loss": totals[3].item() / rows if distill else None, "seconds": seconds,
            "rows_per_s": totals[0].item() / max(seconds, 1e-9)}


def _restore(engine) -> tuple[int, list[dict]]:
    """Resumes DeepSpeed state (weights, optimizer) from Ray Train's latest checkpoint, if any."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as directory:
        engine.load_checkpoint(directory)
        progress = json.load(open(os.path.join(directory, PROGRESS_FILE)))
    log.info("resumed from epoch %d", len(progress["history"]))
    return len(progress["history"]), progress["history"]


def _report(engine, config: dict, layout: FeatureLayout, history: list[dict]) -> None:
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
                json.dump({"role": config["role"], "history": history}, handle)
        metrics = {k: v for k, v in history[-1].items() if v is not None}
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))


def _full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Float32 weights of the whole model, gathering ZeRO-3 partitions when needed."""
    import deepspeed

    module = engine.module
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().clone() if v.is_floating_point() else v for k, v in module.state_dict().items()}
