"""The validation split by rows: a stable hash of a key column puts each row on one side, the same in
every run, process and machine (pandas' `hash_array`, a keyed SipHash with a fixed key)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

_BUCKETS = 1_000_000


def validation_mask(keys: pa.Array | pa.ChunkedArray, fraction: float) -> np.ndarray:
    """True for the rows of the validation split: about `fraction` of the distinct keys, all rows of a key
    on the same side (so a user's or a request's impressions never straddle the split)."""
    hashed = pd.util.hash_array(np.asarray(keys.to_numpy(zero_copy_only=False)))  # (N,) uint64
    return (hashed % _BUCKETS) < round(fraction * _BUCKETS)


def keep_side(batch: pa.Table, key: str, fraction: float, validation: bool) -> pa.Table:
    """`batch` with only its validation rows (or only its training rows): a `map_batches` function."""
    mask = validation_mask(batch.column(key), fraction)
    return batch.filter(pa.array(mask if validation else ~mask))
