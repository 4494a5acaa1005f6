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
    # Embedding rows per categorical field: one number for every field, or {field: rows} (every field
    # named; what `hash_buckets: auto` and the per-field spec form resolve to). Never 'auto' here.
    hash_buckets: int | dict[str, int] = 10_000
    hidden: tuple[int, ...] = (64, 32)
    cross_layers: int = 0
    sequence_pooling: str = "mean"
    attention_heads: int = 2
    transformer_layers: int = 1
    dropout: float = 0.0
    out_dim: int = 1  # 1: logits (B,); C classes: logits (B, C)

    def __post_init__(self):
        buckets = self.hash_buckets
        sizes = buckets.values() if isinstance(buckets, dict) else [buckets]
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in sizes):
            raise ValueError(f"hash_buckets {buckets!r} is not resolved to whole numbers: `auto` and the per-field "
                             "form are sized from the click-log profile (pipeline.stages.profile."
                             "resolve_hash_buckets) before a model is built")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """From the dict form (a checkpoint's, or one crossing a process boundary); missing keys default."""
        values = {k: raw[k] for k in FIELDS if k in raw}
        if "hidden" in values:
            values["hidden"] = tuple(values["hidden"])
        if isinstance(values.get("hash_buckets"), Mapping):
            values["hash_buckets"] = dict(values["hash_buckets"])  # a copy: the config is frozen
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
