"""String ids -> int64, by ONE documented function used at label, train, evaluation and serving time.

The function (`hash_string_ids`), for a serving system to reproduce:

    int64( siphash24(key=b"0123456789123456", utf8(value)) finalised as pandas.util.hash_array does ) >> 1

that is, `pandas.util.hash_array(values, encoding="utf8", hash_key="0123456789123456", categorize=False)`
shifted right by one bit, so that every hashed id is a non-negative int64 (negative ids stay reserved).
Bytes (binary columns) hash as their raw bytes, so b"ab" and "ab" get the same id. `tests/test_real_logs.py`
pins known values.

Each distinct value is hashed once per batch (Arrow's dictionary encoding finds them), so the cost
follows the distinct ids, not the rows (a row id, all different, is hashed as it is), and no Python runs
per row. Parquet text ids are read as dictionaries (`formats.read_days`): the batches of one row group share
its dictionary, which is hashed once (`_hash_dictionary`), not once per batch.

A missing id (null) becomes `MISSING_ID` (-1): no real id is negative, so it is a value of its own in
every field, and the model hashes it into that field's table like any other id.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

MISSING_ID = -1
HASH_KEY = "0123456789123456"  # pandas' default SipHash key, stated so that it never changes under us
# The hashed dictionaries of this process, newest last: {key of the dictionary's buffers: (dictionary, hashes)}.
_HASHED_DICTIONARIES: OrderedDict = OrderedDict()
_HASHED_DICTIONARIES_KEPT = 32  # a read holds a few text columns; each dictionary is a row group's distinct ids


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
    if isinstance(values, pa.ChunkedArray):  # chunk by chunk: chunks of one row group share a dictionary
        return per_chunk(values, lambda chunk: hash_string_ids(chunk, distinct=distinct, empty_is_null=empty_is_null))
    if pa.types.is_dictionary(values.type):
        return pc.take(_hash_dictionary(values.dictionary, empty_is_null), values.indices)
    if distinct:
        return _hash(values, empty_is_null)
    encoded = pc.dictionary_encode(values)
    return pc.take(_hash(encoded.dictionary, empty_is_null), encoded.indices)


def per_chunk(values: pa.ChunkedArray, convert: Callable[[pa.Array], pa.Array]) -> pa.Array:
    """`convert` applied to each chunk, the results as one array."""
    if values.num_chunks == 1:
        return convert(values.chunk(0))
    return pa.concat_arrays([convert(chunk) for chunk in values.chunks]) if values.num_chunks else \
        convert(pa.array([], values.type))


def _hash_dictionary(dictionary: pa.Array, empty_is_null: bool) -> pa.Array:
    """`_hash` of a dictionary read from Parquet, computed once for all the batches that share it.

    Keyed by the addresses of its buffers: while cached, the dictionary is held here, so its buffers stay
    alive and no other array can have them; Arrow buffers never change.
    """
    key = (tuple(b.address if b is not None else 0 for b in dictionary.buffers()), dictionary.offset,
           len(dictionary), empty_is_null)
    if key in _HASHED_DICTIONARIES:
        _HASHED_DICTIONARIES.move_to_end(key)
        return _HASHED_DICTIONARIES[key][1]
    hashed = _hash(dictionary, empty_is_null)
    _HASHED_DICTIONARIES[key] = (dictionary, hashed)
    if len(_HASHED_DICTIONARIES) > _HASHED_DICTIONARIES_KEPT:
        _HASHED_DICTIONARIES.popitem(last=False)
    return hashed


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
        return per_chunk(values, lambda chunk: as_int_ids(chunk, distinct=distinct))
    ids = hash_string_ids(values, distinct=distinct) if is_string_like(values.type) else pc.cast(values, pa.int64())
    return pc.fill_null(ids, MISSING_ID) if ids.null_count else ids
