"""Click logs: find the days a spec selects (`pipeline.data.sources`), check their schema, and open them as a
streaming Ray Dataset with only the needed columns, bad rows handled and values normalised.

The checks themselves (schemas, dtypes, bad rows) live in `pipeline.data.validate`; file reading in
`pipeline.data.formats`; what the models get from a raw value in `pipeline.data.normalise`.
"""

from __future__ import annotations

import datetime as dt

from pipeline import runtime, storage
from pipeline.data import formats
from pipeline.data.normalise import Normaliser, normalise
from pipeline.data.sources import DayInput, LogSource
from pipeline.data.validate import check_columns, drop_bad_rows, read_footers
from pipeline.errors import DataError

__all__ = ["DataError", "DayInput", "LogSource", "available_days", "check_columns", "count_rows", "day_inputs",
           "partition_dataset", "partition_fingerprint", "partition_paths", "read_click_logs"]


def available_days(source: LogSource | str | dict) -> dict[dt.date, str]:
    """Every day of the logs, as {day: partition path} (a flat log's days all map to its path)."""
    return {d: day.path for d, day in LogSource.of(source).available().items()}


def day_inputs(source: LogSource | str | dict, days: list[dt.date]) -> dict[dt.date, DayInput]:
    """The `DayInput` (files, time window) of each day; names every missing day and what exists."""
    return LogSource.of(source).inputs(days)


def partition_paths(source: LogSource | str | dict, days: list[dt.date]) -> dict[dt.date, str]:
    """The partition paths for `days`; names every missing day and what exists."""
    return {d: day.path for d, day in day_inputs(source, days).items()}


def partition_dataset(source: LogSource | str | dict, days: list[dt.date]):
    """A pyarrow dataset over the days' files: reads footers (or CSV headers) only until data is asked for."""
    import pyarrow.dataset as pads

    source = LogSource.of(source)
    files = [f for day in day_inputs(source, days).values() for f in day.files]
    fs, _ = storage.filesystem(files[0])
    return pads.dataset([storage.filesystem(f)[1] for f in files], filesystem=fs,
                        format="parquet" if source.format == "parquet" else
                        pads.CsvFileFormat(**{k: v for k, v in formats.csv_options(source).items()
                                              if k != "read_options"}, read_options=formats.csv_options(source)["read_options"]))


def partition_fingerprint(source: LogSource | str | dict, day: DayInput | str) -> dict:
    """What identifies a day's content without reading it: its files' names, sizes and modification times
    (local) or ETags (S3), plus its row count (Parquet footers; a CSV's records; a flat log's rows of the day)."""
    source = LogSource.of(source)
    if isinstance(day, str):  # a partition path
        day = DayInput(dt.date.min, day, tuple(source.files(day)))
    return {"path": day.path, "rows": count_rows(source, [day]), "files": [storage.file_version(f) for f in day.files]}


def count_rows(source: LogSource | str | dict | list, inputs: list[DayInput] | None = None) -> int:
    """Rows of the days, without reading data pages where the format allows (Parquet footers).

    `count_rows([partition paths])` (a bare list) counts Parquet partitions, as it always did.
    """
    if inputs is None:  # the old form: Parquet partition paths
        return sum(footer.rows for footer in read_footers(source))
    source = LogSource.of(source)
    total = 0
    for day in inputs:
        if day.time is not None:
            from pipeline.data.sources import rows_by_day

            total += rows_by_day(source, day.files).get(day.day, 0)
        else:
            total += sum(formats.file_rows(source, f) for f in day.files)
    return total


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


def prepare_batch(batch, rules, fail: bool, quarantine_dir: str | None, normaliser: Normaliser | None):
    """A read task's step: the bad-row policy on the raw values, then the values normalised."""
    if rules is not None:
        batch = drop_bad_rows(batch, rules, fail, quarantine_dir)
    return normalise(batch, normaliser) if normaliser is not None else batch


def read_click_logs(source: LogSource | str | dict, days: list[dt.date], columns: list[str], rules=None,
                    fail: bool = True, quarantine_dir: str | None = None, normaliser: Normaliser | None = None,
                    task_cpus: float | None = None):
    """Streams the selected days as a Ray Dataset with only `columns`.

    Args:
        rules: `validate.RowRules`; bad rows are dropped (written to `quarantine_dir` first, when given),
            or stop the read when `fail`. None: no row checks. The checks run in the read tasks, so an
            actor pool downstream (the teacher) spends its time on the model alone.
        normaliser: string ids hashed, nulls filled (`pipeline.data.normalise`); None: raw values.
        task_cpus: the CPUs each read task reserves (Ray Data's default, 1, when None).
    """
    source = LogSource.of(source)
    inputs = list(day_inputs(source, days).values())
    check_columns(inputs, columns, source)
    ragged = formats.RaggedRows(fail=fail, quarantine_dir=quarantine_dir)
    text_ids = normaliser.text_id_columns() if normaliser is not None else ()
    dataset = formats.read_days(source, inputs, columns, ragged, text_ids, task_cpus)  # only `columns` decoded
    if rules is not None or normaliser is not None:
        # Quarantine files may go to S3: give the read tasks the endpoint, as the label actors get it.
        env = storage.worker_env() if quarantine_dir else {}
        extra = {"runtime_env": {"env_vars": env}} if env else {}
        dataset = dataset.map_batches(prepare_batch, batch_format="pyarrow", zero_copy_batch=True, num_cpus=task_cpus,
                                      fn_kwargs={"rules": rules, "fail": fail, "quarantine_dir": quarantine_dir,
                                                 "normaliser": normaliser}, **extra)
    return dataset
