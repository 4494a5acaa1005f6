"""Where a day's click-log rows are: day partitions (`date=`, `dt=`, `ds=`, `day=`, `pt=`, values
YYYY-MM-DD or YYYYMMDD), an explicit {day: path} map, or a flat log whose days come from a time column;
Parquet or CSV/TSV (gzip too).

A `LogSource` (plain values, built from the spec's `data` section) turns days into `DayInput`s: the
files to read and, for a flat log, the time window to keep. Everything else (checks, reads, labelling)
works on `DayInput`s, whatever the layout.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import zoneinfo
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.errors import DataError

PARTITION_KEYS = ("date", "dt", "ds", "day", "pt")
SUFFIXES = {"parquet": (".parquet",),
            "csv": (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")}
_PARTITION = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(\d{4})-?(\d{2})-?(\d{2})$")
_MS_FROM = 10**11  # an integer time above this is in milliseconds (10^11 s is the year 5138)


@dataclass(frozen=True)
class CsvOptions:
    """The spec's `data.csv`, as plain values for Ray's read tasks."""

    delimiter: str = ","
    header: bool = True
    column_names: tuple[str, ...] | None = None
    null_values: tuple[str, ...] | None = None
    text_columns: tuple[str, ...] = ()  # ids: always read as text, hashed like any string id


@dataclass(frozen=True)
class TimeColumn:
    """A flat log's time column: which days a row belongs to, in `timezone`."""

    column: str
    unit: str = "auto"  # integers: s, ms, or auto
    timezone: str = "UTC"

    def day_bounds(self, day: dt.date) -> tuple[int, int]:
        """[start, end) of `day` in unix seconds: local midnight to the next (DST days are 23 or 25 h)."""
        zone = zoneinfo.ZoneInfo(self.timezone)
        start = dt.datetime.combine(day, dt.time(), zone)
        end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), zone)
        return int(start.timestamp()), int(end.timestamp())

    def seconds(self, values: pa.Array | pa.ChunkedArray, where: str = "") -> np.ndarray:
        """Unix seconds (float64, NaN for null) of each value: integers by `unit`, timestamps (a naive one
        is wall-clock time in `timezone`), or ISO-8601 text."""
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        kind = values.type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind):
            numbers = values.to_numpy(zero_copy_only=False).astype(np.float64)
            unit = self.unit
            if unit == "auto":
                finite = numbers[np.isfinite(numbers)]
                unit = "ms" if finite.size and np.abs(finite).max() > _MS_FROM else "s"
            return numbers / 1000.0 if unit == "ms" else numbers
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            values = self._parse_text(values, where)
            kind = values.type
        if not pa.types.is_timestamp(kind):
            raise DataError(f"data.time_column {self.column!r}{where} has type {kind}; expected unix seconds or "
                            "ms (an integer), an Arrow timestamp or ISO-8601 text; set data.time_column to such a "
                            "column")
        if kind.tz is None:
            values = pc.assume_timezone(values, self.timezone, ambiguous="earliest", nonexistent="earliest")
        micros = pc.cast(pc.cast(values, pa.timestamp("us", "UTC")), pa.int64())
        return micros.to_numpy(zero_copy_only=False).astype(np.float64) / 1e6

    def _parse_text(self, values: pa.Array, where: str) -> pa.Array:
        for target in (pa.timestamp("us"), pa.timestamp("us", "UTC")):
            try:
                return pc.cast(values, target)
            except pa.ArrowInvalid:
                continue
        valid = values.filter(pc.is_valid(values))
        bad = next((v for v in valid.to_pylist() if _unparseable(v)), valid[0].as_py() if len(valid) else None)
        raise DataError(f"data.time_column {self.column!r}{where} holds text that is not a time, e.g. {bad!r}; "
                        "write ISO-8601 times (2026-11-28 13:45:00), unix seconds or ms, or fix the bad values")

    def pushdown(self, kind: pa.DataType, days: list[dt.date]):
        """A Ray Data predicate keeping `days`' rows, for Parquet logs to push into the scan, or None for text
        times (parsed per row).

        It prunes row groups by their statistics; `mask` still decides each row. An integer column of unknown
        unit gets both the seconds and the milliseconds window: for any real date they cannot overlap."""
        from ray.data.expressions import col, lit

        start, end = self.day_bounds(min(days))[0], self.day_bounds(max(days))[1]
        field = col(self.column)
        if pa.types.is_integer(kind) or pa.types.is_floating(kind):
            units = {"s": [1], "ms": [1000], "auto": [1, 1000]}[self.unit]
            windows = [(field >= lit(start * u)) & (field < lit(end * u)) for u in units]
            return windows[0] if len(windows) == 1 else windows[0] | windows[1]
        if pa.types.is_timestamp(kind):
            zone = zoneinfo.ZoneInfo(self.timezone)
            low, high = (dt.datetime.fromtimestamp(t, zone) for t in (start, end))
            if kind.tz is None:  # naive: wall-clock time in the zone
                low, high = low.replace(tzinfo=None), high.replace(tzinfo=None)
            return (field >= lit(pa.scalar(low, type=kind))) & (field < lit(pa.scalar(high, type=kind)))
        return None

    def mask(self, values: pa.Array | pa.ChunkedArray, days: list[dt.date], where: str = "") -> np.ndarray:
        """True for the rows that fall on one of `days`."""
        seconds = self.seconds(values, where)
        keep = np.zeros(len(seconds), dtype=bool)
        for day in days:
            start, end = self.day_bounds(day)
            keep |= (seconds >= start) & (seconds < end)
        return keep

    def days_of(self, values: pa.Array | pa.ChunkedArray, where: str = "") -> dict[dt.date, int]:
        """{local day: rows} of the values (nulls belong to no day)."""
        seconds = self.seconds(values, where)
        seconds = np.sort(seconds[np.isfinite(seconds)])
        if not seconds.size:
            return {}
        zone = zoneinfo.ZoneInfo(self.timezone)
        first, last = (dt.datetime.fromtimestamp(s, zone).date() for s in (seconds[0], seconds[-1]))
        counts = {}
        for offset in range((last - first).days + 1):
            day = first + dt.timedelta(days=offset)
            start, end = self.day_bounds(day)
            rows = int(np.searchsorted(seconds, end) - np.searchsorted(seconds, start))
            if rows:
                counts[day] = rows
        return counts


def _unparseable(value: str) -> bool:
    try:
        pc.cast(pa.array([value]), pa.timestamp("us"))
        return False
    except pa.ArrowInvalid:
        return True


@dataclass(frozen=True)
class DayInput:
    """One day of click logs: the files that hold it and, for a flat log, the time window to keep."""

    day: dt.date
    path: str  # the day's partition (file or folder), or the flat log's root
    files: tuple[str, ...]
    time: TimeColumn | None = None


@dataclass(frozen=True)
class LogSource:
    """How to find and parse the click logs; build it with `LogSource.from_spec(spec.data)`."""

    location: str | dict  # a root (or flat log) path, or {day: path}
    format: str = "parquet"
    partition_key: str | None = None
    time: TimeColumn | None = None
    csv: CsvOptions = field(default_factory=CsvOptions)

    @classmethod
    def from_spec(cls, spec) -> LogSource:
        """From a `JobSpec`: its `data` section, and from `features` the id columns a CSV holds as text."""
        data, features, csv = spec.data, spec.features, spec.data.csv
        ids = [features.id, features.group, *features.categorical,
               *([features.sequence.column] if features.sequence and features.sequence.delimiter else [])]
        return cls(
            location=data.location, format="csv" if data.source == "csv" else "parquet",
            partition_key=data.partition_key,
            time=TimeColumn(data.time_column, data.time_unit, data.timezone) if data.time_column else None,
            csv=CsvOptions(csv.delimiter, csv.header, tuple(csv.column_names) if csv.column_names else None,
                           tuple(csv.null_values) if csv.null_values is not None else None,
                           tuple(dict.fromkeys(c for c in ids if c))),
        )

    @classmethod
    def of(cls, source: LogSource | str | dict) -> LogSource:
        """A source as it is, or a bare location (a Parquet partition root or {day: path}) as one."""
        return source if isinstance(source, LogSource) else cls(location=source)

    @property
    def suffixes(self) -> tuple[str, ...]:
        return SUFFIXES[self.format]

    def files(self, path: str) -> list[str]:
        """The data files of a partition or flat log; a missing or empty one is an error, not zero rows."""
        if not storage.exists(path):  # on S3, a missing bucket is a DataError naming it
            raise DataError(f"partition {path!r} does not exist; check data.path and the days selected "
                            "(data.train_days, data.eval_days)")
        found = storage.list_files(path, self.suffixes)
        if not found:
            raise DataError(f"{path!r} holds no {' / '.join(self.suffixes)} files; remove it or rewrite it"
                            + ("" if self.format == "csv" else " (CSV logs need data.source: csv)"))
        return found

    def available(self) -> dict[dt.date, DayInput]:
        """Every day the logs hold."""
        if isinstance(self.location, dict):
            missing = {d.isoformat(): p for d, p in self.location.items() if not storage.exists(p)}
            if missing:
                raise DataError(f"data.partitions names paths that do not exist: {missing}; fix the paths "
                                "(--set 'data.partitions={2026-01-01: /path/file.parquet}' overrides them)")
            return {d: DayInput(d, p, tuple(self.files(p))) for d, p in self.location.items()}
        root = self.location
        if not storage.exists(root):
            raise DataError(f"click-log path {root!r} does not exist; check data.path (or run `distill generate SPEC`)")
        if self.time is not None:
            files = tuple(self.files(root))
            days = rows_by_day(self, files)
            if not days:
                raise DataError(f"data.time_column {self.time.column!r} of the logs under {root!r} holds no "
                                "times (every value is null); point data.time_column at the event time")
            return {d: DayInput(d, root, files, self.time) for d in days}
        return {d: DayInput(d, p, tuple(self.files(p))) for d, p in self.partitions(root).items()}

    def partitions(self, root: str) -> dict[dt.date, str]:
        """{day: partition folder} under `root`, by `partition_key` or the one of PARTITION_KEYS present."""
        names = storage.list_dir(root)
        found: dict[str, dict[dt.date, str]] = {}
        for name in names:
            match = _PARTITION.match(name)
            if not match or (self.partition_key or "") not in ("", match.group(1)):
                continue
            if not self.partition_key and match.group(1) not in PARTITION_KEYS:
                continue
            try:
                day = dt.date(*(int(g) for g in match.groups()[1:]))
            except ValueError:
                raise DataError(f"partition {storage.join(root, name)!r} names no real day; rename it "
                                "(YYYY-MM-DD or YYYYMMDD)") from None
            found.setdefault(match.group(1), {})[day] = storage.join(root, name)
        if len(found) > 1:
            raise DataError(f"partitions under {root!r} use several keys ({', '.join(sorted(found))}); set "
                            "data.partition_key to the one that holds the days")
        if not found:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"
            wanted = f"{self.partition_key}=" if self.partition_key else "date=, dt=, ds=, day= or pt="
            raise DataError(
                f"no day partitions ({wanted} folders named YYYY-MM-DD or YYYYMMDD) under {root!r}; found: {shown}. Set "
                "data.partition_key to your folders' key, data.time_column for a flat log with an event-time "
                "column, or data.partitions to map each day to its file(s)")
        return next(iter(found.values()))

    def inputs(self, days: list[dt.date]) -> dict[dt.date, DayInput]:
        """The `DayInput` of each of `days`; names every missing day and what exists.

        A flat log may have quiet days: a day without rows inside a window that has some is a day of 0 rows,
        not a missing one (a missing partition, by contrast, is missing data)."""
        found = self.available()
        if self.time is not None and any(d in found for d in days):
            any_day = next(found[d] for d in days if d in found)
            return {d: found.get(d, DayInput(d, any_day.path, any_day.files, self.time)) for d in days}
        missing = [d.isoformat() for d in days if d not in found]
        if missing:
            have = ", ".join(d.isoformat() for d in sorted(found))
            where = f" (by data.time_column {self.time.column!r})" if self.time else ""
            raise DataError(f"missing click-log days under {self.location!r}{where}: {', '.join(missing)}; "
                            f"available days: {have}")
        return {d: found[d] for d in days}


def rows_by_day(source: LogSource, files: tuple[str, ...]) -> dict[dt.date, int]:
    """{day: rows} of a flat log, from its time column alone (read once per file version, then cached)."""
    counts: dict[dt.date, int] = {}
    for uri in files:
        for day, rows in _file_days(source, uri, storage.version(uri)).items():
            counts[day] = counts.get(day, 0) + rows
    return dict(sorted(counts.items()))


@functools.lru_cache(maxsize=1024)
def _file_days(source: LogSource, uri: str, version: str) -> dict[dt.date, int]:
    from pipeline.data import formats  # formats reads files; sources only finds them

    names = formats.file_schema(source, uri).names
    if source.time.column not in names:  # else pyarrow's "No match for FieldRef" reads as a corrupt file
        raise DataError(f"data.time_column {source.time.column!r} is not a column of {uri!r}; columns present: "
                        f"{names}; set data.time_column to the event-time column")
    column = formats.read_columns(source, uri, [source.time.column]).column(source.time.column)
    return source.time.days_of(column, f" in {uri!r}")
