"""What a bad row is: vectorised `pyarrow.compute` rules from the spec, no I/O.

A null or out-of-range label, an infinite dense value, a null row id, a negative or absurd
(> `data.max_id`) integer id, in a column or inside the behaviour sequence. Missing values are data,
not bad rows: a null categorical id, a null or NaN dense value and a null sequence are filled in
afterwards (`pipeline.data.normalise`). `pipeline.data.validate` finds, reports and quarantines the
rows these rules reject.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class RowRules:
    """What a good row is, from the spec: plain values, so it pickles cheaply into Ray actors."""

    label: str
    num_classes: int  # 2 for task: binary
    ids: tuple[str, ...]  # the row id column, then the categorical ids
    dense: tuple[str, ...]
    sequence: str | None
    max_id: int
    row_id: str | None = None  # a null row id is bad: the shards' exactly-once check counts ids
    label_threshold: float | None = None  # a numeric label thresholded later: only null or NaN is bad

    @classmethod
    def from_spec(cls, spec) -> RowRules:
        features = spec.log_features  # teacher-only columns are checked where a read holds them
        return cls(label=features.label, num_classes=features.num_classes or 2,
                   ids=tuple(dict.fromkeys(c for c in [features.id, *features.categorical] if c)), dense=tuple(features.dense),
                   sequence=features.sequence.column if features.sequence else None, max_id=spec.data.max_id,
                   row_id=features.id, label_threshold=features.label_threshold)

    @property
    def columns(self) -> list[str]:
        return [self.label, *self.ids, *self.dense, *([self.sequence] if self.sequence else [])]


def bad_row_reasons(table: pa.Table, rules: RowRules) -> pa.Array:
    """Why each row is bad (null for a good row), e.g. "clicked: 3 not in {0,1}" or "price: NaN".

    The first failing rule of a row names it: label, then ids, dense values, the sequence. Columns
    absent from `table` are not checked here (`check_partitions` checks that they exist).
    """
    present = set(table.column_names)
    checks = []
    if rules.label in present:
        checks += _label_checks(_column(table, rules.label), rules.label, rules.num_classes, rules.label_threshold)
    for name in (n for n in rules.ids if n in present):
        values = _column(table, name)
        if name == rules.row_id:
            checks.append((pc.is_null(values), f"{name}: null"))
        if pa.types.is_integer(values.type) or pa.types.is_floating(values.type):  # text ids are hashed
            checks += _id_checks(values, name, rules.max_id)
    for name in (n for n in rules.dense if n in present):
        checks += _dense_checks(_column(table, name), name)
    if rules.sequence in present:
        checks += _sequence_checks(_column(table, rules.sequence), rules.sequence, rules.max_id)
    return _first_reason(checks, table.num_rows)


def split_bad_rows(table: pa.Table, rules: RowRules) -> tuple[pa.Table, pa.Table]:
    """(good rows, bad rows plus a string column `reason`), both in input order."""
    reasons = bad_row_reasons(table, rules)
    bad = pc.is_valid(reasons)
    return table.filter(pc.invert(bad)), table.filter(bad).append_column("reason", reasons.filter(bad))


def _column(table: pa.Table, name: str) -> pa.Array:
    return table.column(name).combine_chunks()


def _text(name: str, values: pa.Array, suffix: str = ""):
    """`name: <value><suffix>` per row, built only when a rule fails somewhere."""
    return lambda: pc.binary_join_element_wise(f"{name}: ", pc.cast(values, pa.string()), suffix, "")


def _first_reason(checks: list[tuple], rows: int) -> pa.Array:
    """Per row, the reason of the first check whose mask is true; null where none is."""
    reasons = pa.nulls(rows, pa.string())
    for mask, reason in reversed(checks):  # earlier checks overwrite later ones
        mask = pc.fill_null(mask, False)
        if pc.any(mask).as_py():
            reasons = pc.if_else(mask, reason() if callable(reason) else reason, reasons)
    return reasons


def _label_checks(values: pa.Array, name: str, num_classes: int, threshold: float | None = None) -> list[tuple]:
    if threshold is not None:
        nan = pc.is_nan(values) if pa.types.is_floating(values.type) else pa.nulls(len(values), pa.bool_())
        return [(pc.is_null(values), f"{name}: null"), (nan, f"{name}: NaN")]
    allowed = pa.array(range(num_classes)).cast(values.type)
    outside = pc.and_(pc.is_valid(values), pc.invert(pc.is_in(values, value_set=allowed)))
    wanted = " not in {0,1}" if num_classes == 2 else f" not in 0..{num_classes - 1} (features.num_classes)"
    return [(pc.is_null(values), f"{name}: null"), (outside, _text(name, values, wanted))]


def _id_checks(values: pa.Array, name: str, max_id: int) -> list[tuple]:
    """Integer (or float) ids: NaN, < 0 or > max_id. A null is a missing id, not a bad one."""
    checks = []
    kind = values.type
    if pa.types.is_floating(kind):
        checks.append((pc.is_nan(values), f"{name}: NaN"))
    if not pa.types.is_unsigned_integer(kind):
        checks.append((pc.less(values, pa.scalar(0).cast(kind)), _text(name, values, " < 0")))
    if not pa.types.is_integer(kind) or max_id < np.iinfo(kind.to_pandas_dtype()).max:
        checks.append((pc.greater(values, pa.scalar(max_id).cast(kind)),
                       _text(name, values, f" > data.max_id ({max_id})")))
    return checks


def _dense_checks(values: pa.Array, name: str) -> list[tuple]:
    """An infinite value (a division by zero upstream); null and NaN are missing values, filled later."""
    return [(pc.is_inf(values), _text(name, values))] if pa.types.is_floating(values.type) else []


def _sequence_checks(values: pa.Array, name: str, max_id: int) -> list[tuple]:
    """The first bad integer id of each list (< 0 or > max_id; 0 is padding). A null list is an empty
    history, and text ids (a list of strings, or a delimited string) are hashed."""
    if not pa.types.is_list(values.type) and not pa.types.is_large_list(values.type) \
            and not pa.types.is_fixed_size_list(values.type):
        return []
    flat = pc.list_flatten(values)
    if not (pa.types.is_integer(flat.type) or pa.types.is_floating(flat.type)):
        return []
    element = _first_reason(_id_checks(flat, name, max_id), len(flat))
    bad = pc.is_valid(element)
    checks = []
    if pc.any(bad).as_py():
        parents = pc.list_parent_indices(values).filter(bad).to_numpy()
        first = np.full(len(values), -1)
        rows, at = np.unique(parents, return_index=True)  # parents ascend: the first bad id of each row
        first[rows] = at
        per_row = pc.take(element.filter(bad), pa.array(first, mask=first < 0))
        checks.append((pc.is_valid(per_row), per_row))
    return checks
