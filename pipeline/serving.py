"""Serving an exported model without torch: the signature (input contract), ONNX Runtime sessions, the log ->
model-input step, per-call latency, parity figures, and `distill score`.

Nothing here imports torch: an exported model directory (`model.onnx` + `signature.json`) scores a log with
pyarrow, numpy and ONNX Runtime alone, which `tests/test_export.py` checks in a process where torch cannot load.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.ids import MISSING_ID, is_string_like
from pipeline.data.normalise import Normaliser, normalise
from pipeline.errors import DataError, UserError
from pipeline.features import FeatureLayout, table_to_arrays

SIGNATURE = "signature.json"
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
INPUT_DTYPES = {"categorical": "int64", "dense": "float32", "sequence": "int64"}
STRING_ID_HASH = ("pipeline.data.ids.hash_string_ids: pandas.util.hash_array(utf8 values, encoding='utf8', "
                  "hash_key='0123456789123456', categorize=False) >> 1 as int64")
AUC_TOLERANCE = 1e-6  # the exported model must rank the parity rows as the eager one does
Predict = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Signature:
    """What a server must feed the exported model, and how to make it from a click log."""

    format: str
    file: str
    task: str  # binary | multiclass
    out_dim: int
    layout: dict  # FeatureLayout.to_dict(): which log columns fill which input
    raw_columns: dict[str, str]  # {log column: kind}, see `column_kinds`
    dense_fill: float
    sequence_delimiter: str | None
    inputs: list[dict]  # [{name, dtype, shape}] in the graph's order
    output: dict
    about: dict  # role, family, checkpoint hash, exporter versions
    missing_id: int = MISSING_ID
    string_id_hash: str = STRING_ID_HASH
    quantized: str | None = None  # "int8" or "fp16": weight-only embedding tables in that type
    calibration: dict | None = None  # the calibrator inside the graph (`Calibrator.to_dict()`): the logit is calibrated

    @property
    def feature_layout(self) -> FeatureLayout:
        return FeatureLayout.from_dict(self.layout)

    def normaliser(self) -> Normaliser:
        layout = self.feature_layout
        # With missing indicators the graph fills (and flags) a missing dense value: it gets NaN.
        fill = None if layout.missing_indicators else self.dense_fill
        return Normaliser(ids=layout.categorical, dense=layout.dense, dense_fill=fill, label="",
                          label_threshold=None, sequence=layout.sequence,
                          sequence_of=layout.categorical[layout.sequence_field] if layout.sequence else None,
                          delimiter=self.sequence_delimiter)


def write_signature(signature: Signature, out_dir: str) -> None:
    storage.atomic_write_json(storage.join(out_dir, SIGNATURE), dataclasses.asdict(signature))


def read_signature(model_dir: str) -> Signature:
    path = storage.join(model_dir, SIGNATURE)
    if not storage.exists(path):
        raise UserError(f"{model_dir} holds no {SIGNATURE}, so it is not an exported model; make one with "
                        "`distill export RUN_DIR`")
    raw = storage.read_json(path)
    known = {f.name for f in dataclasses.fields(Signature)}
    return Signature(**{k: v for k, v in raw.items() if k in known})


# ---- the log's columns, as the model was evaluated on them ------------------------------------------------

def kind_of(kind: pa.DataType) -> str:
    """integer | text | number | boolean | null | list<integer> | list<text>, or the Arrow type's name."""
    if pa.types.is_dictionary(kind):
        return kind_of(kind.value_type)
    if pa.types.is_integer(kind):
        return "integer"
    if is_string_like(kind):
        return "text"
    if pa.types.is_floating(kind):
        return "float"
    if pa.types.is_boolean(kind):
        return "boolean"
    if pa.types.is_null(kind):
        return "null"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return f"list<{kind_of(kind.value_type)}>"
    return str(kind)


def column_kinds(schema: pa.Schema, layout: FeatureLayout) -> dict[str, str]:
    """{column: kind} of the model's log columns in `schema`."""
    return {name: _feature_kind(schema.field(name).type, name in layout.dense) for name in layout.columns}


def _feature_kind(kind: pa.DataType, dense: bool) -> str:
    """A dense column's ints and floats are both "number": each feeds the model as float32, as in training."""
    found = kind_of(kind)
    return "number" if dense and found in ("integer", "float") else found


def check_log_schema(schema: pa.Schema, signature: Signature, where: str) -> None:
    """Every signature column is in the log with the kind it had at evaluation; else one error listing all.
    An all-null column (kind null) passes: a missing value is a value."""
    dense, problems = set(signature.feature_layout.dense), []
    for name, expected in signature.raw_columns.items():
        if name not in schema.names:
            problems.append(f"column {name!r} is missing (the model reads it; the log has {schema.names})")
            continue
        found = _feature_kind(schema.field(name).type, name in dense)
        if found not in (expected, "null"):
            problems.append(f"column {name!r} holds {found} ({schema.field(name).type}), the model was "
                            f"evaluated on {expected}; write it as {expected} (nothing is cast silently)")
    if problems:
        raise DataError.of_all([f"{where}: {p}" for p in problems])


def log_to_arrays(table: pa.Table, signature: Signature) -> dict[str, np.ndarray]:
    """A batch of raw log rows -> the model's inputs: the same normalisation as training and evaluation."""
    layout = signature.feature_layout
    return table_to_arrays(normalise(table.select(layout.columns), signature.normaliser()), layout)


# ---- running a model --------------------------------------------------------------------------------------

class OnnxModel:
    """An ONNX Runtime session on CPU with `threads` intra-op threads; called with the model's input arrays."""

    def __init__(self, model: bytes | str, threads: int = 1, providers: list[str] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        data = storage.read_bytes(model) if isinstance(model, str) else model
        self.session = ort.InferenceSession(data, options, providers=providers or ["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {name: arrays[name] for name in self.input_names})[0]


def predict_in_batches(predict: Predict, arrays: dict[str, np.ndarray], batch_size: int = 8192) -> np.ndarray:
    rows = len(arrays["categorical"])
    parts = [predict({k: v[start:start + batch_size] for k, v in arrays.items()})
             for start in range(0, rows, batch_size)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def measure_calls(predict: Predict, arrays: dict[str, np.ndarray], batch_sizes: list[int], runs: int) -> dict:
    """Per-call latency (p50/p99 ms) and rows/s of `predict` at each batch size, one call at a time.

    `runs` calls at batch 64 or less, proportionally fewer at larger batches (at least 10), after warm-up calls;
    rows are repeated when the sample is smaller than a batch.
    """
    from pipeline import metrics  # numpy and scipy only

    table = {}
    for batch in batch_sizes:
        rows = np.arange(batch) % len(arrays["categorical"])
        inputs = {k: np.ascontiguousarray(v[rows]) for k, v in arrays.items()}
        calls = max(10, runs * 64 // max(64, batch))
        seconds = metrics.time_calls(lambda: predict(inputs), calls, warmup=max(3, calls // 10))
        ms = seconds * 1000
        table[str(batch)] = {"batch": batch, "p50_ms": float(np.percentile(ms, 50)),
                             "p99_ms": float(np.percentile(ms, 99)), "rows_per_s": float(batch / np.mean(seconds)),
                             "calls": calls}
    return table


def parity_report(reference: np.ndarray, exported: np.ndarray, labels: np.ndarray | None, tolerance: float,
                  worst: int = 5) -> dict:
    """The exported model's logits against the eager model's on the same rows.

    A logit passes when |diff| <= tolerance * max(1, |eager logit|): absolute for logits within +-1, relative
    beyond (fp32 carries ~7 significant digits, so a reordered sum moves a logit of 40 by more than one of 0.4).
    A NaN or inf where the other side has a number fails. A binary model with labels must also keep its AUC to
    `AUC_TOLERANCE`, or to what reordering near-tied pairs can move it by when that is more (`auc_flippable`:
    with few evaluation rows one swapped pair of logits 1e-7 apart moves the AUC by more than 1e-6).
    Multiclass: per row, the worst class.
    """
    from pipeline import metrics  # numpy and scipy only

    reference, exported = np.asarray(reference, np.float64), np.asarray(exported, np.float64)
    if reference.shape != exported.shape:
        return {"rows": len(reference), "passed": False, "tolerance": tolerance,
                "error": f"output shapes differ: eager {reference.shape}, exported {exported.shape}"}
    diff = np.abs(reference - exported)
    diff = np.where(np.isnan(reference) & np.isnan(exported), 0.0, np.nan_to_num(diff, nan=np.inf, posinf=np.inf))
    scaled = diff / np.maximum(1.0, np.abs(np.nan_to_num(reference)))
    per_row = diff.max(axis=1) if diff.ndim == 2 else diff
    per_row_scaled = scaled.max(axis=1) if scaled.ndim == 2 else scaled
    empty = len(per_row) == 0
    report = {"rows": len(per_row), "max_abs_diff": 0.0 if empty else float(per_row.max()),
              "mean_abs_diff": 0.0 if empty else float(per_row.mean()),
              "max_scaled_diff": 0.0 if empty else float(per_row_scaled.max()), "tolerance": tolerance}
    if labels is not None and reference.ndim == 1:
        auc_eager, auc_exported = metrics.auc(labels, reference), metrics.auc(labels, exported)
        report |= {"auc_eager": auc_eager, "auc_exported": auc_exported,
                   "auc_abs_diff": abs(auc_eager - auc_exported) if np.isfinite(auc_eager) else 0.0,
                   "auc_flippable": _flippable_auc(labels, reference, 2 * report["max_abs_diff"])}
    order = np.argsort(-per_row_scaled)[:worst]
    report["worst_rows"] = [{"row": int(i), "eager": _plain(reference[i]), "exported": _plain(exported[i]),
                             "abs_diff": float(per_row[i])} for i in order]
    auc_allowed = max(AUC_TOLERANCE, report.get("auc_flippable", 0.0))
    report["passed"] = bool(report["max_scaled_diff"] <= tolerance and report.get("auc_abs_diff", 0.0) <= auc_allowed)
    return report


def _flippable_auc(labels: np.ndarray, logits: np.ndarray, gap: float) -> float:
    """The AUC that swapping near-tied (click, non-click) pairs can move: the share of pairs whose logits are
    within `gap` of each other. Logits that each move by at most gap/2 can reorder only those pairs, so an AUC
    change beyond this (and beyond AUC_TOLERANCE) means the export ranks rows differently."""
    clicked = np.asarray(labels).astype(bool)
    positives, negatives = logits[clicked], np.sort(logits[~clicked])
    if not len(positives) or not len(negatives) or not np.isfinite(gap):
        return 0.0
    near = np.searchsorted(negatives, positives + gap, "right") - np.searchsorted(negatives, positives - gap, "left")
    return float(near.sum() / (len(positives) * len(negatives)))


def _plain(value) -> float | list[float]:
    return value.tolist() if isinstance(value, np.ndarray) else float(value)


def describe_parity_failure(name: str, fmt: str, report: dict) -> str:
    """A parity failure in words, with the worst rows."""
    if "error" in report:
        return f"the exported {name} ({fmt}) does not compute what was evaluated: {report['error']}"
    rows = "; ".join(f"row {w['row']}: eager {w['eager']}, exported {w['exported']} (|diff| {w['abs_diff']:.3g})"
                     for w in report["worst_rows"][:3])
    auc = (f", AUC {report['auc_eager']:.6f} eager vs {report['auc_exported']:.6f} exported"
           if "auc_eager" in report else "")
    return (f"the exported {name} ({fmt}) does not compute what was evaluated: max |logit diff| "
            f"{report['max_abs_diff']:.3g} (scaled by max(1, |logit|): {report['max_scaled_diff']:.3g} > tolerance "
            f"{report['tolerance']:g}) over {report['rows']} rows{auc}. Worst: {rows}")


# ---- distill score ----------------------------------------------------------------------------------------

def score_log(model_dir: str, log: str, out: str, *, threads: int = 1, batch_rows: int = 65_536,
              delimiter: str | None = None) -> dict:
    """Scores every row of a Parquet or CSV log (a file or a folder of files) with the exported ONNX model in
    `model_dir`; writes the log's rows plus `logit` (and `probability`, binary) to `out` as Parquet.

    Streams: one record batch of at most `batch_rows` rows at a time. Returns {"rows", "files", "out"}.
    """
    signature = read_signature(model_dir)
    if signature.format != "onnx":
        raise UserError(f"{model_dir} holds a {signature.format} export; `distill score` runs ONNX exports "
                        "(export one with `distill export RUN_DIR --format onnx`)")
    model = OnnxModel(storage.join(model_dir, signature.file), threads=threads)
    files = _log_files(log)
    storage.check_writable(_folder_of(out), setting="--out")  # makes a missing folder; names an unwritable one
    fs, path = storage.filesystem(out)
    partial = f"{path}.partial"  # renamed to `out` once complete: a crash never leaves a short file there
    rows, writer = 0, None
    with fs.open(partial, "wb") as handle:
        for file in files:
            for batch in _batches(file, signature, batch_rows, delimiter):
                scored = _score_batch(model, signature, batch)
                writer = writer or pq.ParquetWriter(handle, scored.schema)
                writer.write_table(scored)
                rows += scored.num_rows
        if writer is not None:
            writer.close()
    if writer is None:
        fs.rm(partial)
        raise DataError(f"{log} has no rows to score")
    fs.mv(partial, path)
    return {"rows": rows, "files": len(files), "out": out}


def _folder_of(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if storage.is_remote(uri) else os.path.dirname(os.path.abspath(uri))


def _log_files(log: str) -> list[str]:
    files = storage.list_files(log, (".parquet", ".csv", ".tsv", ".csv.gz", ".tsv.gz"))
    if not files:
        raise DataError(f"{log}: no such file, or a folder without .parquet/.csv/.tsv files")
    return files


def _batches(path: str, signature: Signature, batch_rows: int, delimiter: str | None):
    """Record batches of the signature's columns (and every other column, passed through)."""
    fs, inside = storage.filesystem(path)
    if path.endswith(".parquet"):
        with fs.open(inside, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            check_log_schema(parquet.schema_arrow, signature, path)
            for batch in parquet.iter_batches(batch_size=batch_rows):
                yield pa.Table.from_batches([batch])
        return
    sep = delimiter or ("\t" if ".tsv" in path else ",")
    types = {name: _CSV_TYPES[kind] for name, kind in signature.raw_columns.items() if kind in _CSV_TYPES}
    with fs.open(inside, "rb", compression="infer") as handle, _csv_errors(path, fs, inside, sep):
        reader = pacsv.open_csv(handle, parse_options=pacsv.ParseOptions(delimiter=sep),
                                read_options=pacsv.ReadOptions(block_size=1 << 22),
                                convert_options=pacsv.ConvertOptions(column_types=types))
        check_log_schema(reader.schema, signature, path)
        for batch in reader:
            yield pa.Table.from_batches([batch])


@contextlib.contextmanager
def _csv_errors(path: str, fs, inside: str, sep: str):
    """A CSV value that does not parse as its column's kind (text in an id column, say): the file and column."""
    try:
        yield
    except pa.ArrowInvalid as exc:
        found = re.search(r"column #(\d+)", str(exc))
        if found:  # pyarrow names the column by position: name it as the header does
            with fs.open(inside, "rt", compression="infer") as handle:
                header = next(csv.reader([handle.readline()], delimiter=sep))
            index = int(found.group(1))
            column = f"column {header[index]!r}: " if index < len(header) else ""
        else:
            column = ""
        raise DataError(f"{path}: {column}{exc}; each column must hold what the model was evaluated on "
                        f"({SIGNATURE}'s raw_columns)") from None


# CSV is text: each column is parsed as the kind the model was evaluated on (an unparseable value is an error).
_CSV_TYPES = {"integer": pa.int64(), "text": pa.string(), "number": pa.float64(), "float": pa.float64()}


def _score_batch(model: OnnxModel, signature: Signature, batch: pa.Table) -> pa.Table:
    logits = model(log_to_arrays(batch, signature))
    if signature.task == "binary":
        return batch.append_column("logit", pa.array(logits, pa.float32())).append_column(
            "probability", pa.array(1 / (1 + np.exp(-logits.astype(np.float64))), pa.float32()))
    width = logits.shape[1]
    return batch.append_column("logit", pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), width))
