"""Shared input encoder: hashed categorical embeddings, a pooled behaviour sequence, dense features."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# Odd 62-bit multiplier (Fibonacci hashing): spreads consecutive ids across buckets.
_HASH_MULTIPLIER = 0x9E3779B97F4A7C15 >> 2


def hash_ids(ids: torch.Tensor, buckets: int | torch.Tensor, salt: int = 0) -> torch.Tensor:
    """Maps arbitrary int64 ids to [0, buckets); unseen ids are fine. Overflow wraps, on purpose.

    `buckets` may be a tensor (F,) of per-field sizes, broadcast over ids (B, F): the same numbers as
    hashing each column with its own int.
    """
    mixed = ids * _HASH_MULTIPLIER + salt
    mixed = mixed ^ (mixed >> 29)
    return torch.remainder(mixed, buckets)


def log_dense(dense: torch.Tensor) -> torch.Tensor:
    """sign(x) * log1p(|x|): tames heavy-tailed counts and prices before any layer sees them."""
    return torch.sign(dense) * torch.log1p(dense.abs())


def field_tables(buckets: int | Sequence[int], num_fields: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sizes (F,), offsets (F,)) of F per-field tables stacked in one embedding of sizes.sum() rows.

    One int gives every field that many rows, with the offsets `arange(F) * buckets` they always had.
    """
    sizes = [buckets] * num_fields if isinstance(buckets, int) else list(buckets)
    if len(sizes) != num_fields:
        raise ValueError(f"{len(sizes)} per-field bucket counts for {num_fields} categorical fields")
    sizes = torch.tensor(sizes, dtype=torch.int64)
    return sizes, torch.cumsum(sizes, 0) - sizes


def as_logits(scores: torch.Tensor) -> torch.Tensor:
    """(B, 1) -> (B,) for binary CTR; (B, C) stays (B, C) for a multiclass head."""
    return scores.squeeze(-1) if scores.shape[-1] == 1 else scores


class FeatureEncoder(nn.Module):
    """Embeds F categorical fields (one table of F * buckets rows, or of the per-field sizes' sum), pools
    the sequence, transforms dense (with `missing_indicators`, fills missing values and flags them).

    Output: (B, output_dim) = F * dim [+ dim for the sequence] + D (2D with missing indicators).
    """

    def __init__(self, num_fields: int, num_dense: int, buckets: int | Sequence[int], dim: int,
                 sequence_field: int = -1, pooling: str = "mean", missing_indicators: bool = False,
                 dense_fill: float = 0.0, sequence_length: int = 0):
        super().__init__()
        self.num_fields, self.buckets, self.dim = num_fields, buckets, dim
        self.sequence_field = sequence_field
        # Missing dense values arrive as NaN: filled here, and flagged in one more 0/1 input each.
        self.missing_indicators, self.dense_fill = missing_indicators, dense_fill
        self.dense_dim = num_dense * (2 if missing_indicators else 1)  # columns of `dense`'s output
        sizes, offsets = field_tables(buckets, num_fields)
        self.embedding = nn.Embedding(int(sizes.sum()), dim)
        nn.init.normal_(self.embedding.weight, std=0.01)
        self.register_buffer("sizes", sizes, persistent=False)  # (F,) rows of each field's table
        self.register_buffer("offsets", offsets, persistent=False)  # (F,) first row of each field's table
        self.attention = SequenceAttention(dim) if sequence_field >= 0 and pooling == "attention" else None
        if sequence_field >= 0 and self.attention is None:  # what the mean over the history reads (_mean_of_history)
            padding_row = hash_ids(torch.zeros(1, dtype=torch.int64), sizes[sequence_field]) + offsets[sequence_field]
            self.register_buffer("padding_row", padding_row, persistent=False)  # (1,) where id 0, the padding, embeds
            self.register_buffer("stacked_identities", torch.eye(dim).repeat(sequence_length, 1), persistent=False)
        self.num_vectors = num_fields + (1 if sequence_field >= 0 else 0)  # rows of `embed`
        self.output_dim = self.num_vectors * dim + self.dense_dim

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, output_dim): embed(inputs).flatten(1), then the dense values, joined in one concatenation (each op
        is a fixed cost of a served call at batch 1)."""
        fields, pooled = self._vectors(inputs)
        return torch.cat([fields.flatten(1), *([] if pooled is None else [pooled]), self.dense(inputs)], dim=1)

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, num_vectors, dim): one vector per field, then the pooled sequence (if any) as one more."""
        fields, pooled = self._vectors(inputs)
        return fields if pooled is None else torch.cat([fields, pooled.unsqueeze(1)], dim=1)

    def _vectors(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, F, dim) field vectors, and the (B, dim) pooled sequence or None."""
        fields = self.embedding(hash_ids(inputs["categorical"], self.sizes) + self.offsets)
        if self.sequence_field < 0:
            return fields, None
        return fields, self._pool_sequence(inputs["sequence"], fields[:, self.sequence_field])

    def dense(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) transformed dense values, or (B, 2D) with each missing (NaN) value's 0/1 indicator after them."""
        values = inputs["dense"].to(self.embedding.weight.dtype)  # (B, D)
        if not self.missing_indicators:
            return log_dense(values)
        missing = torch.isnan(values)
        filled = torch.where(missing, torch.full_like(values, self.dense_fill), values)
        return torch.cat([log_dense(filled), missing.to(values.dtype)], dim=1)  # (B, 2D)

    def lookup(self, ids: torch.Tensor, field: int) -> torch.Tensor:
        """Embeds raw ids with field `field`'s table: how a sequence shares its item table. (..., dim)"""
        return self.embedding(hash_ids(ids, self.sizes[field]) + self.offsets[field])

    def _pool_sequence(self, seq: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        history = self.lookup(seq, self.sequence_field)  # (B, L, dim)
        if self.attention is not None:
            return self.attention(target, history, (seq != 0).to(history.dtype))  # 0 is padding
        return self._mean_of_history(seq, history)

    def _mean_of_history(self, seq: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """(B, dim) mean of the vectors of the non-padding (id 0) positions; zeros (to rounding) for padding only.

        Computed as the sum over every position, minus the padding's share (id 0 always embeds to the same
        row), with the sum as one MatMul by L stacked (dim, dim) identities. The same numbers, to float rounding,
        as masking each position and reducing over L; but in ONNX Runtime that broadcast Mul and a ReduceSum over
        the middle axis of (B, L, 4) took 38% of the demo student's time at batch 512 (bench/serving.py).
        """
        length, dim = history.shape[1], history.shape[2]
        identities = self.stacked_identities
        if identities.shape[0] != length * dim:  # a sequence of another length than the layout's
            identities = torch.eye(dim, dtype=history.dtype, device=history.device).repeat(length, 1)
        padded = (seq == 0).to(history.dtype).sum(1, keepdim=True)  # (B, 1)
        # Through the module, not its weight: ZeRO-3 gathers a partitioned table only for the module's call.
        total = history.reshape(-1, length * dim) @ identities - padded * self.embedding(self.padding_row)
        return total / (length - padded).clamp(min=1)


class SequenceAttention(nn.Module):
    """DIN-style target attention: weights each past item by its relevance to the target item."""

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(4 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, target: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        query = target.unsqueeze(1).expand_as(history)  # (B, L, dim)
        features = torch.cat([query, history, query * history, query - history], dim=-1)
        scores = self.score(features).squeeze(-1).masked_fill(mask == 0, -1e4)  # (B, L)
        weights = torch.softmax(scores, dim=1) * mask  # all-padding rows pool to zero
        return (weights.unsqueeze(-1) * history).sum(1)  # (B, dim)


def mlp(input_dim: int, hidden: list[int], dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(input_dim, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        input_dim = width
    return nn.Sequential(*layers)
