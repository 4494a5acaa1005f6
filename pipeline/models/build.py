"""Builds a model from its `ModelConfig` by family name, and saves/loads models as self-describing files."""

from __future__ import annotations

import io
from typing import Callable

import torch
from torch import nn

from pipeline import storage
from pipeline.features import FeatureLayout
from pipeline.models.config import ModelConfig
from pipeline.models.ctr import DCNv2, MLPStudent
from pipeline.models.encoder import FeatureEncoder
from pipeline.models.fm import DeepFM, FMStudent
from pipeline.models.plugin import build_custom
from pipeline.models.sequence import BST



def build_model(config: ModelConfig, layout: FeatureLayout) -> nn.Module:
    """Turns a model config and the feature layout into an `nn.Module`.

    Raises:
        ValueError: unknown family, a bst without a sequence, or a custom factory that breaks its contract.
    """
    family = config.model
    if family == "custom":
        return build_custom(config.factory, dict(config.factory_args), layout, config.out_dim)
    builder = _FAMILIES.get(family)
    if builder is None:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted([*_FAMILIES, 'custom'])}")
    return builder(config, layout)


def _encoder(config: ModelConfig, layout: FeatureLayout, with_sequence: bool = True) -> FeatureEncoder:
    return FeatureEncoder(
        num_fields=len(layout.categorical),
        num_dense=len(layout.dense),
        buckets=field_buckets(config, layout),
        dim=config.embedding_dim,
        sequence_field=layout.sequence_field if with_sequence else -1,
        pooling=config.sequence_pooling,
        missing_indicators=layout.missing_indicators,
        dense_fill=layout.dense_fill,
        sequence_length=layout.sequence_length,
    )


def field_buckets(config: ModelConfig, layout: FeatureLayout) -> int | tuple[int, ...]:
    """The config's bucket count, or its per-field counts in the layout's field order."""
    buckets = config.hash_buckets
    if isinstance(buckets, int):
        return buckets
    missing = [name for name in layout.categorical if name not in buckets]
    unknown = sorted(set(buckets) - set(layout.categorical))
    if missing or unknown:
        raise ValueError(f"hash_buckets names fields {sorted(buckets)}, the features are {list(layout.categorical)}"
                         f" (missing {missing}, unknown {unknown}); give one count per categorical field")
    return tuple(buckets[name] for name in layout.categorical)


def _dcn_v2(config: ModelConfig, layout: FeatureLayout) -> nn.Module:
    return DCNv2(_encoder(config, layout), hidden=list(config.hidden), cross_layers=max(1, config.cross_layers),
                 out_dim=config.out_dim, dropout=config.dropout)


def _mlp(config: ModelConfig, layout: FeatureLayout) -> nn.Module:
    return MLPStudent(_encoder(config, layout), hidden=list(config.hidden), out_dim=config.out_dim,
                      dropout=config.dropout)


def _deepfm(config: ModelConfig, layout: FeatureLayout) -> nn.Module:
    encoder = _encoder(config, layout)
    return DeepFM(encoder, num_dense=encoder.dense_dim, hidden=list(config.hidden), out_dim=config.out_dim,
                  dropout=config.dropout)


def _fm(config: ModelConfig, layout: FeatureLayout) -> nn.Module:
    encoder = _encoder(config, layout)
    return FMStudent(encoder, num_dense=encoder.dense_dim, out_dim=config.out_dim)


def _bst(config: ModelConfig, layout: FeatureLayout) -> nn.Module:
    if layout.sequence is None or layout.sequence_field < 0:
        raise ValueError("model bst reads a behaviour sequence, but the features have none; add "
                         "features.sequence (column, length, embedding_of) or choose dcn_v2 or deepfm")
    return BST(_encoder(config, layout, with_sequence=False), sequence_field=layout.sequence_field,
               sequence_length=layout.sequence_length, hidden=list(config.hidden), heads=config.attention_heads,
               layers=config.transformer_layers, pooling=config.sequence_pooling, out_dim=config.out_dim,
               dropout=config.dropout)


_FAMILIES: dict[str, Callable[[ModelConfig, FeatureLayout], nn.Module]] = {
    "dcn_v2": _dcn_v2, "mlp": _mlp, "deepfm": _deepfm, "fm": _fm, "bst": _bst,
}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, embedding and dense parameter counts: embeddings dominate CTR models.

    Every nn.Embedding / nn.EmbeddingBag counts as embedding (id tables, first-order weights,
    positions); a parameter shared by several modules counts once.
    """
    tables = {id(p): p for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
              for p in m.parameters()}
    embedding = sum(p.numel() for p in tables.values())
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "embedding": embedding, "dense": total - embedding}


def model_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def save_model(path: str, model_or_state: nn.Module | dict, config: ModelConfig, layout: FeatureLayout) -> None:
    """Writes weights together with what is needed to rebuild the model (no pickled classes).

    A custom model's config holds its factory path and arguments; loading imports the factory again.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    buffer = io.BytesIO()
    torch.save({"config": config.to_dict(), "layout": layout.to_dict(), "state_dict": state}, buffer)
    storage.atomic_write_bytes(path, buffer.getvalue())


def load_model(path: str) -> tuple[nn.Module, ModelConfig, FeatureLayout]:
    """Rebuilds a model saved by `save_model`; returns it in eval mode with its config and layout."""
    saved = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    layout = FeatureLayout.from_dict(saved["layout"])
    config = ModelConfig.from_dict(saved["config"])
    model = build_model(config, layout)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), config, layout
