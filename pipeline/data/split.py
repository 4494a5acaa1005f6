"""Row splits: a stable hash of a key column puts each row on one side (training, validation or evaluation),
the same in every run, process and machine (pandas' `hash_array`, a keyed SipHash with a fixed key).

One 64-bit hash per key decides both held-out sides: its lowest six decimal digits the validation side, the
next six the evaluation side, so the two are independent (about `f_val x f_eval` of the keys fall in both).
Such a row is an evaluation row: evaluation rows are never trained on nor chosen on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa

_BUCKETS = 1_000_000
Side = Literal["train", "validation", "evaluation"]


def _hashed(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return pd.util.hash_array(np.asarray(keys.to_numpy(zero_copy_only=False)))  # (N,) uint64


def validation_mask(keys: pa.Array | pa.ChunkedArray, fraction: float) -> np.ndarray:
    """True for the keys of the validation side: about `fraction` of the distinct keys, all rows of a key on
    the same side (so a user's or a request's impressions never straddle the split)."""
    return (_hashed(keys) % _BUCKETS) < round(fraction * _BUCKETS)


def evaluation_mask(keys: pa.Array | pa.ChunkedArray, fraction: float) -> np.ndarray:
    """True for the keys of the evaluation side: like `validation_mask`, from the hash's next six digits."""
    return (_hashed(keys) // _BUCKETS % _BUCKETS) < round(fraction * _BUCKETS)


@dataclass(frozen=True)
class RowSplit:
    """Which rows are held out by a hash of a key column: validation rows (`data.validation.fraction`) and
    evaluation rows (`data.evaluation`), the rest training rows. A side without a key is not split by rows
    (validation by days, eval days after the training days, or none): the days a batch was read from decide."""

    validation_key: str | None = None
    validation_fraction: float = 0.0
    evaluation_key: str | None = None
    evaluation_fraction: float = 0.0

    @classmethod
    def from_spec(cls, spec) -> RowSplit:
        return cls(validation_key=spec.validation_key, evaluation_key=spec.evaluation_key,
                   validation_fraction=spec.data.validation.fraction if spec.validation_key else 0.0,
                   evaluation_fraction=spec.data.evaluation.fraction if spec.evaluation_key else 0.0)

    def keep(self, batch: pa.Table, side: Side) -> pa.Table:
        """`batch` with only its `side` rows: a `map_batches` function. Every row is on one side: an
        evaluation row on no other, a validation row on neither of the others."""
        if side == "evaluation":
            if not self.evaluation_key:
                return batch  # evaluation by days: every row of the eval days
            return batch.filter(pa.array(evaluation_mask(batch.column(self.evaluation_key), self.evaluation_fraction)))
        mask = np.ones(batch.num_rows, dtype=bool)
        if self.evaluation_key:
            mask &= ~evaluation_mask(batch.column(self.evaluation_key), self.evaluation_fraction)
        if self.validation_key:
            held_out = validation_mask(batch.column(self.validation_key), self.validation_fraction)
            mask &= held_out if side == "validation" else ~held_out
        return batch.filter(pa.array(mask))
