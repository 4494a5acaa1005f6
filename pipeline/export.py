"""A saved model as a serving artifact: ONNX (for ONNX Runtime) or TorchScript, its input contract
(`signature.json`) and a parity check against the eager model it came from.

The graph takes what the pipeline feeds a model: raw int64 ids (B, F), float32 dense values (B, D) and, with
a behaviour sequence, int64 ids (B, L). The id hashing into buckets and the dense transform are inside the
graph. What stays outside is written into the signature and done by `pipeline.serving.log_to_arrays`: string
ids hashed by `pipeline.data.ids.hash_string_ids`, a null id as `MISSING_ID`, a null dense value as the fill.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.calibration import PROB_FLOOR, Calibrator
from pipeline.errors import ExportError
from pipeline.features import FeatureLayout
from pipeline.models import ModelConfig
from pipeline.serving import (INPUT_DTYPES, MODEL_FILES, OnnxModel, Predict, Signature, parity_report,
                              predict_in_batches, write_signature)

OPSET = 18  # the dynamo exporter's default; ONNX Runtime 1.31 runs it on every provider
# Largest |logit difference| allowed against the eager model, per format (fp32), relative beyond |logit| 1
# (`serving.parity_report`). TorchScript runs the same kernels as eager; ONNX Runtime fuses and reorders float
# sums, so it differs in the last bits.
TOLERANCE = {"onnx": 1e-5, "torchscript": 1e-6}


@dataclass(frozen=True)
class Exported:
    """One export: the artifact's bytes and its signature (written together by `write_export`)."""

    model: bytes
    signature: Signature


class PositionalInputs(nn.Module):
    """The model with one tensor argument per input: exporters take tensors, the models take a dict."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(dict(zip(self.names, tensors)))


class CalibratedLogit(nn.Module):
    """The model followed by its calibrator (`pipeline.calibration`), as graph ops on the logit: one affine op
    for Platt and temperature; for isotonic, its piecewise-linear map of the logit to a probability (a sum of
    clamped ramps, one per knot interval: exportable ops only), turned back into a logit."""

    def __init__(self, model: nn.Module, calibrator: Calibrator):
        super().__init__()
        self.model, self.affine = model, calibrator.affine
        self.register_buffer("slope", torch.tensor(calibrator.slope, dtype=torch.float32))
        self.register_buffer("intercept", torch.tensor(calibrator.intercept, dtype=torch.float32))
        knots = np.asarray(calibrator.knots_logit or (0.0,), dtype=np.float64)
        probs = np.asarray(calibrator.knots_prob or (0.5,), dtype=np.float64)
        widths = np.diff(knots)
        # float64: a sum over hundreds of knots in float32 drifts by 1e-7 in probability, which the logit
        # near p = 0.01 magnifies past the parity tolerance, and ONNX Runtime sums in another order than torch
        self.register_buffer("starts", torch.tensor(knots[:-1], dtype=torch.float64))  # (K-1,)
        self.register_buffer("widths", torch.tensor(widths, dtype=torch.float64))
        self.register_buffer("gains", torch.tensor(np.diff(probs) / np.where(widths > 0, widths, 1.0),
                                                   dtype=torch.float64))
        self.register_buffer("first_prob", torch.tensor(probs[0], dtype=torch.float64))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logit = self.model(inputs)
        if self.affine:
            return logit * self.slope + self.intercept
        ramps = torch.minimum(torch.clamp(logit.double().unsqueeze(-1) - self.starts, min=0.0), self.widths)
        prob = torch.clamp(self.first_prob + ramps @ self.gains, PROB_FLOOR, 1 - PROB_FLOOR)  # (B,)
        return (torch.log(prob) - torch.log1p(-prob)).to(logit.dtype)


def calibrated(model: nn.Module, calibrator: Calibrator | None) -> nn.Module:
    """The model whose logit the calibrator maps (the model itself without one), in eval mode."""
    return CalibratedLogit(model, calibrator).eval() if calibrator else model


def input_names(layout: FeatureLayout) -> tuple[str, ...]:
    return ("categorical", "dense", "sequence") if layout.sequence else ("categorical", "dense")


def example_inputs(layout: FeatureLayout, rows: int = 7) -> tuple[torch.Tensor, ...]:
    """Inputs of the right dtypes and shapes (values do not matter: tracing follows no data-dependent branch)."""
    tensors = {"categorical": torch.arange(rows * len(layout.categorical), dtype=torch.int64).reshape(rows, -1),
               "dense": torch.ones(rows, len(layout.dense), dtype=torch.float32),
               "sequence": torch.ones(rows, max(layout.sequence_length, 1), dtype=torch.int64)}
    return tuple(tensors[name] for name in input_names(layout))


def export_model(model: nn.Module, config: ModelConfig, layout: FeatureLayout, fmt: str, *,
                 raw_columns: dict[str, str], dense_fill: float, sequence_delimiter: str | None,
                 about: dict, calibration: dict | None = None) -> Exported:
    """Exports `model` (eval mode, CPU) to `fmt` with a dynamic batch size.

    Args:
        model: the model, or `calibrated(model, calibrator)` with `calibration` its calibrator's `to_dict()`
            (recorded in the signature: the output logit is then calibrated).
        raw_columns: {log column: its kind} as the evaluation log holds them (`serving.column_kinds`), which
            `distill score` demands of any log it scores.
        about: what the signature records of the model (role, family, checkpoint hash, ...).
    Raises:
        ExportError: the exporter does not support an op of the model (named when the exporter names it).
    """
    if fmt not in MODEL_FILES:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {sorted(MODEL_FILES)}")
    wrapped = PositionalInputs(model.eval(), input_names(layout)).eval()
    exporter = _onnx_bytes if fmt == "onnx" else _torchscript_bytes
    try:
        data = exporter(wrapped, layout)
    except ExportError:
        raise
    except Exception as exc:  # the exporters raise many types; the message names the op
        raise ExportError(f"the {about.get('role', 'model')} ({config.model}) cannot be exported to {fmt}: "
                          f"{_unsupported_op(exc)}. Export another format (--format), or replace that op "
                          f"in the model") from None
    signature = Signature(
        format=fmt, file=MODEL_FILES[fmt], task="multiclass" if config.out_dim > 1 else "binary",
        out_dim=config.out_dim, layout=layout.to_dict(), raw_columns=raw_columns, dense_fill=dense_fill,
        sequence_delimiter=sequence_delimiter,
        inputs=[{"name": name, "dtype": INPUT_DTYPES[name], "shape": _shape(name, layout)}
                for name in input_names(layout)],
        output={"name": "logit", "dtype": "float32", "shape": ["batch"] if config.out_dim == 1
                else ["batch", config.out_dim]},
        about=(about | made_by(config.factory) | ({"factory": config.factory} if config.factory else {})
               | ({"opset": OPSET} if fmt == "onnx" else {})),
        calibration=calibration,
    )
    return Exported(model=data, signature=signature)


def made_by(factory: str | None = None) -> dict:
    """What an export depends on besides the model's weights, as its signature's `about` records it: torch's
    version and `graph_code_fingerprint`. An export whose `about` holds other values was made by other code."""
    return {"torch": torch.__version__, "graph_code": graph_code_fingerprint(factory)}


@functools.cache
def graph_code_fingerprint(factory: str | None = None) -> str:
    """A hash of the code an exported graph is built from (this module, `pipeline/models` and, for a `custom`
    model, its factory's module), recorded in the signature: an export kept for reuse is made again when that
    code changed (`stages.export.export_for_labelling`)."""
    import importlib.util

    import pipeline.models

    paths = [Path(__file__), *sorted(Path(pipeline.models.__file__).parent.glob("*.py"))]
    if factory:
        try:
            spec = importlib.util.find_spec(factory.split(":")[0])
        except (ImportError, ValueError):  # not importable here: the model could not be built either
            spec = None
        paths += [Path(spec.origin)] if spec and spec.origin else []
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _shape(name: str, layout: FeatureLayout) -> list:
    width = {"categorical": len(layout.categorical), "dense": len(layout.dense), "sequence": layout.sequence_length}
    return ["batch", width[name]]


def _arithmetic_right_shift(values, shift: int):
    """int64 `values >> shift` (arithmetic, as torch computes it) in two ONNX ops instead of the exporter's seven
    (ONNX's BitShift is unsigned-only, so it emulates the sign with Less, Cast, BitShift, Or, Cast, Cast, Where):
    clearing the low `shift` bits leaves floor(values / 2**shift) * 2**shift in two's complement, which an
    integer Div then divides exactly. The id hash's mixing step does one of these per id. Other dtypes and
    shifts (a plug-in model's) take the exporter's own translation."""
    import onnx_ir as ir
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.core import aten_bitwise_right_shift_tensor_scalar

    if values.dtype != ir.DataType.INT64 or not isinstance(shift, int) or not 0 < shift < 63:
        return aten_bitwise_right_shift_tensor_scalar(values, shift)
    return op.Div(op.BitwiseAnd(values, op.Constant(value_int=-(1 << shift))), op.Constant(value_int=1 << shift))


# The exporter's translations this module replaces (`torch.onnx.export(custom_translation_table=...)`).
SHIFT_TRANSLATION = {torch.ops.aten.__rshift__.Scalar: _arithmetic_right_shift}


def _onnx_bytes(wrapped: nn.Module, layout: FeatureLayout) -> bytes:
    names = input_names(layout)
    with warnings.catch_warnings(), _quiet("torch.onnx", "onnxscript", "onnx_ir"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapped, example_inputs(layout), dynamo=True, opset_version=OPSET,
                                    input_names=list(names), output_names=["logit"], external_data=False,
                                    dynamic_shapes=(tuple({0: torch.export.Dim("batch")} for _ in names),),
                                    verbose=False, custom_translation_table=SHIFT_TRANSLATION)
    return program.model_proto.SerializeToString()


def _torchscript_bytes(wrapped: nn.Module, layout: FeatureLayout) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is in maintenance; its deprecation notice is not news
        traced = torch.jit.trace(wrapped, example_inputs(layout), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


@contextlib.contextmanager
def _quiet(*logger_names: str):
    """The loggers at ERROR for the block: the exporter and its optimiser (onnxscript, onnx_ir) log every pass
    and skipped op at INFO, the quantiser advice meant for convolutions; none of it is for our users."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _unsupported_op(exc: BaseException) -> str:
    """The op the exporter stopped at (e.g. 'aten.cummax'), with the innermost error's first line."""
    causes = [exc]
    while causes[-1].__cause__ is not None and len(causes) < 5:
        causes.append(causes[-1].__cause__)
    text = "\n".join(f"{type(e).__name__}: {e}" for e in causes)
    found = re.search(r"torch\.ops\.((?:aten|prims)\.[A-Za-z0-9_]+)", text) or re.search(r"(aten::[A-Za-z0-9_]+)", text)
    deepest = f"{type(causes[-1]).__name__}: {causes[-1]}".strip().splitlines()[0][:300]
    return f"op {found.group(1)} is not supported ({deepest})" if found else deepest


def write_export(exported: Exported, out_dir: str) -> str:
    """Writes the model file, then `signature.json` (a reader that finds the signature finds the model)."""
    path = storage.join(out_dir, exported.signature.file)
    storage.atomic_write_bytes(path, exported.model)
    write_signature(exported.signature, out_dir)
    return path


def eager_logits(model: nn.Module, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The eager model's logits on numpy inputs, in batches (the reference for parity)."""
    return predict_in_batches(eager_predictor(model), arrays)


def check_parity(model: nn.Module, exported_logits: np.ndarray, arrays: dict[str, np.ndarray],
                 labels: np.ndarray | None, fmt: str) -> dict:
    """The exported model's logits against the eager model's on the same rows (see `serving.parity_report`)."""
    return parity_report(eager_logits(model, arrays), exported_logits, labels, TOLERANCE[fmt])


def quantize_embeddings(onnx_model: bytes, mode: str = "int8") -> bytes:
    """The ONNX model with weight-only embedding tables in `mode`; the dense layers stay fp32. Embeddings are
    most of a CTR model's bytes.

    int8: ONNX Runtime's quantiser on the Gather ops (each looked-up row is dequantised).
    fp16: each fp32 table a Gather reads is stored in fp16 and the looked-up rows cast back to fp32.
    """
    import onnx

    model = onnx.load_from_string(onnx_model)
    if mode == "fp16":
        return _fp16_embeddings(model).SerializeToString()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    del model.graph.value_info[:]  # the exporter's intermediate shapes trip the quantiser's shape inference
    with tempfile.TemporaryDirectory() as scratch, _quiet(""):  # the quantiser logs to the root logger
        out = os.path.join(scratch, "model.onnx")
        quantize_dynamic(model, out, op_types_to_quantize=["Gather"], weight_type=QuantType.QInt8)
        with open(out, "rb") as handle:
            return handle.read()


def _fp16_embeddings(model):
    """Embedding tables stored as fp16, each lookup followed by a Cast to fp32.

    Not onnxruntime.transformers' `convert_float_to_float16`: told to convert only the Gathers, it wraps every
    other node in Casts (47 for the demo student) and names two of them alike, which ONNX Runtime refuses.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    readers: dict[str, set] = {}  # initializer -> (op type, input slot) of each node that reads it
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            readers.setdefault(name, set()).add((node.op_type, slot))
    # Embedding tables: 2-D fp32 initializers read only as a Gather's data (not, e.g., calibration knots).
    tables = {init.name: init for init in model.graph.initializer if init.data_type == TensorProto.FLOAT
              and len(init.dims) == 2 and readers.get(init.name) == {("Gather", 0)}}
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type != "Gather" or node.input[0] not in tables:
            continue
        table = tables[node.input[0]]
        if table.data_type == TensorProto.FLOAT:  # a table two Gathers share is converted once
            table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table).astype(np.float16), table.name))
        half = f"{node.output[0]}_fp16"
        nodes.append(helper.make_node("Cast", [half], [node.output[0]], name=f"{node.name or half}_to_fp32",
                                      to=TensorProto.FLOAT))
        node.output[0] = half
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]  # the lookups' outputs changed type
    onnx.checker.check_model(model)
    return model


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op threads set to `threads` for the block, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def eager_predictor(model: nn.Module) -> Predict:
    """Calls the eager model on numpy inputs (what evaluation ran)."""
    model.eval()

    def predict(arrays: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model({k: torch.from_numpy(v) for k, v in arrays.items()}).float().numpy()

    return predict


def exported_predictor(exported: Exported, threads: int = 1) -> Predict:
    """Calls an export on numpy inputs: ONNX Runtime for onnx, the TorchScript interpreter for torchscript."""
    if exported.signature.format == "onnx":
        return OnnxModel(exported.model, threads=threads)
    module = torch.jit.load(io.BytesIO(exported.model), map_location="cpu")
    names = [spec["name"] for spec in exported.signature.inputs]

    def predict(arrays: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return module(*[torch.from_numpy(arrays[name]) for name in names]).numpy()

    return predict
