"""`distill inspect`: what a click log holds, from one bounded pass.

The layout (day partitions, a flat log, an explicit map), rows (Parquet footers; CSV records counted only up
to `CSV_COUNT_BYTES`), and per column the type, null rate, distinct count and an example, all from a sample
of at most `sample_rows` rows spread over the files. `pipeline.data.propose` turns the result into a
`features:` section.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.data import formats
from pipeline.data.sources import SUFFIXES, LogSource, TimeColumn, rows_by_day
from pipeline.errors import DataError

CSV_COUNT_BYTES = 256 * 2**20  # counting a CSV's rows parses it: beyond this, the count is left out


@dataclass(frozen=True)
class ColumnProfile:
    """One column, as sampled."""

    name: str
    type: pa.DataType
    null_rate: float
    distinct: int  # among the sampled non-null values: a lower bound on the log's
    example: object


@dataclass
class LogSummary:
    """A log's layout, size and sampled columns."""

    source: LogSource
    files: list[str]
    days: dict[dt.date, int] | None  # {day: rows} where days are known (partitions, map or time column)
    rows: int | None  # None: not counted (large CSV)
    sample: pa.Table
    columns: list[ColumnProfile] = field(default_factory=list)

    @property
    def layout(self) -> str:
        if isinstance(self.source.location, dict):
            return "data.partitions (a file per day)"
        if self.source.time is not None:
            return f"a flat log, days from data.time_column {self.source.time.column!r}"
        if self.days is not None:
            return "day partitions" + (f" ({self.source.partition_key}=)" if self.source.partition_key else "")
        return "a flat log with no days (no partitions, no time column)"


def source_for_path(path: str, fmt: str | None = None, partition_key: str | None = None,
                    time_column: str | None = None, timezone: str = "UTC", delimiter: str | None = None) -> LogSource:
    """A `LogSource` for a bare path: the format from the files' suffixes unless given; partitions when
    found, else a flat log (days from `time_column` when given)."""
    if not storage.exists(path):
        raise DataError(f"{path!r} does not exist; give a click-log file or folder, or a job spec (.yaml)")
    fmt = fmt or _guess_format(path)
    source = LogSource(location=path, format=fmt, partition_key=partition_key,
                       time=TimeColumn(time_column, "auto", timezone) if time_column else None)
    if delimiter or path.endswith((".tsv", ".tsv.gz")):
        source = replace(source, csv=replace(source.csv, delimiter=delimiter or "\t"))
    return source


def _guess_format(path: str) -> str:
    if storage.list_files(path, SUFFIXES["parquet"]):
        return "parquet"
    if storage.list_files(path, SUFFIXES["csv"]):
        return "csv"
    raise DataError(f"{path!r} holds no Parquet or CSV/TSV files ({', '.join(SUFFIXES['parquet'] + SUFFIXES['csv'])})")


def summarise(source: LogSource, sample_rows: int = 100_000) -> LogSummary:
    """The log's layout and rows, and a profile of each column over at most `sample_rows` sampled rows."""
    files_by_day, files = _layout(source)
    counts = {uri: _file_rows(source, uri) for uri in files}
    rows = None if None in counts.values() else sum(counts.values())
    if source.time is not None:
        days = rows_by_day(source, tuple(files))
    elif files_by_day is not None:
        days = {day: sum(counts[uri] or 0 for uri in found) for day, found in files_by_day.items()}
    else:
        days = None
    sample = _sample(source, files, sample_rows)
    return LogSummary(source, files, days, rows, sample, [_profile(sample, name) for name in sample.column_names])


def with_time_column(summary: LogSummary, column: str, timezone: str = "UTC") -> LogSummary:
    """The summary of a flat log with its days derived from `column` (a read of that column alone)."""
    source = replace(summary.source, time=TimeColumn(column, "auto", timezone))
    return replace(summary, source=source, days=rows_by_day(source, tuple(summary.files)))


def _layout(source: LogSource) -> tuple[dict[dt.date, tuple[str, ...]] | None, list[str]]:
    """({day: files} where the layout names days, else None; every file)."""
    if isinstance(source.location, dict) or source.time is not None:
        inputs = source.available()
        files = sorted({uri for day in inputs.values() for uri in day.files})
        return (None if source.time is not None else {day: found.files for day, found in inputs.items()}), files
    try:
        partitions = source.partitions(source.location)
    except DataError:  # no day folders: a flat log
        return None, source.files(source.location)
    by_day = {day: tuple(source.files(path)) for day, path in partitions.items()}
    return by_day, [uri for found in by_day.values() for uri in found]


def _file_rows(source: LogSource, uri: str) -> int | None:
    if source.format == "csv" and storage.file_version(uri)["size"] > CSV_COUNT_BYTES:
        return None
    return formats.file_rows(source, uri)


def _sample(source: LogSource, files: list[str], sample_rows: int) -> pa.Table:
    """The first rows of evenly spaced files, `sample_rows` in all: every part of the log is seen."""
    picked = files if len(files) <= 20 else [files[i * len(files) // 20] for i in range(20)]
    per_file = max(1, sample_rows // len(picked))
    tables = [formats.head(source, uri, per_file).slice(0, per_file) for uri in picked]
    return pa.concat_tables(tables, promote_options="permissive")


def _profile(sample: pa.Table, name: str) -> ColumnProfile:
    column = sample.column(name)
    rows = len(column)
    valid = column.filter(pc.is_valid(column)) if column.null_count else column
    example = valid[0].as_py() if len(valid) else None
    if pa.types.is_null(column.type):  # a CSV column with no values at all
        distinct = 0
    elif pa.types.is_nested(column.type):
        distinct = pc.count_distinct(pc.list_flatten(column)).as_py()
    else:
        distinct = pc.count_distinct(column, mode="only_valid").as_py()
    return ColumnProfile(name, column.type, column.null_count / rows if rows else 0.0, distinct, example)
