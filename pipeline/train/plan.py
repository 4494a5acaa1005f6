"""`TrainingRun`: the typed plan of one model's training, as the driver builds it and the workers receive it.

It crosses to the workers as `to_config()` (plain dicts: `model_dump()`s of the spec's sections) and is
rebuilt on the worker's first line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pipeline.features import FeatureLayout
from pipeline.models import ModelConfig
from pipeline.shards import SoftLabelTargets
from pipeline.spec import DistillSpec, TrainSpec


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
