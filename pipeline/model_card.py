"""MODEL_CARD.md of a published student: its inputs, its metrics on the evaluation days, the parity of its
exports, its serving latency, its size and its lineage. Pure: from the records a publish already holds."""

from __future__ import annotations

from pipeline.calibration import Calibrator
from pipeline.serving import Signature


def render_card(*, title: str, metrics: dict, eval_days: list[str], exports: dict, serving: dict,
                signature: Signature, lineage: dict) -> str:
    """The card's Markdown.

    Args:
        metrics: the student's metrics on the evaluation days (`scoring.evaluate_models`' entry).
        exports: {variant: {"dir", "bytes", "parity"}} (`stages.export.export_checkpoint`).
        serving: {runtime: {batch: {p50_ms, p99_ms, rows_per_s}}} of this student (may be empty).
        lineage: teacher, data dates, warm start, as the registry records them.
    """
    sections = [[f"# {title}"], _inputs(signature), _metrics(metrics, eval_days), _parity(exports),
                _latency(serving), _size(metrics, exports), _lineage(lineage)]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _inputs(signature: Signature) -> list[str]:
    layout = signature.feature_layout
    lines = ["## Inputs", "", "| log column | kind | feeds |", "|---|---|---|"]
    for name, kind in signature.raw_columns.items():
        feeds = "dense" if name in layout.dense else "sequence" if name == layout.sequence else "categorical"
        lines.append(f"| {name} | {kind} | {feeds} |")
    tensors = ", ".join(f"`{i['name']}` {i['dtype']} {i['shape']}" for i in signature.inputs)
    return lines + ["", f"- Model inputs: {tensors}; output `{signature.output['name']}` {signature.output['shape']} "
                    f"({signature.task} logits).",
                    f"- A null id is {signature.missing_id}; a null dense value is {signature.dense_fill}; text ids "
                    f"are hashed outside the graph by {signature.string_id_hash}.",
                    "- `distill score ONNX_DIR LOG --out PATH` scores a log with these columns (ONNX_DIR: the `onnx/` folder "
                    "beside this card)."]


def _metrics(metrics: dict, eval_days: list[str]) -> list[str]:
    names = [("auc", "AUC"), ("gauc", "GAUC"), ("log_loss", "log-loss"), ("accuracy", "accuracy")]
    cells = [f"{label} {metrics[key]:.4f}" for key, label in names if isinstance(metrics.get(key), (int, float))]
    if isinstance(metrics.get("calibration"), dict):
        cells.append(f"ECE {metrics['calibration']['ece']:.4f}")
    lines = ["## Metrics on the evaluation days", "", f"- Days: {', '.join(eval_days)}; " + ", ".join(cells) + "."]
    calibrated = metrics.get("calibrated")
    if calibrated:  # the served logit is the calibrated one
        fitted = calibrated["calibrator"].get("fitted_on", {})
        lines.append(f"- Calibrated ({Calibrator.from_dict(calibrated['calibrator']).describe()}, fitted on "
                     f"{fitted.get('rows', 0):,} validation rows; inside the exported graph): ECE "
                     f"{metrics['calibration']['ece']:.4f} -> {calibrated['calibration']['ece']:.4f}, log-loss "
                     f"{metrics['log_loss']:.4f} -> {calibrated['log_loss']:.4f}.")
    return lines


def _parity(exports: dict) -> list[str]:
    lines = ["## Parity with the evaluated model", ""]
    for variant, result in exports.items():
        parity = result["parity"]
        if parity.get("tolerance") is None:
            lines.append(f"- {variant}: AUC loss {parity.get('auc_loss', 0):+.5f} against fp32 over {parity['rows']:,} "
                         f"rows (budget {parity.get('max_auc_loss')}); {'kept' if result.get('kept', True) else 'not kept'}.")
        else:
            lines.append(f"- {variant}: max |logit diff| {parity['max_abs_diff']:.2g} over {parity['rows']:,} "
                         f"evaluation rows (tolerance {parity['tolerance']:g}, relative beyond |logit| 1)"
                         + (f", AUC diff {parity['auc_abs_diff']:.1g}" if "auc_abs_diff" in parity else "") + ".")
    return lines


def _latency(serving: dict) -> list[str]:
    if not serving:
        return []
    batches = list(next(iter(serving.values())))
    lines = ["## Latency (CPU, one call at a time): p50 / p99 ms per call", "",
             "| runtime | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---:|" * len(batches)]
    for runtime, cells in serving.items():
        lines.append(f"| {runtime} | " + " | ".join(f"{c['p50_ms']:.3f} / {c['p99_ms']:.3f}" for c in cells.values()) + " |")
    return lines


def _size(metrics: dict, exports: dict) -> list[str]:
    params = metrics.get("params") or {}
    files = ", ".join(f"{variant} {result['bytes']:,} bytes" for variant, result in exports.items())
    counts = (f"{params['total']:,} parameters ({params['embedding']:,} in embeddings); " if params else "")
    return ["## Size", "", f"- {counts}{files}."]


def _lineage(lineage: dict) -> list[str]:
    teacher = lineage.get("teacher") or {}
    lines = ["## Lineage", ""]
    if teacher:
        lines.append(f"- Teacher: {teacher.get('name', '?')} ({teacher.get('model', '?')}), checkpoint sha256 "
                     f"{str(teacher.get('checkpoint_sha256', '?'))[:16]}")
    for key, label in (("train_days", "Trained on"), ("eval_day", "Evaluated on"), ("student", "Student"),
                       ("warm_start_from", "Warm-started from")):
        value = lineage.get(key)
        if value:
            lines.append(f"- {label}: {', '.join(value) if isinstance(value, list) else value}")
    return lines
