"""The training engine: DeepSpeed's config, the optimizer, the learning-rate schedule, and the module
DeepSpeed trains. Runs inside Ray Train workers; pure torch/DeepSpeed, no Ray."""

from __future__ import annotations

import math
import os

import torch

from pipeline import runtime
from pipeline.spec import LRScheduleSpec, TrainSpec


def deepspeed_config(train: TrainSpec, world_size: int) -> dict:
    """DeepSpeed config from the spec's `train` section, for `world_size` workers."""
    zero = {"stage": train.zero_stage}
    if world_size == 1 and zero["stage"] in (1, 2):
        # Contiguous gradients serve the reduce, and one worker has nothing to reduce. DeepSpeed would
        # still copy every gradient into a bucket that it frees and allocates again each step (5e8
        # elements, so always fresh pages from the OS; docs/SCALING.md).
        zero["contiguous_gradients"] = False
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,  # we log per step ourselves
        "wall_clock_breakdown": False,
    }


def adamw(params, train: TrainSpec) -> torch.optim.AdamW:
    """The optimizer every model trains with: AdamW with the spec's `train.lr` and `train.weight_decay`.

    Fused: one kernel per parameter per step, where the default runs about ten element-wise passes over
    it (measured in docs/SCALING.md). Torch has the fused kernel for CPU and CUDA.
    """
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=True)


def deepspeed_engine(module: torch.nn.Module, optimizer, scheduler, train: TrainSpec):
    """`deepspeed.initialize` with the spec's `train` section (torch.distributed set up, or its
    environment variables set, as Ray Train does)."""
    import deepspeed  # lazy: seconds to import, and only training workers need it

    distributed = torch.distributed.is_initialized()
    world_size = torch.distributed.get_world_size() if distributed else int(os.environ.get("WORLD_SIZE", "1"))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(train, world_size))
    runtime.skip_one_worker_allreduce(engine, world_size)
    return engine


def lr_lambda(schedule: LRScheduleSpec, total_steps: int):
    """Multiplier of the base lr at optimizer step `step` (0-based), from the spec's `train.lr_schedule`.

    1) linear warmup from 0 over `warmup_steps`; 2) then constant, cosine or linear decay to
    `min_lr_ratio`, or step decay by `gamma` every `step_size` steps.
    """
    kind, warmup, floor = schedule.kind, schedule.warmup_steps, schedule.min_lr_ratio

    def multiplier(step: int) -> float:
        if kind == "step":
            return schedule.gamma ** (step // schedule.step_size)
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


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Float32 weights of the exported model (without the hint projection), gathering ZeRO-3 partitions."""
    import deepspeed

    module = engine.module.model
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().clone() if v.is_floating_point() else v for k, v in module.state_dict().items()}
