"""Click-log values as the models take them, in the read tasks, after the bad-row checks (pure pyarrow):

- string ids (row id, group, categorical columns, the row-split keys) -> int64 by `ids.hash_string_ids`;
- a null categorical or group id -> `ids.MISSING_ID`: missing is a value, not a bad row;
- a null or NaN dense value -> `features.dense_fill` (or NaN, filled and flagged in the model, with
  `features.dense_missing_indicators`), and every dense column float32;
- a delimited text sequence (`1^2^3`) -> list<int64>: items hashed when the column it shares an
  embedding with holds text, parsed as integers when that column holds integers; a null list is empty
  and a null or empty item is padding (0);
- a label with `features.label_threshold` -> 1 where the column >= the threshold, else 0.

The same step runs wherever click logs are read (labelling, training on logs, validation, evaluation),
so every stage sees the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.ids import as_int_ids, hash_string_ids, is_string_like, per_chunk
from pipeline.errors import DataError


@dataclass(frozen=True)
class Normaliser:
    """What to normalise, from the spec: plain values, so it pickles cheaply into Ray tasks."""

    ids: tuple[str, ...]  # hashed when text; nulls -> MISSING_ID
    dense: tuple[str, ...]
    dense_fill: float | None  # None: a missing dense value stays NaN, for a model with missing indicators
    label: str
    label_threshold: float | None
    sequence: str | None
    sequence_of: str | None  # the categorical column whose ids the sequence holds
    delimiter: str | None
    row_id: str | None = None  # one of `ids`, all different: hashed without looking for repeats

    @classmethod
    def from_spec(cls, spec) -> Normaliser:
        f = spec.log_features  # teacher-only columns too: a read for a teacher with extra features holds them
        ids = [f.id, f.group, *f.categorical, *spec.split_keys]
        return cls(ids=tuple(dict.fromkeys(c for c in ids if c)), dense=tuple(f.dense),
                   dense_fill=None if f.dense_missing_indicators else f.dense_fill,
                   label=f.label, label_threshold=f.label_threshold,
                   sequence=f.sequence.column if f.sequence else None,
                   sequence_of=f.sequence.embedding_of if f.sequence else None,
                   delimiter=f.sequence.delimiter if f.sequence else None, row_id=f.id)

    def text_id_columns(self) -> tuple[str, ...]:
        """The columns hashed when they hold text, worth reading as dictionaries (`formats.read_days`): the
        ids but the row id (all different: its dictionary would be the whole file) and a list sequence."""
        listed = (self.sequence,) if self.sequence and self.delimiter is None else ()
        return tuple(c for c in self.ids if c != self.row_id) + listed


def normalise(table: pa.Table, plan: Normaliser) -> pa.Table:
    """`table` with its columns replaced by their normalised values (other columns untouched)."""
    # Text sequence items are the same ids as the column they share an embedding with: hashed when it holds
    # text, parsed when it holds integers (decided by its type, checked to be one type on every day).
    text_items = plan.sequence_of in table.column_names and is_string_like(table.schema.field(plan.sequence_of).type)
    for name in table.column_names:
        column = table.column(name)
        if name in plan.ids:
            new = as_int_ids(column, distinct=name == plan.row_id)
        elif name in plan.dense:
            new = _dense(column, plan.dense_fill)
        elif name == plan.label and plan.label_threshold is not None:
            new = pc.cast(pc.greater_equal(column, pa.scalar(plan.label_threshold)), pa.int64())
        elif name == plan.sequence:
            new = sequence_ids(column, plan.delimiter, text_items, name)
        else:
            continue
        table = table.set_column(table.column_names.index(name), name, new)
    return table


def _dense(column: pa.ChunkedArray, fill: float | None) -> pa.Array:
    """float32 values, missing ones (null or NaN) filled with `fill`, or NaN when `fill` is None."""
    values = pc.cast(column.combine_chunks(), pa.float32())
    if fill is None:
        return pc.fill_null(values, pa.scalar(float("nan"), pa.float32())) if values.null_count else values
    if values.null_count or pc.any(pc.is_nan(values)).as_py():
        values = pc.fill_null(pc.if_else(pc.is_nan(values), None, values), pa.scalar(fill, pa.float32()))
    return values


def sequence_ids(column: pa.Array | pa.ChunkedArray, delimiter: str | None, text_items: bool = True,
                 name: str = "sequence") -> pa.Array:
    """A behaviour sequence as list<int64>: text items hashed (or parsed, for integer ids), nulls -> 0."""
    if isinstance(column, pa.ChunkedArray):  # chunk by chunk: chunks of one row group share a dictionary
        return per_chunk(column, lambda chunk: sequence_ids(chunk, delimiter, text_items, name))
    values = column
    if is_string_like(values.type):
        if delimiter is None:
            raise DataError(f"sequence column {name!r} holds text, e.g. {_first(values)!r}; set "
                            "features.sequence.delimiter to the character between its ids")
        values = pc.split_pattern(pc.cast(values, pa.string()), delimiter)
    values = pc.fill_null(values, pa.scalar([], values.type)) if values.null_count else values
    offsets = pc.subtract(values.offsets, values.offsets[0])  # a sliced list's offsets start past 0
    items = pc.list_flatten(values)
    if is_string_like(items.type):
        if text_items:
            items = hash_string_ids(items, empty_is_null=True)
        else:
            items = pc.cast(items, items.type.value_type) if pa.types.is_dictionary(items.type) else items
            items = _parse_integers(pc.if_else(pc.equal(pc.binary_length(items), 0), None, items), name)
    ids = pc.fill_null(pc.cast(items, pa.int64()), 0)
    return pa.ListArray.from_arrays(offsets, ids)


def _parse_integers(items: pa.Array, name: str) -> pa.Array:
    try:
        return pc.cast(items, pa.int64())
    except pa.ArrowInvalid:
        raise DataError(f"sequence column {name!r} holds text ids, but the column it shares an embedding with "
                        "holds integers; write that column's ids as text too, or the sequence's as integers") from None


def _first(values: pa.Array):
    valid = values.filter(pc.is_valid(values))
    return valid[0].as_py() if len(valid) else None


def delimiter_splits(values: pa.Array | pa.ChunkedArray, delimiter: str) -> bool:
    """Whether `delimiter` occurs in any value (a check for `validate --data`: a wrong one splits nothing)."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if not is_string_like(values.type):
        return True
    return bool(pc.any(pc.match_substring(pc.cast(values, pa.string()), delimiter)).as_py())
