"""Click-log stage: make sure the spec's days exist (generating the synthetic log when asked), check
them before Ray starts, and read a window of days with the spec's bad-row policy."""

from __future__ import annotations

import contextlib
import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.data import clicklogs, formats, validate
from pipeline.data.normalise import Normaliser
from pipeline.data.sources import LogSource
from pipeline.data.split import RowSplit, Side
from pipeline.data.synthetic import PRIVILEGED_COLUMN, generate_click_logs
from pipeline.errors import DataError, UserError
from pipeline.spec import JobSpec


def log_source(spec: JobSpec) -> LogSource:
    """Where and how the spec's click logs are read (layout, format, time column)."""
    return LogSource.from_spec(spec)


def ensure_click_logs(spec: JobSpec) -> None:
    """For `data.source: synthetic`, generates the spec's days when they are not on disk yet (or were written
    with the other `data.synthetic.privileged` setting)."""
    if spec.data.source != "synthetic":
        return
    present = clicklogs.available_days(log_source(spec)) if storage.exists(spec.data.path) else {}
    missing = [d for d in spec.data.all_days() if d not in present]
    missing += _other_privileged_setting(spec, [d for d in spec.data.all_days() if d in present])
    if missing:
        generate(spec, sorted(missing))  # only what is missing: existing partitions keep their fingerprints


def _other_privileged_setting(spec: JobSpec, days: list[dt.date]) -> list[dt.date]:
    """Days written with the other `data.synthetic.privileged` setting (with or without its column): written
    again, so the files are what the spec generates (their new fingerprints relabel them)."""
    if not days:
        return []
    source, wanted = log_source(spec), spec.data.synthetic.privileged
    return [d for d, day in clicklogs.day_inputs(source, days).items()
            if (PRIVILEGED_COLUMN in formats.file_schema(source, day.files[0]).names) != wanted]


def check_inputs(spec: JobSpec) -> None:
    """Fails before Ray starts when a selected day, a needed column or a file is missing, unreadable or of
    the wrong type, with every such problem in one error (schemas only: no data is read here)."""
    needed = [spec.features.label, spec.features.group, *spec.features.input_columns(), *spec.split_keys]
    source, problems = log_source(spec), []
    for days, extra in ((spec.data.train_days.days(), [spec.features.id]), (spec.data.eval_days.days(), [])):
        try:
            inputs = clicklogs.day_inputs(source, days)
            lacking, present = _teacher_only_checks(spec, inputs, source)
            problems += lacking
            validate.check_partitions(inputs, spec.log_features, [c for c in needed + extra + present if c], source)
        except DataError as exc:
            problems += exc.each
    if problems:
        raise DataError.of_all(problems)


def _teacher_only_checks(spec: JobSpec, inputs: dict, source: LogSource) -> tuple[list[str], list[str]]:
    """(problems, the teacher-only columns every file has): a teacher-only column a file lacks is named with
    the teacher that reads it (the teacher reads its extra columns on the training and the evaluation days)."""
    if not spec.teacher_only_columns:
        return [], []
    footers, problems = validate.read_footers(inputs, source), []
    for teacher in spec.teacher:
        for column in teacher.extra_features.columns:
            lacking = [f for f in footers if column not in f.schema.names]
            if lacking:
                more = f" (and {len(lacking) - 1} more file(s))" if len(lacking) > 1 else ""
                problems.append(f"teacher {teacher.name!r} reads the teacher-only column {column!r} "
                                f"(extra_features), which {lacking[0].uri!r}{more} lacks; columns present: "
                                f"{lacking[0].schema.names}. Add the column to the log or remove it from the "
                                "teacher's extra_features")
    present = [c for c in spec.teacher_only_columns if all(c in f.schema.names for f in footers)]
    return problems, present


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
            seed=synthetic.seed, drift=synthetic.drift, privileged=synthetic.privileged,
        )
    print(f"generated {len(paths)} days x {synthetic.rows_per_day:,} rows under {spec.data.path}", flush=True)
    return paths


def read_window(spec: JobSpec, days: list[dt.date], columns: list[str], quarantine_dir: str | None = None,
                task_cpus: float | None = None):
    """The days' click logs as a lazy Ray Dataset of `columns`, with the spec's row checks in the read tasks:
    a bad row stops the read (`on_bad_rows: fail`), or is dropped (and written to `quarantine_dir`).
    `task_cpus`: what each read task reserves (Ray Data's default, 1, when None)."""
    fail = spec.data.on_bad_rows == "fail"
    return clicklogs.read_click_logs(log_source(spec), days, columns, rules=validate.RowRules.from_spec(spec),
                                     fail=fail, quarantine_dir=None if fail else quarantine_dir,
                                     normaliser=Normaliser.from_spec(spec), task_cpus=task_cpus)


def sample_rows(spec: JobSpec, days: list[dt.date], columns: list[str], rows: int):
    """About `rows` normalised rows from the first file of `days` (latency samples; no bad-row checks)."""
    from pipeline.data.normalise import normalise

    source = log_source(spec)
    first = next(iter(clicklogs.day_inputs(source, days).values())).files[0]
    return normalise(formats.head(source, first, rows).select(columns), Normaliser.from_spec(spec)).slice(0, rows)


def raw_rows(spec: JobSpec, days: list[dt.date], columns: list[str], rows: int):
    """Up to `rows` good rows of `columns` as the log holds them (not normalised), from the first rows of the
    days' files, file after file: the parity check's rows and the kinds a signature records."""
    from pipeline.data.row_rules import split_bad_rows

    source, rules, parts, have = log_source(spec), validate.RowRules.from_spec(spec), [], 0
    files = dict.fromkeys(f for day in clicklogs.day_inputs(source, days).values() for f in day.files)
    for uri in files:  # a flat log lists the same file for every day: once
        good, _ = split_bad_rows(formats.head(source, uri, rows - have).select(columns), rules)
        parts.append(good)
        have += good.num_rows
        if have >= rows:
            break
    return pa.concat_tables(parts).slice(0, rows)


def schema_names(spec: JobSpec, days: list[dt.date]) -> list[str]:
    """The columns of the first file of `days`."""
    source = log_source(spec)
    return formats.file_schema(source, next(iter(clicklogs.day_inputs(source, days).values())).files[0]).names


def split_side(dataset, spec: JobSpec, side: Side):
    """The `side` rows (train, validation or evaluation) of `dataset` under the spec's row splits; a side held
    out by days needs no row filter (a dataset of fit days, validation days or eval days is that side), but
    evaluation rows are taken out of every other side on every day."""
    if not spec.split_keys:
        return dataset
    return dataset.map_batches(RowSplit.from_spec(spec).keep, batch_format="pyarrow", zero_copy_batch=True,
                               fn_kwargs={"side": side})


def read_validation(spec: JobSpec, columns: list[str]):
    """The validation rows of the click logs (label and model inputs), or None without a split."""
    if spec.data.validation is None:
        return None
    wanted = list(dict.fromkeys([*columns, *spec.split_keys]))
    return split_side(read_window(spec, spec.data.validation_days(), wanted), spec, "validation")


def read_evaluation(spec: JobSpec, columns: list[str]):
    """The evaluation rows of the click logs: the eval days' rows, or with `data.evaluation` only those whose
    key hashes into the evaluation side."""
    wanted = list(dict.fromkeys([*columns, *spec.split_keys]))
    return split_side(read_window(spec, spec.data.eval_days.days(), wanted), spec, "evaluation")


@contextlib.contextmanager
def bad_rows_located(spec: JobSpec, days: list[dt.date], columns: list[str]):
    """Under `data.on_bad_rows: fail`, a bad row stops a Ray task inside a worker, and the driver sees a
    wrapped error; this finds the row again (one file at a time) and raises a `DataError` naming the
    file, row group and column."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, UserError):
            raise
        source = log_source(spec)
        files = list(dict.fromkeys(f for day in clicklogs.day_inputs(source, days).values() for f in day.files))
        if source.format == "csv" and formats.CSV_ERROR_MARKER in str(exc):
            formats.locate_csv_error(source, files)
            raise DataError(f"a CSV row stopped the stage but could not be located again: {exc}") from None
        if validate.BAD_ROWS_MARKER not in str(exc):
            if _is_read_error(exc):
                formats.locate_unreadable(source, files, columns)  # a file that cannot be decoded, named
            raise
        validate.check_rows(files, validate.RowRules.from_spec(spec), columns, source)
        raise DataError(f"a bad row stopped the stage but could not be located again: {exc}") from None


def _is_read_error(exc: BaseException) -> bool:
    """Whether a failed Ray task failed decoding a file: Ray's task error subclasses the cause's type (and
    keeps it as `cause`), so a read task's ArrowInvalid or OSError shows through."""
    seen, depth = exc, 0
    while seen is not None and depth < 10:
        if isinstance(seen, (pa.ArrowException, EOFError)) or \
                (isinstance(seen, OSError) and not isinstance(seen, ConnectionError)):
            return True
        seen, depth = getattr(seen, "cause", None) or seen.__cause__, depth + 1
    return False


def check_data(spec: JobSpec, rows_per_file: int = 10_000) -> None:
    """`distill validate --data`: the file checks, then a bounded read of the first rows of every file
    (bad rows, the time column, the sequence delimiter, string ids), every problem in one error."""
    from pipeline.data.normalise import delimiter_splits, normalise

    problems = []
    try:
        check_inputs(spec)
    except DataError as exc:
        problems += exc.each
    source, rules, normaliser = log_source(spec), validate.RowRules.from_spec(spec), Normaliser.from_spec(spec)
    try:
        files = list(dict.fromkeys(f for day in clicklogs.day_inputs(source, spec.data.all_days()).values()
                                   for f in day.files))
    except DataError:
        files = []  # the missing days are reported above
    sequence = spec.features.sequence
    for uri in files:
        try:
            ragged = formats.RaggedRows(fail=False)
            sample = formats.head(source, uri, rows_per_file, ragged)
            if ragged.skipped and spec.data.on_bad_rows == "fail":
                formats.locate_csv_error(source, [uri])
            if source.time is not None and source.time.column in sample.column_names:
                source.time.seconds(sample.column(source.time.column), f" in {uri!r}")
            reasons = validate.bad_row_reasons(sample, rules)
            if reasons.null_count < len(reasons) and spec.data.on_bad_rows == "fail":
                first = reasons.filter(pc.is_valid(reasons))
                problems.append(f"{uri}: {len(first)} of the first {sample.num_rows} rows are bad rows (first: "
                                f"{first[0].as_py()}); {validate.BAD_ROWS_FIX}")
            if sequence and sequence.delimiter and sequence.column in sample.column_names \
                    and not delimiter_splits(sample.column(sequence.column), sequence.delimiter):
                shown = sample.column(sequence.column).drop_null()
                problems.append(f"features.sequence.delimiter {sequence.delimiter!r} splits nothing in column "
                                f"{sequence.column!r} of {uri!r} (e.g. {shown[0].as_py() if len(shown) else None!r}); "
                                "set it to the character between the ids")
            try:
                normalise(sample, normaliser)
            except DataError as exc:
                problems.append(f"{uri}: {exc}")  # a batch knows no file name
        except DataError as exc:
            problems += exc.each
    if problems:
        raise DataError.of_all(problems)
