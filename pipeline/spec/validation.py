"""The held-out rows: the validation split (what models are chosen on), the evaluation split by rows (what
they are scored on, when the eval days are training days too), and early stopping."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

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


class EvaluationSpec(Section):
    """Rows held out of everything but the evaluation: a stable hash fraction of the rows, never trained or
    chosen on, on any day; the evaluation stage scores only these rows of the eval days. For a log without
    days (one file), or to evaluate inside the training days."""

    fraction: float = Field(gt=0, lt=1, description="this fraction of rows, by a stable hash of `by`, is "
                            "evaluated on and never trained on")
    by: str | None = Field(None, description="the column hashed (default: features.id, else features.group); "
                                               "a group column keeps each user's rows on one side")


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


class DistillSearchSpec(Section):
    """Distillation settings chosen on validation: every combination of the lists is a candidate student
    (temperature applies to kd only), all trained in one pass; the hard-label student is always among them."""

    soft_loss: list[Literal["kd", "mse"]] = Field(["mse", "kd"], min_length=1)
    alpha: list[float] = Field([0.3, 0.7], min_length=1, description="weights of the hard-label loss, each in [0, 1)")
    temperature: list[float] = Field([1.0, 2.0], min_length=1, description="kd temperatures, each > 0")

    @field_validator("alpha")
    @classmethod
    def _alphas(cls, alphas: list[float]) -> list[float]:
        if any(not 0 <= a < 1 for a in alphas):
            raise ValueError(f"each alpha must be in [0, 1) (alpha 1 is the hard-label student, always a "
                             f"candidate), got {alphas}")
        return list(dict.fromkeys(alphas))

    @field_validator("temperature")
    @classmethod
    def _temperatures(cls, temperatures: list[float]) -> list[float]:
        if any(t <= 0 for t in temperatures):
            raise ValueError(f"each temperature must be > 0, got {temperatures}")
        return list(dict.fromkeys(temperatures))

    def candidates(self) -> list[dict]:
        """The grid: {soft_loss, alpha, temperature} per candidate (mse ignores the temperature)."""
        grid = []
        for loss in dict.fromkeys(self.soft_loss):
            for alpha in self.alpha:
                for temperature in (self.temperature if loss == "kd" else [1.0]):
                    grid.append({"soft_loss": loss, "alpha": alpha, "temperature": temperature})
        return grid
