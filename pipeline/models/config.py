"""`ModelConfig`: the typed description of one model (family and size), what checkpoints store.

The spec's `teacher`/`student` sections turn into it (`from_section`), a Ray Train worker rebuilds it
from its dict form, and `build_model` takes nothing else. Its defaults are the spec's defaults
(`pipeline.spec` reads them from here), so a checkpoint saved before a field existed still loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class ModelConfig:
    model: str  # family: dcn_v2, deepfm, bst, mlp, fm or custom
    factory: str | None = None  # custom only: 'package.module:function'
    factory_args: dict[str, Any] = field(default_factory=dict)
    embedding_dim: int = 8
    hash_buckets: int = 10_000  # embedding rows per categorical field
    hidden: tuple[int, ...] = (64, 32)
    cross_layers: int = 0
    sequence_pooling: str = "mean"
    attention_heads: int = 2
    transformer_layers: int = 1
    dropout: float = 0.0
    out_dim: int = 1  # 1: logits (B,); C classes: logits (B, C)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """From the dict form (a checkpoint's, or one crossing a process boundary); missing keys default."""
        values = {k: raw[k] for k in FIELDS if k in raw}
        if "hidden" in values:
            values["hidden"] = tuple(values["hidden"])
        return cls(**values)

    @classmethod
    def from_section(cls, section, out_dim: int = 1) -> ModelConfig:
        """From a spec's `teacher` or `student` section (any object with these attribute names)."""
        return cls.from_dict({name: getattr(section, name) for name in FIELDS if name != "out_dim"}
                             | {"out_dim": out_dim})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form: lists, dicts, numbers (what checkpoints and Ray configs hold)."""
        return dataclasses.asdict(self) | {"hidden": list(self.hidden)}


FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
