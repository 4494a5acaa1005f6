"""Click logs on Parquet: find the `date=YYYY-MM-DD` partitions a spec selects, check their schema,
and open them as a streaming Ray Dataset with only the needed columns.

The checks themselves (footers, dtypes, bad rows) live in `pipeline.data.validate`.
"""

from __future__ import annotations

import datetime as dt
import re

import pyarrow.dataset as pads

from pipeline import runtime, storage
from pipeline.data.validate import check_columns, drop_bad_rows, parquet_files, read_footers
from pipeline.errors import DataError

__all__ = ["DataError", "available_days", "check_columns", "count_rows", "parquet_files", "partition_dataset",
           "partition_fingerprint", "partition_paths", "read_click_logs"]

_PARTITION = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")


def available_days(root: str | dict[dt.date, str]) -> dict[dt.date, str]:
    """All `date=` partitions under `root`, as {day: partition path}; a dict (`data.partitions`) is that map."""
    if isinstance(root, dict):
        missing = {d.isoformat(): p for d, p in root.items() if not storage.exists(p)}
        if missing:
            raise DataError(f"data.partitions names paths that do not exist: {missing}; fix the paths "
                            "(--set 'data.partitions={2026-01-01: /path/file.parquet}' overrides them)")
        return dict(root)
    if not storage.exists(root):
        raise DataError(f"click-log path {root!r} does not exist; check data.path (or run `distill generate SPEC`)")
    days = {}
    for name in storage.list_dir(root):
        match = _PARTITION.match(name)
        if match:
            days[dt.date.fromisoformat(match.group(1))] = storage.join(root, name)
    if not days:
        raise DataError(f"no date=YYYY-MM-DD partitions under {root!r}; expected e.g. {root}/date=2026-11-28/*.parquet")
    return days


def partition_paths(root: str | dict[dt.date, str], days: list[dt.date]) -> dict[dt.date, str]:
    """The partition paths for `days`; names every missing day and what exists."""
    found = available_days(root)
    missing = [d.isoformat() for d in days if d not in found]
    if missing:
        have = ", ".join(d.isoformat() for d in sorted(found))
        raise DataError(f"missing click-log partitions under {root!r}: {', '.join(missing)}; available days: {have}")
    return {d: found[d] for d in days}


def partition_dataset(paths: list[str]) -> pads.Dataset:
    """A pyarrow dataset over partition dirs: reads footers only until data is asked for."""
    fs, _ = storage.filesystem(paths[0])
    return pads.dataset([storage.filesystem(f)[1] for f in parquet_files(paths)], format="parquet", filesystem=fs)


def partition_fingerprint(path: str) -> dict:
    """What identifies a partition's content without reading it: its files' names and sizes, and
    their modification times (local) or ETags (S3), plus the row count from the Parquet footers."""
    fs, _ = storage.filesystem(path)
    files = []
    for uri in parquet_files([path]):
        info = fs.info(storage.filesystem(uri)[1])
        version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        files.append({"name": uri.rsplit("/", 1)[-1], "size": info["size"], "version": str(version)})
    return {"path": path, "rows": count_rows([path]), "files": files}


def count_rows(paths: list[str]) -> int:
    """Row count from Parquet footers, without reading data pages."""
    return sum(footer.rows for footer in read_footers(paths))


def read_named_files(files: list[str], filesystem):
    """`ray.data.read_parquet` over files we already know (a day's log files, a manifest's shards).

    With Ray Data's V1 Parquet reader (`runtime.parquet_reader_v1`). One read task per file (its output
    split only at Ray Data's target block size): V1 otherwise splits the reads into >= 200 small blocks,
    which the label stage wrote out as twice the shard files `label.shard_rows` asks for, and every
    training batch stitched together.
    """
    import ray.data

    with runtime.parquet_reader_v1():
        return ray.data.read_parquet(files, filesystem=filesystem, override_num_blocks=len(files))


def read_click_logs(root: str | dict[dt.date, str], days: list[dt.date], columns: list[str], rules=None,
                    fail: bool = True, quarantine_dir: str | None = None):
    """Streams the selected days as a Ray Dataset with only `columns`.

    Args:
        rules: `validate.RowRules`; bad rows are dropped (written to `quarantine_dir` first, when given),
            or stop the read when `fail`. None: no row checks. The checks run in the read tasks, so an
            actor pool downstream (the teacher) spends its time on the model alone.
    """
    import ray.data  # lazy here and above: the footer checks run before Ray starts

    paths = list(partition_paths(root, days).values())
    check_columns(paths, columns)
    files, filesystem = storage.arrow_paths(parquet_files(paths))  # on S3, carries the endpoint to Ray's readers
    dataset = read_named_files(files, filesystem)
    dataset = dataset.select_columns(columns)  # pushed down into the Parquet read: only these columns are decoded
    if rules is not None:
        # Quarantine files may go to S3: give the read tasks the endpoint, as the label actors get it.
        env = storage.worker_env() if quarantine_dir else {}
        extra = {"runtime_env": {"env_vars": env}} if env else {}
        dataset = dataset.map_batches(drop_bad_rows, batch_format="pyarrow", zero_copy_batch=True,
                                      fn_kwargs={"rules": rules, "fail": fail, "quarantine_dir": quarantine_dir},
                                      **extra)
    return dataset
