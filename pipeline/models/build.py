"""Builds models from the spec by short name, and saves/loads them as self-describing files."""

from __future__ import annotations

import io
from typing import Any, Callable

import torch
from torch import nn

from pipeline.features import FeatureLayout
from pipeline.models.ctr import DCNv2, MLPStudent
from pipeline.models.encoder import FeatureEncoder
from pipeline.models.fm import DeepFM, FMStudent
from pipeline.models.plugin import build_custom
from pipeline.models.sequence import BST

# ModelSpec's defaults (tests/test_models.py checks they agree) plus out_dim. Checkpoints saved before a
# key existed lack it, so every key is read through these. Kept here, not imported, so that models
# never import the spec layer.
MODEL_DEFAULTS: dict[str, Any] = {
    "factory": None, "factory_args": {}, "embedding_dim": 8, "hash_buckets": 10_000, "hidden": [64, 32],
    "cross_layers": 0, "sequence_pooling": "mean", "attention_heads": 2, "transformer_layers": 1,
    "dropout": 0.0, "out_dim": 1,
}


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config with every missing key at its default: compare two configs with this, not `==`."""
    return {**MODEL_DEFAULTS, **config}


def build_model(config: dict[str, Any], layout: FeatureLayout) -> nn.Module:
    """Turns a model section (as a plain dict) and the feature layout into an `nn.Module`.

    Keys: model, factory, factory_args, embedding_dim, hash_buckets, hidden, cross_layers,
    sequence_pooling, attention_heads, transformer_layers, dropout, out_dim (1: logits (B,);
    C classes: logits (B, C)). Only `model` is required.

    Raises:
        ValueError: unknown family, a bst without a sequence, or a custom factory that breaks its contract.
    """
    config = complete_config(config)
    family = config["model"]
    if family == "custom":
        return build_custom(config["factory"], dict(config["factory_args"]), layout, config["out_dim"])
    builder = _FAMILIES.get(family)
    if builder is None:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted([*_FAMILIES, 'custom'])}")
    return builder(config, layout)


def _encoder(config: dict, layout: FeatureLayout, with_sequence: bool = True) -> FeatureEncoder:
    return FeatureEncoder(
        num_fields=len(layout.categorical),
        num_dense=len(layout.dense),
        buckets=config["hash_buckets"],
        dim=config["embedding_dim"],
        sequence_field=layout.sequence_field if with_sequence else -1,
        pooling=config["sequence_pooling"],
    )


def _dcn_v2(config: dict, layout: FeatureLayout) -> nn.Module:
    return DCNv2(_encoder(config, layout), hidden=config["hidden"], cross_layers=max(1, config["cross_layers"]),
                 out_dim=config["out_dim"], dropout=config["dropout"])


def _mlp(config: dict, layout: FeatureLayout) -> nn.Module:
    return MLPStudent(_encoder(config, layout), hidden=config["hidden"], out_dim=config["out_dim"],
                      dropout=config["dropout"])


def _deepfm(config: dict, layout: FeatureLayout) -> nn.Module:
    return DeepFM(_encoder(config, layout), num_dense=len(layout.dense), hidden=config["hidden"],
                  out_dim=config["out_dim"], dropout=config["dropout"])


def _fm(config: dict, layout: FeatureLayout) -> nn.Module:
    return FMStudent(_encoder(config, layout), num_dense=len(layout.dense), out_dim=config["out_dim"])


def _bst(config: dict, layout: FeatureLayout) -> nn.Module:
    if layout.sequence is None or layout.sequence_field < 0:
        raise ValueError("model bst reads a behaviour sequence, but the features have none; add "
                         "features.sequence (column, length, embedding_of) or choose dcn_v2 or deepfm")
    return BST(_encoder(config, layout, with_sequence=False), sequence_field=layout.sequence_field,
               sequence_length=layout.sequence_length, hidden=config["hidden"], heads=config["attention_heads"],
               layers=config["transformer_layers"], pooling=config["sequence_pooling"], out_dim=config["out_dim"],
               dropout=config["dropout"])


_FAMILIES: dict[str, Callable[[dict, FeatureLayout], nn.Module]] = {
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


def save_model(path: str, model_or_state: nn.Module | dict, config: dict, layout: FeatureLayout) -> None:
    """Writes weights together with what is needed to rebuild the model (no pickled classes).

    A custom model's config holds its factory path and arguments; loading imports the factory again.
    """
    from pipeline.storage import atomic_write_bytes

    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    buffer = io.BytesIO()
    torch.save({"config": config, "layout": layout.__dict__, "state_dict": state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_model(path: str) -> tuple[nn.Module, dict, FeatureLayout]:
    """Rebuilds a model saved by `save_model`; returns it in eval mode with its config (as saved) and layout."""
    from pipeline.storage import read_bytes

    saved = torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
    layout = FeatureLayout(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["layout"].items()})
    model = build_model(saved["config"], layout)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved["config"], layout
