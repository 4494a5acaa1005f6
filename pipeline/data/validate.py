"""Click-log validation, pure pyarrow: file checks from Parquet footers, and finding or setting aside bad rows.

File checks (`check_columns`, `check_partitions`) read footers only, never data pages: a missing or
empty partition, a truncated file, a missing column, a wrong dtype or schemas that disagree fail
before any work, naming the file, the column, what was expected and how to fix it.

What a bad row is (`RowRules`, `bad_row_reasons`) lives in `pipeline.data.row_rules`. The label stage
either stops at the first bad row (`locate_bad_rows` names file, row group and column) or sets bad
rows aside (`split_bad_rows`, `write_quarantine`), by `data.on_bad_rows`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.row_rules import RowRules, bad_row_reasons, split_bad_rows
from pipeline.errors import DataError

BAD_ROWS_FIX = "clean the data, or set data.on_bad_rows: quarantine to set bad rows aside and go on"


# ---------------------------------------------------------------------------- file checks (footers only)


@dataclass(frozen=True)
class Footer:
    """What a Parquet footer says about one file of a partition."""

    uri: str
    partition: str
    schema: pa.Schema
    rows: int
    row_groups: int


@contextlib.contextmanager
def _reading(uri: str):
    """Turns a missing, truncated or corrupt file (or an S3 failure) into a `DataError` naming `uri`."""
    try:
        with storage.s3_errors(uri):
            yield
    except FileNotFoundError:
        raise DataError(f"{uri} does not exist; check the path (if it was there a moment ago, something "
                        "rewrote the click logs while the job ran: rerun when it is done)") from None
    except PermissionError:
        raise DataError(f"cannot read {uri}: permission denied; give this user read access to it") from None
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{uri} is not a readable Parquet file, truncated or corrupt ({reason}); rewrite it, "
                        "or remove it from its partition") from None


def parquet_files(paths: list[str]) -> list[str]:
    """The Parquet files of the given partitions; a missing or empty partition is an error, not zero rows."""
    files = []
    for path in paths:
        if not storage.exists(path):  # on S3, a missing bucket is a DataError naming it
            raise DataError(f"partition {path!r} does not exist; check data.path and the days selected "
                            "(data.train_days, data.eval_days)")
        found = storage.list_files(path)
        if not found:
            raise DataError(f"partition {path!r} holds no .parquet files; remove it or rewrite it")
        files += found
    return files


def read_footers(paths: list[str]) -> list[Footer]:
    """The footer of every Parquet file of the partitions `paths`, read in parallel (S3 round trips)."""
    jobs = [(uri, path) for path in paths for uri in parquet_files([path])]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(jobs)))) as pool:
        return list(pool.map(lambda job: _footer(*job), jobs))


def _footer(uri: str, partition: str) -> Footer:
    fs, path = storage.filesystem(uri)
    with _reading(uri), fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        return Footer(uri, partition, parquet.schema_arrow, parquet.metadata.num_rows, parquet.num_row_groups)


def check_columns(paths: list[str], needed: list[str]) -> list[Footer]:
    """Fails when a needed column is absent from a file, or has another type than in the first file."""
    footers = read_footers(paths)
    _require_columns(footers, needed)
    _require_same_types(footers, needed)
    return footers


def check_partitions(paths: list[str] | dict, features, columns: list[str] | None = None) -> dict[str, int]:
    """All file checks for partitions about to be read by a spec with this `features` section.

    Args:
        paths: partition directories (a `{day: path}` dict from `clicklogs.partition_paths` is fine).
        features: the spec's `FeaturesSpec`: gives each column its role, hence its expected dtype.
        columns: the columns to be read (default: id, label and model inputs).

    Returns:
        Rows per partition, from the footers.

    Raises:
        DataError: a partition is missing, empty or has no rows; a file is unreadable, lacks a column,
            has a column of the wrong type, or disagrees in type with another file.
    """
    paths = list(paths.values()) if isinstance(paths, dict) else list(paths)
    columns = columns or [features.id, features.label, *features.input_columns()]
    footers = read_footers(paths)
    _require_columns(footers, columns)
    expected = _expected_types(features)
    for footer in footers:
        _require_dtypes(footer, {c: expected[c] for c in columns if c in expected})
    _require_same_types(footers, columns)
    rows = {path: 0 for path in paths}
    for footer in footers:
        rows[footer.partition] += footer.rows
    empty = [path for path, count in rows.items() if count == 0]
    if empty:
        raise DataError(f"partition {empty[0]!r} has no rows (its Parquet files hold 0 rows); rewrite it with "
                        "the day's data, or leave the day out of data.train_days / data.eval_days")
    return rows


def _require_columns(footers: list[Footer], needed: list[str]) -> None:
    for footer in footers:
        missing = [c for c in needed if c not in footer.schema.names]
        if missing:
            raise DataError(f"click logs at {footer.uri!r} lack column(s) {missing}; columns present: "
                            f"{footer.schema.names}. Fix the features section of the spec or the data.")


def _require_same_types(footers: list[Footer], columns: list[str]) -> None:
    first = footers[0]
    for footer in footers[1:]:
        for name in columns:
            want, got = first.schema.field(name).type, footer.schema.field(name).type
            if not want.equals(got):
                raise DataError(f"column {name!r} is {got} in {footer.uri!r} but {want} in {first.uri!r}; "
                                "every file of the click logs must share one schema: rewrite the odd file(s) "
                                f"with {name} as {want}")


# Column role -> (test of the Arrow type, what was expected and how to fix it).
_INTEGER = (pa.types.is_integer, "integer ids (the models hash int64 ids); map string ids to integers, e.g. "
            "with a stable 64-bit hash, when writing the click logs")
_NUMBER = (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t),
           "a number (int or float); parse or cast it to float32 when writing the click logs")


def _expected_types(features) -> dict[str, tuple]:
    expected = {name: _INTEGER for name in [features.id, *features.categorical]}
    expected |= {name: _NUMBER for name in features.dense}
    if features.sequence:
        expected[features.sequence.column] = (
            lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
            and pa.types.is_integer(t.value_type),
            "a list of integer ids (0 is padding), e.g. list<int64>; write the history as a list column",
        )
    if features.task == "multiclass":
        expected[features.label] = (pa.types.is_integer, f"integer class ids 0..{features.num_classes - 1}")
    else:
        expected[features.label] = (
            lambda t: pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t),
            "0/1 as an integer, boolean or float column; write the label as a number, not text",
        )
    return expected


def _require_dtypes(footer: Footer, expected: dict[str, tuple]) -> None:
    for name, (accepts, wanted) in expected.items():
        got = footer.schema.field(name).type
        if not accepts(got):
            raise DataError(f"column {name!r} of {footer.uri!r} has type {got}, expected {wanted}")


# ---------------------------------------------------------------------------- finding and setting aside


def locate_bad_rows(file_uri: str, rules: RowRules, columns: list[str] | None = None) -> dict | None:
    """The first bad row of one Parquet file, read row group by row group; None when all rows are good.

    Returns:
        {"file", "row_group", "row_in_group", "column", "reason", "bad_rows_in_group"}.
    """
    fs, path = storage.filesystem(file_uri)
    with _reading(file_uri), fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        present = [c for c in (columns or rules.columns) if c in parquet.schema_arrow.names]
        for group in range(parquet.num_row_groups):
            reasons = bad_row_reasons(parquet.read_row_group(group, columns=present), rules)
            bad = pc.is_valid(reasons)
            count = pc.sum(bad).as_py() or 0
            if count:
                row = pc.index(bad, True).as_py()
                reason = reasons[row].as_py()
                column = max((c for c in present if reason.startswith(f"{c}: ")), key=len)
                return {"file": file_uri, "row_group": group, "row_in_group": row, "column": column,
                        "reason": reason, "bad_rows_in_group": count}
    return None


def check_rows(files: list[str], rules: RowRules, columns: list[str] | None = None) -> None:
    """Raises a `DataError` naming the first bad row of `files` (file, row group, row, column), if any.

    Reads the data: the label stage calls it when `data.on_bad_rows: fail` and a batch held a bad row.
    """
    for uri in files:
        location = locate_bad_rows(uri, rules, columns)
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
