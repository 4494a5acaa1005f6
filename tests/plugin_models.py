"""Example `model: custom` plug-ins for tests/test_models.py (factory "plugin_models:tiny_linear").

A factory takes the feature layout, out_dim and its own keyword arguments (the spec's factory_args),
and returns an nn.Module mapping the inputs dict to logits (B,) or (B, out_dim).
"""

from __future__ import annotations

import torch
from torch import nn


class TinyLinear(nn.Module):
    """Mean of per-field id embeddings (ids taken modulo the table size) plus dense, then a linear head."""

    def __init__(self, num_dense: int, out_dim: int, width: int, rows: int = 97):
        super().__init__()
        self.rows, self.out_dim = rows, out_dim
        self.embedding = nn.Embedding(rows, width)
        self.head = nn.Linear(width + num_dense, out_dim)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = self.embedding(torch.remainder(inputs["categorical"], self.rows)).mean(1)  # (B, width)
        scores = self.head(torch.cat([pooled, inputs["dense"]], dim=1))  # (B, out_dim)
        return scores.squeeze(-1) if self.out_dim == 1 else scores


def tiny_linear(layout, out_dim: int = 1, width: int = 8) -> nn.Module:
    return TinyLinear(len(layout.dense), out_dim, width)


def wrong_shape(layout, out_dim: int = 1) -> nn.Module:
    """Breaks the contract: always (B, out_dim + 1) logits."""
    return TinyLinear(len(layout.dense), out_dim + 1, width=4)


def not_a_module(layout, out_dim: int = 1):
    return lambda inputs: inputs["dense"].sum(1)


class RunningMax(TinyLinear):
    """TinyLinear plus a running maximum over the fields (aten.cummax), which the ONNX exporter cannot convert."""

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = torch.remainder(inputs["categorical"], self.rows)
        pooled = self.embedding(ids).cummax(dim=1).values[:, -1]  # (B, width)
        scores = self.head(torch.cat([pooled, inputs["dense"]], dim=1))
        return scores.squeeze(-1) if self.out_dim == 1 else scores


def running_max(layout, out_dim: int = 1) -> nn.Module:
    return RunningMax(len(layout.dense), out_dim, width=4)
