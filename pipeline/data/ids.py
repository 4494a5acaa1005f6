"""String ids -> int64, by ONE documented function used at label, train, evaluation and serving time.

The function (`hash_string_ids`), for a serving system to reproduce:

    int64( siphash24(key=b"0123456789123456", utf8(value)) finalised as pandas.util.hash_array does ) >> 1

that is, `pandas.util.hash_array(values, encoding="utf8", hash_key="0123456789123456", categorize=False)`
shifted right by one bit, so that every hashed id is a non-negative int64 (negative ids stay reserved).
Bytes (binary columns) hash as their raw bytes, so b"ab" and "ab" get the same id. `tests/test_real_logs.py`
pins known values.

Each distinct value is hashed once per batch (Arrow's dictionary encoding finds them), so the cost
follows the distinct ids, not the rows (a row id, all different, is hashed as it is), and no Python runs
per row.

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


def hash_string_ids(values: pa.Array | pa.ChunkedArray, *, distinct: bool = False,
                    empty_is_null: bool = False) -> pa.Array:
    """String-like Arrow values -> int64 ids in [0, 2**63); nulls stay null.

    Args:
        distinct: the values are (nearly) all different, e.g. a row id: hash them as they are, since
            finding the distinct ones first would cost more than it saves. The ids are the same.
        empty_is_null: an empty string becomes null too (a sequence's "a^^b" has two items, not three).
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if distinct and not pa.types.is_dictionary(values.type):
        return _hash(values, empty_is_null)
    encoded = values if pa.types.is_dictionary(values.type) else pc.dictionary_encode(values)
    return pc.take(_hash(encoded.dictionary, empty_is_null), encoded.indices)


def _hash(values: pa.Array, empty_is_null: bool) -> pa.Array:
    """The documented hash of each value (one C-level SipHash pass, no Python per value); nulls stay null."""
    objects = values.to_numpy(zero_copy_only=False).astype(object)  # None where null
    missing = pc.is_null(values)
    if empty_is_null:
        missing = pc.or_(missing, pc.equal(pc.binary_length(values), 0))
    missing = missing.to_numpy(zero_copy_only=False)
    objects[missing] = ""  # hashed, then masked: hash_array's own value for None is not ours to promise
    hashed = pd.util.hash_array(objects, encoding="utf8", hash_key=HASH_KEY, categorize=False)
    return pa.array((hashed >> np.uint64(1)).astype(np.int64), mask=missing if missing.any() else None)


def as_int_ids(values: pa.Array | pa.ChunkedArray, *, distinct: bool = False) -> pa.Array:
    """A categorical column as int64 ids: strings hashed, integers as they are, nulls -> `MISSING_ID`.

    `distinct`: as in `hash_string_ids` (the row id)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    ids = hash_string_ids(values, distinct=distinct) if is_string_like(values.type) else pc.cast(values, pa.int64())
    return pc.fill_null(ids, MISSING_ID) if ids.null_count else ids
