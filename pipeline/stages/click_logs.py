"""Click-log stage: make sure the spec's days exist (generating the synthetic log when asked), check
them before Ray starts, and read a window of days with the spec's bad-row policy."""

from __future__ import annotations

import contextlib
import datetime as dt

from pipeline import storage
from pipeline.data import clicklogs, validate
from pipeline.data.split import keep_side
from pipeline.data.synthetic import generate_click_logs
from pipeline.errors import DataError, UserError
from pipeline.spec import JobSpec


def ensure_click_logs(spec: JobSpec) -> None:
    """For `data.source: synthetic`, generates the spec's days when they are not on disk yet."""
    if spec.data.source != "synthetic":
        return
    present = clicklogs.available_days(spec.data.path) if storage.exists(spec.data.path) else {}
    missing = [d for d in spec.data.all_days() if d not in present]
    if missing:
        generate(spec, missing)  # only what is missing: existing partitions keep their fingerprints


def check_inputs(spec: JobSpec) -> None:
    """Fails before Ray starts when a selected day, a needed column or a file is missing, unreadable or of
    the wrong type (footers only: no data is read here)."""
    needed = [spec.features.label, spec.features.group, *spec.features.input_columns()]
    if spec.validation_key:
        needed.append(spec.validation_key)  # a row split hashes it
    for days, extra in ((spec.data.train_days.days(), [spec.features.id]), (spec.data.eval_days.days(), [])):
        paths = clicklogs.partition_paths(spec.data.location, days)
        validate.check_partitions(paths, spec.features, [c for c in needed + extra if c])


def generate(spec: JobSpec, days: list[dt.date] | None = None) -> list[str]:
    """Writes the synthetic click log for `days` (default: every train and eval day of the spec)."""
    if storage.is_remote(spec.data.path):
        raise UserError(f"the synthetic generator writes local paths only, not {spec.data.path!r}; generate to a "
                        "local data.path, upload it (e.g. `aws s3 cp --recursive`), then use data.source: parquet")
    synthetic = spec.data.synthetic
    paths = []
    for day in days or spec.data.all_days():  # a date's data does not depend on the other days
        paths += generate_click_logs(
            spec.data.path, start_date=day, days=1, rows_per_day=synthetic.rows_per_day, users=synthetic.users,
            items=synthetic.items, categories=synthetic.categories, seq_len=synthetic.seq_len,
            seed=synthetic.seed, drift=synthetic.drift,
        )
    print(f"generated {len(paths)} days x {synthetic.rows_per_day:,} rows under {spec.data.path}", flush=True)
    return paths


def read_window(spec: JobSpec, days: list[dt.date], columns: list[str], quarantine_dir: str | None = None):
    """The days' click logs as a lazy Ray Dataset of `columns`, with the spec's row checks in the read tasks:
    a bad row stops the read (`on_bad_rows: fail`), or is dropped (and written to `quarantine_dir`)."""
    fail = spec.data.on_bad_rows == "fail"
    return clicklogs.read_click_logs(spec.data.location, days, columns, rules=validate.RowRules.from_spec(spec),
                                     fail=fail, quarantine_dir=None if fail else quarantine_dir)


def split_side(dataset, spec: JobSpec, validation: bool):
    """The training (or validation) rows of `dataset` under a fraction split; a days split is by day, so a
    dataset of fit days (or validation days) is already one side."""
    if not spec.validation_key:
        return dataset
    return dataset.map_batches(keep_side, batch_format="pyarrow", zero_copy_batch=True,
                               fn_kwargs={"key": spec.validation_key, "fraction": spec.data.held_out_fraction,
                                          "validation": validation})


def read_validation(spec: JobSpec, columns: list[str]):
    """The validation rows of the click logs (label and model inputs), or None without a split."""
    if spec.data.validation is None:
        return None
    wanted = list(dict.fromkeys([*columns, *([spec.validation_key] if spec.validation_key else [])]))
    days = spec.data.validation_days()
    return split_side(read_window(spec, days, wanted), spec, validation=True)


@contextlib.contextmanager
def bad_rows_located(spec: JobSpec, days: list[dt.date], columns: list[str]):
    """Under `data.on_bad_rows: fail`, a bad row stops a Ray task inside a worker, and the driver sees a
    wrapped error; this finds the row again (one file at a time) and raises a `DataError` naming the
    file, row group and column."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, UserError) or validate.BAD_ROWS_MARKER not in str(exc):
            raise
        paths = list(clicklogs.partition_paths(spec.data.location, days).values())
        validate.check_rows(clicklogs.parquet_files(paths), validate.RowRules.from_spec(spec), columns)
        raise DataError(f"a bad row stopped the stage but could not be located again: {exc}") from None
