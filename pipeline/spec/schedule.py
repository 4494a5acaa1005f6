"""The `schedule` section: nightly re-distillation cycles, their cron, window, gate and registry."""

from __future__ import annotations

from typing import Literal

from croniter import croniter
from pydantic import Field, field_validator

from pipeline.spec.base import Section, time_zone


class GateSpec(Section):
    metric: Literal["auc", "gauc", "log_loss"] = "auc"
    max_regression: float = Field(0.0, ge=0, description="how much worse than the champion a challenger may be")
    max_ece: float | None = Field(None, gt=0, lt=1, description="a challenger whose (calibrated) ECE on the new day "
                                  "is above this is refused; with eval.calibration, a champion kept above it is "
                                  "recalibrated on the cycle's validation split")


class ScheduleSpec(Section):
    """Nightly re-distillation: when cycles fire, what they train on, and what may be promoted."""

    cron: str = "30 2 * * *"
    timezone: str = "UTC"
    window_days: int = Field(3, ge=1, description="train on this many days before the evaluated day")
    registry: str = Field(min_length=1, description="model registry root (local path or s3://)")
    model_name: str | None = Field(None, description="name in the registry (default: the job name)")
    gate: GateSpec = Field(default_factory=GateSpec)
    warm_start: bool = True
    keep_versions: int = Field(10, ge=1)
    keep_shard_days: int = Field(14, ge=1)
    max_catch_up: int = Field(3, ge=0)
    lock_ttl_minutes: int = Field(360, ge=1, description="a crashed cycle's lock expires after this")

    @field_validator("cron")
    @classmethod
    def _cron(cls, cron: str) -> str:
        if not croniter.is_valid(cron):
            raise ValueError(f"{cron!r} is not a cron expression; expected 5 fields, e.g. '30 2 * * *'")
        return cron

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, name: str) -> str:
        return time_zone(name)
