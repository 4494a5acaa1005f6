"""Click-log batches (Arrow) -> model input tensors. Pure logic: no Ray.

A model input is a dict of three tensors: `categorical` (B, F) int64 raw ids, `dense` (B, D)
float32, and, when the spec has a behaviour sequence, `sequence` (B, L) int64 with 0 as padding.
Ids are hashed into buckets inside the model, so this module never needs a vocabulary.

torch loads only in `table_to_inputs`: the stand-alone scorer (pipeline/serving.py) builds the same arrays
with `table_to_arrays` and runs without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class FeatureLayout:
    """Plain description of the model inputs; built from the spec's `features` section."""

    categorical: tuple[str, ...]
    dense: tuple[str, ...]
    sequence: str | None = None
    sequence_length: int = 0
    sequence_field: int = -1  # index in `categorical` whose embedding table the sequence shares
    # Missing dense values reach the model as NaN, which it fills with `dense_fill` and flags in one more
    # 0/1 input per column (`features.dense_missing_indicators`); without, they arrive filled.
    missing_indicators: bool = False
    dense_fill: float = 0.0

    @classmethod
    def from_spec(cls, features) -> FeatureLayout:
        seq = features.sequence
        return cls(
            categorical=tuple(features.categorical),
            dense=tuple(features.dense),
            sequence=seq.column if seq else None,
            sequence_length=seq.length if seq else 0,
            sequence_field=features.categorical.index(seq.embedding_of) if seq else -1,
            missing_indicators=features.dense_missing_indicators,
            dense_fill=features.dense_fill if features.dense_missing_indicators else 0.0,
        )

    @classmethod
    def from_dict(cls, raw: dict) -> FeatureLayout:
        """From `to_dict()`'s form (a checkpoint's, or one that crossed a process boundary)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

    def to_dict(self) -> dict:
        """Plain form; without missing indicators, exactly the form older checkpoints and manifests hold."""
        raw = dataclasses.asdict(self)
        if not self.missing_indicators:
            del raw["missing_indicators"], raw["dense_fill"]
        return raw

    @property
    def columns(self) -> list[str]:
        return list(self.categorical) + list(self.dense) + ([self.sequence] if self.sequence else [])


def table_to_inputs(table: pa.Table, layout: FeatureLayout) -> dict:
    """Converts an Arrow batch into model inputs (tensors) without per-row Python."""
    import torch

    return {name: torch.from_numpy(array) for name, array in table_to_arrays(table, layout).items()}


def table_to_arrays(table: pa.Table, layout: FeatureLayout) -> dict[str, np.ndarray]:
    """The model inputs as numpy arrays: `categorical` (B, F) int64, `dense` (B, D) float32, `sequence` (B, L)."""
    arrays = {"categorical": _stack(table, layout.categorical, np.int64),
              "dense": _stack(table, layout.dense, np.float32)}
    if layout.sequence:
        arrays["sequence"] = _sequence(table.column(layout.sequence), layout.sequence_length)
    return arrays


def _stack(table: pa.Table, names: tuple[str, ...], dtype) -> np.ndarray:
    if not names:
        return np.zeros((table.num_rows, 0), dtype=dtype)
    columns = [table.column(n).to_numpy(zero_copy_only=False).astype(dtype, copy=False) for n in names]
    return np.stack(columns, axis=1)  # (B, len(names))


def _sequence(column: pa.ChunkedArray, length: int) -> np.ndarray:
    """Pads or truncates each list to `length` ids (most recent first); 0 marks padding."""
    out = np.zeros((len(column), length), dtype=np.int64)  # (B, L)
    array = column.combine_chunks()
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if (lengths == length).all():  # the common case: fixed-length histories, one reshape
        return values.reshape(len(column), length) if len(column) else out
    # Ragged: each row's first min(count, length) ids, placed by index arrays rather than a loop over rows.
    starts = np.cumsum(lengths) - lengths  # (B,) where each row's ids begin in `values`
    taken = np.minimum(lengths, length)
    rows = np.repeat(np.arange(len(column)), taken)
    positions = np.arange(taken.sum()) - np.repeat(np.cumsum(taken) - taken, taken)  # 0.. within each row
    out[rows, positions] = values[np.repeat(starts, taken) + positions]
    return out
