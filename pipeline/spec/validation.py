"""The validation split and early stopping: what models are chosen on, never the evaluation days."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.spec.base import Section


class ValidationSpec(Section):
    """Rows held out of training to choose on: the last training day(s), or a stable hash fraction."""

    days: int = Field(0, ge=0, description="the last N training days are the validation split")
    fraction: float = Field(0.0, ge=0, lt=1, description="or this fraction of rows, by a stable hash of `by`")
    by: str | None = Field(None, description="fraction: the column hashed (default: features.id, else features.group); "
                                               "a group column keeps each user's rows on one side")

    @model_validator(mode="after")
    def _one_way(self) -> ValidationSpec:
        if (self.days > 0) == (self.fraction > 0):
            raise ValueError("give validation.days (the last N training days) or validation.fraction (a hash "
                             f"fraction of rows), exactly one of them (got days {self.days}, fraction {self.fraction})")
        if self.by is not None and self.days:
            raise ValueError("validation.by picks the column a fraction split hashes; remove it with validation.days")
        return self


class EarlyStoppingSpec(Section):
    """Stop when the validation metric has not improved by `min_delta` for `patience` epochs; the best
    epoch's weights are the ones kept."""

    metric: Literal["auc", "log_loss", "accuracy"] = Field(
        "auc", description="auc (binary), accuracy (multiclass) or log_loss, on the validation split")
    patience: int = Field(1, ge=1)
    min_delta: float = Field(0.0, ge=0)

    @property
    def mode(self) -> str:
        return "min" if self.metric == "log_loss" else "max"
