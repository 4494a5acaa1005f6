"""Click-log validation, pure pyarrow: file checks from Parquet footers, and finding or setting aside bad rows.

File checks (`check_columns`, `check_partitions`) read schemas only (Parquet footers, a CSV's first
block), never the data: a missing or empty partition, a truncated file, a missing column, a wrong
dtype or schemas that disagree fail before any work, all of them in one error, each naming the file,
the column, what was expected and how to fix it.

What a bad row is (`RowRules`, `bad_row_reasons`) lives in `pipeline.data.row_rules`. The label stage
either stops at the first bad row (`locate_bad_rows` names file, row group and column) or sets bad
rows aside (`split_bad_rows`, `write_quarantine`), by `data.on_bad_rows`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data import formats
from pipeline.data.ids import is_string_like
from pipeline.data.row_rules import RowRules, bad_row_reasons, split_bad_rows
from pipeline.data.sources import DayInput, LogSource
from pipeline.errors import DataError

BAD_ROWS_FIX = "clean the data, or set data.on_bad_rows: quarantine to set bad rows aside and go on"


# ---------------------------------------------------------------------------- file checks (schemas only)


@dataclass(frozen=True)
class Footer:
    """What a file's footer (Parquet) or first block (CSV) says about one file of a day."""

    uri: str
    partition: str
    schema: pa.Schema
    rows: int  # Parquet: from the footer; CSV: -1 (counting needs a parse)
    row_groups: int


def parquet_files(paths: list[str]) -> list[str]:
    """The Parquet files of the given partitions; a missing or empty partition is an error, not zero rows."""
    return [f for path in paths for f in LogSource.of(path).files(path)]


def _inputs(days, source: LogSource | None) -> tuple[LogSource, list[DayInput]]:
    """(source, day inputs) from day inputs, or from bare Parquet partition paths (the older form)."""
    days = list(days.values()) if isinstance(days, dict) else list(days)
    if days and isinstance(days[0], DayInput):
        return source or LogSource.of(days[0].path), days
    return LogSource.of(""), [DayInput(dt.date.min, p, tuple(parquet_files([p]))) for p in days]


def read_footers(days, source: LogSource | None = None) -> list[Footer]:
    """The schema of every file of the days (Parquet footers, CSV first blocks), read in parallel (S3 round
    trips). `days`: `DayInput`s, or Parquet partition paths."""
    source, inputs = _inputs(days, source)
    jobs = list(dict.fromkeys((uri, day.path) for day in inputs for uri in day.files))
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(jobs)))) as pool:
        return list(pool.map(lambda job: _footer(source, *job), jobs))


def _footer(source: LogSource, uri: str, partition: str) -> Footer:
    with formats.reading(uri):
        if source.format != "parquet":
            return Footer(uri, partition, formats.file_schema(source, uri), -1, 0)
        fs, path = storage.filesystem(uri)
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            return Footer(uri, partition, parquet.schema_arrow, parquet.metadata.num_rows, parquet.num_row_groups)


def check_columns(days, needed: list[str], source: LogSource | None = None) -> list[Footer]:
    """Fails when a needed column is absent from a file, or has another type than in the first file."""
    footers = read_footers(days, source)
    _raise_all(_missing_columns(footers, needed) + _differing_types(footers, needed))
    return footers


def check_partitions(days, features, columns: list[str] | None = None, source: LogSource | None = None,
                     ) -> dict[str, int]:
    """All file checks for days about to be read by a spec with this `features` section, every problem
    reported at once.

    Args:
        days: `DayInput`s (a `{day: DayInput}` dict is fine), or Parquet partition paths.
        features: the spec's `FeaturesSpec`: gives each column its role, hence its expected dtype.
        columns: the columns to be read (default: id, label and model inputs).

    Returns:
        Rows per partition, from the footers (Parquet; -1 for other formats, which need a parse to count).

    Raises:
        DataError: listing every problem: a file unreadable or lacking a column, a column of the wrong type
            or of different types in two files, a partition with no rows.
    """
    source, inputs = _inputs(days, source)
    columns = columns or [c for c in [features.id, features.label, *features.input_columns()] if c]
    footers = read_footers(inputs, source)
    problems = _missing_columns(footers, columns)
    expected = _expected_types(features)
    for footer in footers:
        problems += _wrong_dtypes(footer, {c: expected[c] for c in columns if c in expected})
    problems += _differing_types(footers, columns)
    rows: dict[str, int] = {}
    for footer in footers:
        rows[footer.partition] = rows.get(footer.partition, 0) + footer.rows
    problems += [f"partition {path!r} has no rows (its Parquet files hold 0 rows); rewrite it with the day's "
                 "data, or leave the day out of data.train_days / data.eval_days"
                 for path, count in rows.items() if count == 0]
    _raise_all(problems)
    return rows


def _raise_all(problems: list[str]) -> None:
    if problems:
        raise DataError.of_all(problems)


def _missing_columns(footers: list[Footer], needed: list[str]) -> list[str]:
    problems = []
    for footer in footers:
        missing = [c for c in needed if c not in footer.schema.names]
        if missing:
            problems.append(f"click logs at {footer.uri!r} lack column(s) {missing}; columns present: "
                            f"{footer.schema.names}. Fix the features section of the spec or the data.")
    return problems


def _differing_types(footers: list[Footer], columns: list[str]) -> list[str]:
    problems = []
    for name in columns:
        having = [f for f in footers if name in f.schema.names]
        if not having:
            continue
        first = having[0]
        want = first.schema.field(name).type
        for footer in having[1:]:
            got = footer.schema.field(name).type
            if not want.equals(got) and not (_text(want) and _text(got)):
                problems.append(f"column {name!r} is {got} in {footer.uri!r} but {want} in {first.uri!r}; every "
                                f"file of the click logs must share one schema: rewrite the odd file(s) with {name} "
                                f"as {want}")
                break
    return problems


def _text(kind: pa.DataType) -> bool:
    return is_string_like(kind)


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


# Column role -> (test of the Arrow type, what was expected and how to fix it).
_ID = (lambda t: pa.types.is_integer(t) or is_string_like(t),
       "integer or text ids (text ids are hashed to int64); write the ids as integers or strings")
_NUMBER = (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t),
           "a number (int or float); parse or cast it to float32 when writing the click logs")


def _expected_types(features) -> dict[str, tuple]:
    expected = {name: _ID for name in [features.id, features.group, *features.categorical] if name}
    expected |= {name: _NUMBER for name in features.dense}
    if features.sequence:
        delimited = features.sequence.delimiter is not None
        expected[features.sequence.column] = (
            lambda t: (_is_list(t) and (pa.types.is_integer(t.value_type) or is_string_like(t.value_type)))
            or (delimited and is_string_like(t)),
            "a list of ids (list<int64> with 0 as padding, or list<string>)"
            + (", or text ids joined by features.sequence.delimiter" if delimited else
               "; for ids joined in one text column (1^2^3) set features.sequence.delimiter"),
        )
    if features.task == "multiclass":
        expected[features.label] = (pa.types.is_integer, f"integer class ids 0..{features.num_classes - 1}")
    elif features.label_threshold is not None:
        expected[features.label] = (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t),
                                    "a number to compare with features.label_threshold")
    else:
        expected[features.label] = (
            lambda t: pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t),
            "0/1 as an integer, boolean or float column; write the label as a number, or set "
            "features.label_threshold to make it from a numeric column (e.g. rating >= 4)",
        )
    return expected


def _wrong_dtypes(footer: Footer, expected: dict[str, tuple]) -> list[str]:
    problems = []
    for name, (accepts, wanted) in expected.items():
        if name not in footer.schema.names:
            continue  # reported as missing
        got = footer.schema.field(name).type
        if not accepts(got):
            problems.append(f"column {name!r} of {footer.uri!r} has type {got}, expected {wanted}")
    return problems


# ---------------------------------------------------------------------------- finding and setting aside


def locate_bad_rows(file_uri: str, rules: RowRules, columns: list[str] | None = None,
                    source: LogSource | None = None) -> dict | None:
    """The first bad row of one file, read row group by row group (a CSV as one group); None when all
    rows are good.

    Returns:
        {"file", "row_group", "row_in_group", "column", "reason", "bad_rows_in_group"}.
    """
    if source is not None and source.format != "parquet":
        with formats.reading(file_uri):
            names = formats.file_schema(source, file_uri).names
            table = formats.read_columns(source, file_uri, [c for c in (columns or rules.columns) if c in names])
        return _first_bad(file_uri, 0, table, rules, table.column_names)
    fs, path = storage.filesystem(file_uri)
    with formats.reading(file_uri), fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        present = [c for c in (columns or rules.columns) if c in parquet.schema_arrow.names]
        for group in range(parquet.num_row_groups):
            found = _first_bad(file_uri, group, parquet.read_row_group(group, columns=present), rules, present)
            if found:
                return found
    return None


def _first_bad(file_uri: str, group: int, table: pa.Table, rules: RowRules, present: list[str]) -> dict | None:
    reasons = bad_row_reasons(table, rules)
    bad = pc.is_valid(reasons)
    count = pc.sum(bad).as_py() or 0
    if not count:
        return None
    row = pc.index(bad, True).as_py()
    reason = reasons[row].as_py()
    column = max((c for c in present if reason.startswith(f"{c}: ")), key=len)
    return {"file": file_uri, "row_group": group, "row_in_group": row, "column": column, "reason": reason,
            "bad_rows_in_group": count}


def check_rows(files: list[str], rules: RowRules, columns: list[str] | None = None,
               source: LogSource | None = None) -> None:
    """Raises a `DataError` naming the first bad row of `files` (file, row group, row, column), if any.

    Reads the data: the label stage calls it when `data.on_bad_rows: fail` and a batch held a bad row.
    """
    for uri in files:
        location = locate_bad_rows(uri, rules, columns, source)
        if location:
            raise DataError(describe_bad_rows(location))


def describe_bad_rows(location: dict) -> str:
    """The `DataError` text for a bad row found by `locate_bad_rows`: where, what, and how to fix."""
    return (f"bad row in {location['file']}, row group {location['row_group']}, row {location['row_in_group']}"
            f" of the group, column {location['column']!r}: {location['reason']} "
            f"({location['bad_rows_in_group']} bad row(s) in that row group); {BAD_ROWS_FIX}")


# Marks a bad-row failure raised inside a Ray worker, so the driver knows to locate the row for the user.
BAD_ROWS_MARKER = "bad row(s) under data.on_bad_rows: fail"


def drop_bad_rows(batch: pa.Table, rules: RowRules, fail: bool, quarantine_dir: str | None = None) -> pa.Table:
    """A `map_batches` step of a read: the good rows; the bad ones are written to `quarantine_dir` (the
    label stage) or dropped; when `fail`, an error at the first bad row instead (the driver then locates
    it with `check_rows`)."""
    good, bad = split_bad_rows(batch, rules)
    if bad.num_rows and fail:
        raise DataError(f"{bad.num_rows} {BAD_ROWS_MARKER}; first: {bad.column('reason')[0]}")
    if quarantine_dir is not None:
        write_quarantine(bad, quarantine_dir)
    return good


def write_quarantine(bad_rows: pa.Table, directory: str) -> str | None:
    """Writes bad rows (with their `reason`) to `<directory>/bad-<content hash>.parquet`; None when empty.

    The name comes from the content, so a retried Ray task rewrites the same file instead of adding one.
    """
    if bad_rows.num_rows == 0:
        return None
    buffer = io.BytesIO()
    pq.write_table(bad_rows.combine_chunks(), buffer)
    data = buffer.getvalue()
    uri = storage.join(directory, f"bad-{hashlib.sha256(data).hexdigest()[:20]}.parquet")
    storage.atomic_write_bytes(uri, data)
    return uri
