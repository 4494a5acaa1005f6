"""Model sections: the teacher(s) and the student, each a CTR model family chosen by short name."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.models.config import ModelConfig
from pipeline.spec.base import Section

TEACHER_MODELS = ("dcn_v2", "deepfm", "bst", "custom")
STUDENT_MODELS = ("mlp", "fm", "dcn_v2", "custom")
_DEFAULT = ModelConfig(model="default")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


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
    hash_buckets: int = Field(_DEFAULT.hash_buckets, ge=16, description="embedding rows per categorical field")
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


class TeacherSpec(ModelSpec):
    model: str = "dcn_v2"
    name: str = Field("teacher", pattern=r"^[A-Za-z0-9_]+$", description="names this teacher in an ensemble")
    weight: float = Field(1.0, gt=0, description="ensemble weight (distill.ensemble: weighted)")
    checkpoint: str | None = Field(None, description="model.pt of a trained teacher; trained by the job if absent")
    epochs: int | None = Field(None, ge=1, description="teacher training epochs (default: train.epochs)")
    lr: float | None = Field(None, gt=0)

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
