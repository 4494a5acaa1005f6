"""String ids -> int64, by ONE documented function used at label, train, evaluation and serving time.

The function (`hash_string_ids`), for a serving system to reproduce:

    int64( siphash24(key=b"0123456789123456", utf8(value)) finalised as pandas.util.hash_array does ) >> 1

that is, `pandas.util.hash_array(values, encoding="utf8", hash_key="0123456789123456", categorize=False)`
shifted right by one bit, so that every hashed id is a non-negative int64 (negative ids stay reserved).
Bytes (binary columns) hash as their raw bytes, so b"ab" and "ab" get the same id. `tests/test_ids.py`
pins known values.

Each distinct value is hashed once per batch (Arrow's dictionary encoding finds them), so the cost
follows the distinct ids, not the rows, and no Python runs per row.

A missing id (null) becomes `MISSING_ID` (-1): no real id is negative, so it is a value of its own in
every field, and the model hashes it into that field's table like any other id.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

MISSING_ID = -1
HASH_KEY = "0123456789123456"  # pandas' default SipHash key, stated so that it never changes under us


def is_string_like(kind: pa.DataType) -> bool:
    """Types whose values are hashed: string, large_string, binary, large_binary, and dictionaries of them."""
    if pa.types.is_dictionary(kind):
        return is_string_like(kind.value_type)
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind) or pa.types.is_string_view(kind) or pa.types.is_binary_view(kind))


def hash_string_ids(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """String-like Arrow values -> int64 ids in [0, 2**63); nulls stay null."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    encoded = values if pa.types.is_dictionary(values.type) else pc.dictionary_encode(values)
    uniques = encoded.dictionary.to_numpy(zero_copy_only=False)  # one Python object per distinct value
    hashed = pd.util.hash_array(uniques.astype(object), encoding="utf8", hash_key=HASH_KEY, categorize=False)
    return pc.take(pa.array((hashed >> np.uint64(1)).astype(np.int64)), encoded.indices)


def as_int_ids(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A categorical column as int64 ids: strings hashed, integers as they are, nulls -> `MISSING_ID`."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    ids = hash_string_ids(values) if is_string_like(values.type) else pc.cast(values, pa.int64())
    return pc.fill_null(ids, MISSING_ID) if ids.null_count else ids
