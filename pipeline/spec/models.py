"""Model sections: the teacher(s) and the student, each a CTR model family chosen by short name."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.models.config import ModelConfig
from pipeline.spec.base import Section
from pipeline.spec.search import TeacherSearchSpec
from pipeline.spec.sections import SequenceSpec

TEACHER_MODELS = ("dcn_v2", "deepfm", "bst", "custom")
STUDENT_MODELS = ("mlp", "fm", "dcn_v2", "custom")
_DEFAULT = ModelConfig(model="default")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
AUTO = "auto"  # hash_buckets sized from the click-log profile (pipeline/stages/profile.py)
OTHER_FIELDS = "default"  # the per-field form's key for every field it does not name
MIN_BUCKETS = 16
Buckets = int | Literal["auto"]


def _known_model(name: str, known: tuple[str, ...], role: str) -> str:
    if name not in known:
        raise ValueError(f"unknown {role} model {name!r}; choose one of {list(known)}")
    return name


class ModelSpec(Section):
    """A CTR model: family by short name plus its size. Embeddings dominate CTR model size, so
    `embedding_dim` and `hash_buckets` are the first knobs of compression."""

    model: str
    factory: str | None = Field(None, description="model: custom only; 'package.module:function' building it")
    factory_args: dict[str, Any] = Field({}, description="keyword arguments for the factory")
    # Defaults are ModelConfig's, so a checkpoint and a spec that omit a field mean the same model.
    embedding_dim: int = Field(_DEFAULT.embedding_dim, ge=1, le=1024)
    hash_buckets: Buckets | dict[str, Buckets] = Field(
        _DEFAULT.hash_buckets, description="embedding rows per categorical field: a number, auto (sized from the "
        "click logs' distinct ids), or per field, e.g. {user_id: 50000, item_id: auto, default: auto}")
    hidden: list[int] = Field(list(_DEFAULT.hidden), min_length=1)
    cross_layers: int = Field(_DEFAULT.cross_layers, ge=0, le=8, description="DCN-v2 cross layers (dcn_v2 only)")
    sequence_pooling: Literal["attention", "mean"] = _DEFAULT.sequence_pooling
    attention_heads: int = Field(_DEFAULT.attention_heads, ge=1, le=16,
                                 description="bst only: heads of the sequence transformer")
    transformer_layers: int = Field(_DEFAULT.transformer_layers, ge=1, le=8, description="bst only: transformer blocks")
    dropout: float = Field(_DEFAULT.dropout, ge=0, lt=1)

    @field_validator("hidden")
    @classmethod
    def _positive(cls, hidden: list[int]) -> list[int]:
        if any(h < 1 for h in hidden):
            raise ValueError(f"every hidden layer width must be >= 1, got {hidden}")
        return hidden

    @field_validator("hash_buckets", mode="before")
    @classmethod
    def _buckets(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return _bucket_count(raw, "")
        for name, value in raw.items():
            if not isinstance(name, str):
                raise ValueError(f"field name {name!r} is not a string; name a categorical feature or {OTHER_FIELDS!r}")
            _bucket_count(value, f"field {name!r}: ")
        return raw

    @field_validator("factory")
    @classmethod
    def _factory_format(cls, factory: str | None) -> str | None:
        if factory is not None and not _FACTORY.match(factory):
            raise ValueError(f"{factory!r} is not 'package.module:function'; write an importable module, a colon "
                             "and a function name, e.g. 'my_models.ctr:build_student'")
        return factory

    @model_validator(mode="after")
    def _plugin(self) -> ModelSpec:
        if self.model != "custom":
            if self.factory is not None:
                raise ValueError(f"factory is only read with model: custom (model is {self.model!r}); remove it "
                                 "or set model: custom")
            return self
        if self.factory is None:
            raise ValueError("model: custom needs factory: 'package.module:function' (a function building the model)")
        # The one documented way user code enters a spec. Lazy: pipeline.models imports torch, which
        # validating a spec without a custom model never needs.
        from pipeline.models.plugin import resolve_factory

        resolve_factory(self.factory)
        return self

    @model_validator(mode="after")
    def _heads(self) -> ModelSpec:
        if self.model == "bst" and self.embedding_dim % self.attention_heads:
            raise ValueError(f"bst: embedding_dim {self.embedding_dim} must be divisible by attention_heads "
                             f"{self.attention_heads}")
        return self


def _bucket_count(value: Any, where: str) -> Any:
    if value == AUTO:
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}{value!r} is neither a whole number nor {AUTO!r}; give embedding rows, e.g. "
                         f"50000, or {AUTO} to size it from the click logs")
    if value < MIN_BUCKETS:
        raise ValueError(f"{where}{value} is below {MIN_BUCKETS}; give at least {MIN_BUCKETS} embedding rows "
                         f"or {AUTO}")
    return value


def check_bucket_fields(section: str, hash_buckets: Any, categorical: list[str]) -> None:
    """Raises ValueError naming any field of the per-field `hash_buckets` form that is not a categorical
    feature (a rule across sections: the job spec, or the resolution, calls it)."""
    if not isinstance(hash_buckets, dict):
        return
    unknown = [name for name in hash_buckets if name != OTHER_FIELDS and name not in categorical]
    if unknown:
        raise ValueError(f"{section}.hash_buckets names {unknown[0]!r}, which is not a categorical feature; use "
                         f"{categorical} or {OTHER_FIELDS!r} (every field not named)")


class TeacherFeaturesSpec(Section):
    """Privileged features (Taobao's PFD, arXiv 1907.05171): log columns only the teacher reads, e.g. post-click
    signals or costly user-item crosses that serving never has. The student learns their effect through the
    soft labels; the shards do not carry them. The rules against `features` are on `JobSpec`."""

    categorical: list[str] = Field([], description="teacher-only id columns (hashed like features.categorical)")
    dense: list[str] = Field([], description="teacher-only numeric columns (nulls become features.dense_fill)")
    sequence: SequenceSpec | None = Field(None, description="a teacher-only behaviour sequence, only when "
                                          "features has none (a model reads one sequence)")

    @property
    def columns(self) -> list[str]:
        return self.categorical + self.dense + ([self.sequence.column] if self.sequence else [])


class TeacherSpec(ModelSpec):
    model: str = "dcn_v2"
    name: str = Field("teacher", pattern=r"^[A-Za-z0-9_]+$", description="names this teacher in an ensemble")
    weight: float = Field(1.0, gt=0, description="ensemble weight (distill.ensemble: weighted)")
    checkpoint: str | None = Field(None, description="model.pt of a trained teacher; trained by the job if absent")
    epochs: int | None = Field(None, ge=1, description="teacher training epochs (default: train.epochs)")
    lr: float | None = Field(None, gt=0)
    search: TeacherSearchSpec | None = Field(None, description="Ray Tune search over this teacher's settings")
    extra_features: TeacherFeaturesSpec = Field(
        default_factory=TeacherFeaturesSpec, description="privileged (teacher-only) columns the teacher reads "
        "besides `features`, e.g. a post-click signal absent at serving time; the student never reads them")

    @field_validator("model")
    @classmethod
    def _known(cls, name: str) -> str:
        return _known_model(name, TEACHER_MODELS, "teacher")


class StudentSpec(ModelSpec):
    model: str = "mlp"

    @field_validator("model")
    @classmethod
    def _known(cls, name: str) -> str:
        return _known_model(name, STUDENT_MODELS, "student")
