"""`teacher.search`: a Ray Tune search over the teacher's settings, ranked on the validation split.

Pure spec: the space is plain data (`{choice: [...]}`, `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`,
`{randint: [lo, hi]}`); pipeline/stages/search.py maps it onto `tune.choice`, `tune.uniform`, ... .
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.spec.base import Section

# Searchable fields and the kinds of entry each takes: families and layer lists are picked from a list,
# integers may be drawn from an inclusive range, floats from a uniform or log-uniform one.
_CHOICE, _INT, _FLOAT = ("choice",), ("choice", "randint"), ("choice", "uniform", "loguniform")
SEARCHABLE = {"model": _CHOICE, "hidden": _CHOICE, "embedding_dim": _INT, "hash_buckets": _INT,
              "cross_layers": _INT, "dropout": _FLOAT, "lr": _FLOAT, "weight_decay": _FLOAT}
KINDS = ("choice", "uniform", "loguniform", "randint")
LIST_FIELDS = ("hidden",)  # list-valued fields (layer widths)
TRAIN_FIELDS = ("weight_decay",)  # searched fields of the train section (the rest are the teacher section's)
DEFAULT_SPACE = {
    "model": {"choice": ["dcn_v2", "deepfm"]},
    "embedding_dim": {"choice": [8, 16, 32]},
    "hash_buckets": {"choice": [10_000, 20_000, 50_000]},
    "hidden": {"choice": [[128, 64], [256, 128], [512, 256]]},
    "cross_layers": {"randint": [1, 4]},  # read by dcn_v2 only
    "dropout": {"uniform": [0.0, 0.3]},
    "lr": {"loguniform": [3e-4, 1e-2]},
    "weight_decay": {"choice": [0.0, 0.1, 1.0]},  # AdamW's decay is scaled by lr: smaller values do nothing
}


class SpaceEntry(Section):
    """One searched field: exactly one of a list to choose from or a [lo, hi] range."""

    choice: list[Any] | None = Field(None, description="values to pick from")
    uniform: tuple[float, float] | None = Field(None, description="[lo, hi], uniform")
    loguniform: tuple[float, float] | None = Field(None, description="[lo, hi], uniform in log space; lo > 0")
    randint: tuple[int, int] | None = Field(None, description="[lo, hi], an integer, both ends included")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any]:
        return list(getattr(self, self.kind))

    @model_validator(mode="before")
    @classmethod
    def _known_kind(cls, raw: Any) -> Any:
        unknown = sorted(set(raw) - set(KINDS)) if isinstance(raw, dict) else []
        if unknown:  # said here: the generic unknown-key message cannot list a dict entry's keys
            raise ValueError(f"unknown kind {unknown[0]!r}; give one of {', '.join(KINDS)}, e.g. {{choice: [8, 16]}}")
        return raw

    @model_validator(mode="after")
    def _one_kind(self) -> SpaceEntry:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform, randint (got {given or 'none'})")
        if self.choice is not None and not self.choice:
            raise ValueError("the choice list is empty; list at least one value")
        if self.kind != "choice" and not self.values[0] < self.values[1]:
            raise ValueError(f"{self.kind} [lo, hi] needs lo < hi (got {self.values}); for one value use choice")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs lo > 0 (got {self.loguniform[0]}); use uniform to include 0")
        return self


class TeacherSearchSpec(Section):
    """Trials of the teacher with settings drawn from `space`; ASHA stops the weak ones after `grace_epochs`.

    The first trial is the teacher section as written, so the search can only improve on it. The best
    trial's model is the run's teacher; `<run>/search/best.json` holds its settings, and a later job trains
    with them, without searching, through `search: {reuse: <run>/search/best.json}`.
    """

    trials: int = Field(8, ge=1, description="trials in all, the teacher section as written first")
    max_concurrent_trials: int = Field(1, ge=1, description="trials training at once (fewer if the cluster's "
                                                            "CPUs cannot hold them)")
    time_budget_s: float | None = Field(None, gt=0, description="stop the search after this many seconds")
    metric: Literal["auc", "log_loss", "accuracy"] | None = Field(
        None, description="ranks trials on validation (default: auc, or accuracy for multiclass)")
    grace_epochs: int = Field(1, ge=1, description="epochs every trial trains before ASHA may stop it")
    space: dict[str, SpaceEntry] = Field(default_factory=lambda: dict(DEFAULT_SPACE),
                                         description="the searched fields (default: DEFAULT_SPACE)")
    reuse: str | None = Field(None, min_length=1, description="a best.json of an earlier search: train the "
                                                              "teacher with its settings, searching nothing")

    @field_validator("space")
    @classmethod
    def _known_fields(cls, space: dict[str, SpaceEntry]) -> dict[str, SpaceEntry]:
        if not space:
            raise ValueError("the space is empty; name the fields to search, or remove space for the default")
        for key, entry in space.items():
            if key not in SEARCHABLE:
                raise ValueError(f"unknown space key {key!r}; searchable fields: {', '.join(SEARCHABLE)}")
            if entry.kind not in SEARCHABLE[key]:
                raise ValueError(f"{key} takes {' or '.join(SEARCHABLE[key])}, not {entry.kind}")
            for value in entry.values:  # every choice, or the two ends of a range
                if problem := _invalid(key, value):
                    raise ValueError(f"{key} {value!r} is not valid: {problem}")
        return space

    @model_validator(mode="after")
    def _reuse_alone(self) -> TeacherSearchSpec:
        others = sorted(self.model_fields_set - {"reuse"})
        if self.reuse is not None and others:
            raise ValueError(f"search.reuse trains with an earlier search's settings, so {others} would not be "
                             "read; remove them, or remove reuse to search again")
        return self

    def validation_metric(self, task: str) -> str:
        """The reported metric trials are ranked on, e.g. `val_auc`."""
        return f"val_{self.metric or ('accuracy' if task == 'multiclass' else 'auc')}"

    @property
    def mode(self) -> str:
        return "min" if self.metric == "log_loss" else "max"


def _invalid(key: str, value: Any) -> str | None:
    """Why `value` is not a valid `key` of the teacher (or train) section, or None when it is."""
    from pydantic import ValidationError

    from pipeline.spec.models import TEACHER_MODELS, TeacherSpec  # lazy: models.py imports this module
    from pipeline.spec.sections import TrainSpec

    if key == "model" and value == "custom":
        return f"a custom teacher is not searched over; choose among {[m for m in TEACHER_MODELS if m != 'custom']}"
    try:
        (TrainSpec if key in TRAIN_FIELDS else TeacherSpec).model_validate({key: value})
    except ValidationError as exc:
        return exc.errors()[0]["msg"].removeprefix("Value error, ")
    return None


def search_problem(spec) -> str | None:
    """What is wrong with the spec's teacher searches given the rest of the job, or None.

    These rules span sections (`data.validation`, `teacher.checkpoint`, the epochs), so a `TeacherSpec`
    alone cannot check them; the teacher stage raises them as a `SpecError` before any training.
    """
    for teacher in spec.teacher:
        search = teacher.search
        if search is None:
            continue
        if teacher.checkpoint:
            return "teacher.search trains the teacher, teacher.checkpoint gives one: remove one of them"
        if search.reuse is not None:
            continue
        if spec.data.validation is None:
            return ("teacher.search ranks trials on the validation split, never on the eval days: add "
                    "data.validation (e.g. {fraction: 0.1})")
        if search.metric not in (None, "log_loss") and search.metric != spec.selection_metric:
            return (f"teacher.search.metric {search.metric!r} does not exist for task {spec.features.task!r}; "
                    f"use {spec.selection_metric!r} or 'log_loss'")
        epochs = teacher.epochs or spec.train.epochs
        if search.grace_epochs > epochs:
            return (f"teacher.search.grace_epochs {search.grace_epochs} is more than the teacher's {epochs} "
                    "epoch(s); lower it, or raise teacher.epochs")
    return None
