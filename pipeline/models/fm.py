"""Factorization-machine families: `deepfm` (teacher) and `fm` (logistic-regression-sized student).

FM (Rendle, 2010) scores every pair of fields by the dot product of their embeddings; DeepFM
(Guo et al., 2017) adds a deep MLP over the same embeddings and sums both into the logit.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeline.models.encoder import FeatureEncoder, as_logits, field_tables, hash_ids, mlp


def fm_interaction(vectors: torch.Tensor) -> torch.Tensor:
    """Bi-interaction: (B, N, dim) -> (B, dim) whose sum over dim is sum_{i<j} <v_i, v_j>.

    Uses 0.5 * ((sum_i v_i)^2 - sum_i v_i^2), which is O(N * dim) instead of O(N^2 * dim).
    """
    return 0.5 * (vectors.sum(1).pow(2) - vectors.pow(2).sum(1))


class FirstOrder(nn.Module):
    """The linear part of an FM: one weight per hashed id (per class) plus a linear map of dense.

    Weights are an nn.Embedding of F * buckets rows (or the per-field sizes' sum), hashed like the
    encoder's table (so they count as embedding parameters); ids start at zero weight, as in logistic
    regression.
    """

    def __init__(self, num_fields: int, num_dense: int, buckets: int | Sequence[int], out_dim: int):
        super().__init__()
        self.buckets = buckets
        sizes, offsets = field_tables(buckets, num_fields)
        self.weights = nn.Embedding(int(sizes.sum()), out_dim)
        nn.init.zeros_(self.weights.weight)
        self.dense = nn.Linear(num_dense, out_dim, bias=False) if num_dense else None
        self.bias = nn.Parameter(torch.zeros(out_dim))  # the global bias
        self.register_buffer("sizes", sizes, persistent=False)  # (F,)
        self.register_buffer("offsets", offsets, persistent=False)  # (F,)

    def forward(self, categorical: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        scores = self.weights(hash_ids(categorical, self.sizes) + self.offsets).sum(1) + self.bias  # (B, C)
        return scores if self.dense is None else scores + self.dense(dense)  # dense already log-transformed


class FMTerm(nn.Module):
    """Second-order FM score: the classic sum over dim for one logit; a learned (dim -> C) map for C
    classes, since one shared scalar added to every class would cancel in the softmax."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.project = nn.Linear(dim, out_dim, bias=False) if out_dim > 1 else None

    def forward(self, interaction: torch.Tensor) -> torch.Tensor:
        if self.project is None:
            return interaction.sum(-1, keepdim=True)  # (B, 1)
        return self.project(interaction)  # (B, C)


class DeepFM(nn.Module):
    """logit = first order + FM second order + MLP head, all over shared field embeddings.

    hidden: [bi-interaction vector (dim), deep tower output (h)], what the two heads read.
    """

    def __init__(self, encoder: FeatureEncoder, num_dense: int, hidden: list[int], out_dim: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.first_order = FirstOrder(encoder.num_fields, num_dense, encoder.buckets, out_dim)
        self.fm = FMTerm(encoder.dim, out_dim)
        self.deep = mlp(encoder.output_dim, hidden, dropout)
        self.head = nn.Linear(hidden[-1], out_dim, bias=False)  # first_order holds the bias
        self.hidden_dim = encoder.dim + hidden[-1]

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_with_hidden(inputs)[0]

    def forward_with_hidden(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = self.encoder.embed(inputs)  # (B, N, dim): fields [+ pooled sequence]
        dense = self.encoder.dense(inputs)  # (B, D)
        interaction = fm_interaction(vectors)  # (B, dim)
        deep = self.deep(torch.cat([vectors.flatten(1), dense], dim=1))  # (B, h)
        scores = self.first_order(inputs["categorical"], dense) + self.fm(interaction) + self.head(deep)
        return as_logits(scores), torch.cat([interaction, deep], dim=1)


class FMStudent(nn.Module):
    """logit = first order + FM second order: a logistic regression plus pairwise field interactions.

    hidden: the bi-interaction vector (B, dim).
    """

    def __init__(self, encoder: FeatureEncoder, num_dense: int, out_dim: int = 1):
        super().__init__()
        self.encoder = encoder
        self.first_order = FirstOrder(encoder.num_fields, num_dense, encoder.buckets, out_dim)
        self.fm = FMTerm(encoder.dim, out_dim)
        self.hidden_dim = encoder.dim

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_with_hidden(inputs)[0]

    def forward_with_hidden(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        interaction = fm_interaction(self.encoder.embed(inputs))  # (B, dim)
        scores = self.first_order(inputs["categorical"], self.encoder.dense(inputs)) + self.fm(interaction)
        return as_logits(scores), interaction
