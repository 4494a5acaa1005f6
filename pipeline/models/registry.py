"""Builds models from the spec by short name, and saves/loads them as self-describing files."""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from pipeline.features import FeatureLayout
from pipeline.models.ctr import DCNv2, MLPStudent
from pipeline.models.encoder import FeatureEncoder


def build_model(config: dict[str, Any], layout: FeatureLayout) -> nn.Module:
    """Turns a model section (as a plain dict) and the feature layout into an `nn.Module`."""
    encoder = FeatureEncoder(
        num_fields=len(layout.categorical),
        num_dense=len(layout.dense),
        buckets=config["hash_buckets"],
        dim=config["embedding_dim"],
        sequence_field=layout.sequence_field,
        pooling=config.get("sequence_pooling", "mean"),
    )
    family = config["model"]
    if family == "dcn_v2":
        return DCNv2(encoder, hidden=config["hidden"], cross_layers=max(1, config.get("cross_layers", 0)))
    if family == "mlp":
        return MLPStudent(encoder, hidden=config["hidden"])
    raise ValueError(f"unknown model family {family!r}")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, embedding and dense parameter counts: embeddings dominate CTR models."""
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "embedding": embedding, "dense": total - embedding}


def model_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def save_model(path: str, model_or_state: nn.Module | dict, config: dict, layout: FeatureLayout) -> None:
    """Writes weights together with what is needed to rebuild the model (no pickled classes)."""
    from pipeline.storage import atomic_write_bytes

    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    buffer = io.BytesIO()
    torch.save({"config": config, "layout": layout.__dict__, "state_dict": state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_model(path: str) -> tuple[nn.Module, dict, FeatureLayout]:
    """Rebuilds a model saved by `save_model`; returns it in eval mode with its config and layout."""
    from pipeline.storage import read_bytes

    saved = torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
    layout = FeatureLayout(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["layout"].items()})
    model = build_model(saved["config"], layout)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved["config"], layout
