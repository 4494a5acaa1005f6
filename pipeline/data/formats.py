"""Reading click-log files, Parquet or CSV/TSV (gzip too), with pyarrow on the driver and Ray Data's
readers in the cluster: a file's schema, its rows, a few of its columns, and the streaming read of days.

CSV columns that hold ids (row id, group, categorical, a delimited sequence) are read as text, so that
a day whose ids happen to be all digits gets the same type, hence the same hashed ids, as every other
day; everything else is typed by pyarrow's inference. Empty cells and the null strings are nulls.

A ragged CSV row (too few or too many fields) stops the read, or under `data.on_bad_rows: quarantine`
is written to the quarantine folder with its line and text (`RaggedRows`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.ids import is_string_like
from pipeline.data.sources import DayInput, LogSource
from pipeline.errors import DataError

CSV_ERROR_MARKER = "CSV parse error"


class RaggedRows:
    """pyarrow's `invalid_row_handler`: a ragged row stops the read (`fail`) or is quarantined and skipped."""

    def __init__(self, fail: bool = True, quarantine_dir: str | None = None):
        self.fail, self.quarantine_dir, self.skipped, self.first = fail, quarantine_dir, 0, None

    def __call__(self, row) -> str:
        if self.fail:
            self.first = self.first or row  # the driver's strict parse names its line
            return "error"
        self.skipped += 1
        if self.quarantine_dir is not None:
            reason = f"ragged CSV row: expected {row.expected_columns} fields, got {row.actual_columns}"
            table = pa.table({"reason": [reason], "line": [row.number], "text": [row.text]})
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            data = buffer.getvalue()  # named by content: a retried read task rewrites the same file
            storage.atomic_write_bytes(storage.join(self.quarantine_dir, f"bad-csv-{hashlib.sha256(data).hexdigest()[:20]}"
                                                    ".parquet"), data)
        return "skip"


def csv_options(source: LogSource, columns: list[str] | None = None, rows: RaggedRows | None = None,
                threads: bool = True) -> dict:
    """`read_options`, `parse_options` and `convert_options` for pyarrow (and Ray Data's `read_csv`)."""
    csv = source.csv
    convert = {"column_types": {c: pa.string() for c in csv.text_columns}, "strings_can_be_null": True,
               "quoted_strings_can_be_null": True}
    if csv.null_values is not None:
        convert["null_values"] = list(csv.null_values)
    if columns is not None:
        convert["include_columns"] = list(columns)
    return {
        "read_options": pacsv.ReadOptions(column_names=list(csv.column_names) if csv.column_names else None,
                                          skip_rows=1 if csv.column_names and csv.header else 0,
                                          use_threads=threads),  # a single thread knows each row's number
        "parse_options": pacsv.ParseOptions(delimiter=csv.delimiter, invalid_row_handler=rows or RaggedRows()),
        "convert_options": pacsv.ConvertOptions(**convert),
    }


@contextlib.contextmanager
def reading(uri: str):
    """Turns a missing, truncated or corrupt file (or an S3 failure) into a `DataError` naming `uri`: every
    driver-side read below goes through it, so a bad file never reaches the user as a traceback."""
    try:
        with storage.s3_errors(uri):
            yield
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{uri} does not exist; check the path (if it was there a moment ago, something "
                        "rewrote the click logs while the job ran: rerun when it is done)") from None
    except PermissionError:
        raise DataError(f"cannot read {uri}: permission denied; give this user read access to it") from None
    except (pa.ArrowException, OSError, EOFError, UnicodeDecodeError) as exc:  # OSError: a bad .gz too
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "CSV" if not uri.endswith(".parquet") else "Parquet"
        raise DataError(f"{uri} is not a readable {kind} file, truncated or corrupt ({reason}); rewrite it, "
                        "or remove it from its partition") from None


def _open(uri: str):
    fs, path = storage.filesystem(uri)
    handle = fs.open(path, "rb", compression="gzip" if uri.endswith(".gz") else None)
    return handle


def file_schema(source: LogSource, uri: str) -> pa.Schema:
    """A file's schema: the Parquet footer, or the types of a CSV's first block."""
    with reading(uri), _open(uri) as handle:
        if source.format == "parquet":
            return pq.ParquetFile(handle).schema_arrow
        with pacsv.open_csv(handle, **csv_options(source, rows=RaggedRows(fail=False))) as reader:
            _ = reader.schema.names  # decoded here, so that a header that is not UTF-8 fails inside reading()
            return reader.schema  # a ragged row is the read's business, not the schema's


def file_rows(source: LogSource, uri: str) -> int:
    """Rows of a file: the Parquet footer's count, or a CSV's records (ragged rows included) from a parse of
    its first column."""
    with reading(uri), _open(uri) as handle:
        if source.format == "parquet":
            return pq.ParquetFile(handle).metadata.num_rows
        rows = RaggedRows(fail=False)
        options = csv_options(source, rows=rows)
        first = file_schema(source, uri).names[0]
        options["convert_options"].include_columns = [first]
        options["convert_options"].column_types = {first: pa.string()}
        return pacsv.read_csv(handle, **options).num_rows + rows.skipped


def read_columns(source: LogSource, uri: str, columns: list[str], rows: RaggedRows | None = None) -> pa.Table:
    """`columns` of one file, read on the driver (a time column, a sample for checks)."""
    with reading(uri), _open(uri) as handle:
        if source.format == "parquet":
            return pq.read_table(handle, columns=columns)
        return pacsv.read_csv(handle, **csv_options(source, columns, rows or RaggedRows(fail=False)))


def head(source: LogSource, uri: str, rows: int, ragged: RaggedRows | None = None) -> pa.Table:
    """About the first `rows` rows of a file (whole Parquet row groups or CSV blocks), for checks."""
    with reading(uri), _open(uri) as handle:
        if source.format == "parquet":
            parquet = pq.ParquetFile(handle)
            first = next(parquet.iter_batches(batch_size=rows), None)
            return pa.Table.from_batches([first] if first is not None else [], schema=parquet.schema_arrow)
        batches = []
        with pacsv.open_csv(handle, **csv_options(source, rows=ragged or RaggedRows(fail=False))) as reader:
            for batch in reader:
                batches.append(batch)
                if sum(b.num_rows for b in batches) >= rows:
                    break
        return pa.Table.from_batches(batches, schema=reader.schema)


def read_days(source: LogSource, inputs: list[DayInput], columns: list[str], rows: RaggedRows | None = None,
              text_ids: tuple[str, ...] = (), task_cpus: float | None = None):
    """The days' files as a lazy Ray Dataset of `columns` (one read task per file), time window applied.

    `text_ids`: the id columns (or a sequence of ids) the read will hash when they hold text; Parquet gives
    those as dictionaries (`dictionary_paths`), so each row group's distinct ids are hashed once.
    `task_cpus`: the CPUs each read task reserves (Ray Data's default, 1, when None).
    """
    import ray.data

    from pipeline import runtime

    files = list(dict.fromkeys(f for day in inputs for f in day.files))
    time = inputs[0].time if inputs else None
    wanted = list(dict.fromkeys([*columns, *([time.column] if time else [])]))
    days = [d.day for d in inputs]
    paths, filesystem = storage.arrow_paths(files)  # on S3, carries the endpoint to Ray's readers
    if source.format == "parquet":
        dictionaries = dictionary_paths(files[0], [c for c in text_ids if c in wanted]) if files and text_ids else []
        with runtime.parquet_reader_v1():  # one read task per file: see clicklogs.read_named_files
            dataset = ray.data.read_parquet(paths, filesystem=filesystem, override_num_blocks=len(paths),
                                            columns=wanted, dataset_kwargs={"read_dictionary": dictionaries}
                                            if dictionaries else None, num_cpus=task_cpus)
        # A flat log's time window goes into the scan (Ray Data's predicate pushdown): row groups outside it
        # are not read.
        if time is not None and files:
            kind = file_schema(source, files[0]).field(time.column).type
            if (pushdown := time.pushdown(kind, days)) is not None:
                dataset = dataset.filter(expr=pushdown)
    else:
        dataset = ray.data.read_csv(paths, filesystem=filesystem, override_num_blocks=len(paths),
                                    file_extensions=None, num_cpus=task_cpus, **csv_options(source, wanted, rows))
    if time is not None:
        dataset = dataset.map_batches(keep_days, batch_format="pyarrow", zero_copy_batch=True, num_cpus=task_cpus,
                                      fn_kwargs={"time": time, "days": days, "columns": columns})
    return dataset


def dictionary_paths(uri: str, columns: list[str]) -> list[str]:
    """The Parquet column paths of `columns` that hold text, a column's own or its list items' (e.g.
    `hist.list.element`), from `uri`'s footer: what the reader can hand over as Arrow dictionaries (the
    file's dictionary pages, not a string per value). Every file of a log holds one type per column
    (`validate.check_partitions`)."""
    with reading(uri), _open(uri) as handle:
        parquet = pq.ParquetFile(handle)
        arrow, schema = parquet.schema_arrow, parquet.schema
    text = set()
    for name in (c for c in columns if c in arrow.names):  # a column a file lacks is the file checks' to name
        kind = arrow.field(name).type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            kind = kind.value_type
        if is_string_like(kind) and not pa.types.is_dictionary(kind):
            text.add(name)
    leaves = [schema.column(i).path for i in range(len(schema))]
    return [path for path in leaves if path.split(".", 1)[0] in text]


def keep_days(batch: pa.Table, time, days: list, columns: list[str]) -> pa.Table:
    """The rows of `batch` on `days` (by the time column), with only `columns`: a `map_batches` step."""
    keep = time.mask(batch.column(time.column), days)
    return batch.filter(pa.array(keep)).select(columns)


def locate_unreadable(source: LogSource, files: list[str], columns: list[str]) -> None:
    """Raises the `DataError` naming the first of `files` whose `columns` cannot be decoded (a data page
    corrupt behind a sound footer: the file checks read footers only, so a read task is the first to see it)."""
    for uri in files:  # one batch at a time: a day is never held whole
        with reading(uri), _open(uri) as handle:
            if source.format == "parquet":
                parquet = pq.ParquetFile(handle)
                for _ in parquet.iter_batches(columns=[c for c in columns if c in parquet.schema_arrow.names]):
                    pass
            else:
                with pacsv.open_csv(handle, **csv_options(source, rows=RaggedRows(fail=False))) as reader:
                    for _ in reader:
                        pass


def locate_csv_error(source: LogSource, files: list[str]) -> None:
    """Raises a `DataError` naming the file, line and text of the first ragged or unparseable CSV row."""
    for uri in files:
        rows = RaggedRows(fail=True)
        try:
            with storage.s3_errors(uri), _open(uri) as handle:
                pacsv.read_csv(handle, **csv_options(source, rows=rows, threads=False))
        except pa.ArrowInvalid as exc:
            if rows.first is not None:
                row = rows.first
                line = row.number if row.number is not None else "?"  # pyarrow's: the 1-based line in the file
                raise DataError(f"{uri}, line {line}: ragged CSV row, {row.actual_columns} fields where the header "
                                f"has {row.expected_columns}: {row.text[:120]!r}; fix the row, or set "
                                "data.on_bad_rows: quarantine to set ragged rows aside") from None
            raise DataError(f"{uri}: {str(exc).strip().splitlines()[0]}; fix the value, or the column's role in "
                            "the spec's features section") from None
