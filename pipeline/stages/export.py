"""Export stage: the recommended student (and the teacher) as serving artifacts, each checked for parity with
the evaluated model on evaluation rows, plus the serving-speed table (eager, TorchScript, ONNX Runtime).

Input: the spec and a model's checkpoint; output: `<run>/export/<model>/<format>/` (model file,
`signature.json`, `parity.json`) and the run's `metrics["export"]`. A parity failure writes its report and
raises `ParityError`: nothing is published from an export that does not compute what was evaluated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import datetime as dt
import logging
import math
from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.data.normalise import Normaliser, normalise
from pipeline.data.split import RowSplit
from pipeline.errors import ParityError, UserError
from pipeline.calibration import Calibrator
from pipeline.export import (Exported, calibrated, check_parity, eager_logits, eager_predictor, export_model,
                             exported_predictor, made_by, quantize_embeddings, torch_threads, write_export)
from pipeline.features import FeatureLayout, table_to_arrays
from pipeline.models import load_model
from pipeline.serving import (MODEL_FILES, SIGNATURE, OnnxModel, column_kinds, describe_parity_failure,
                              measure_calls, parity_report, predict_in_batches, read_signature)
from pipeline.shards import file_sha256
from pipeline.spec import JobSpec
from pipeline.stages.click_logs import raw_rows

EXPORT_DIR = "export"
# label.runtime onnxruntime: the soft labels' logits may differ from the eager teacher's by this much (relative
# beyond |logit| 1), well below what a student can learn from, and above the fp32 export check's 1e-5.
LABEL_TOLERANCE = 1e-4

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParityRows:
    """Evaluation rows as model inputs, their labels (binary) and the kinds of the log columns they came from."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    kinds: dict[str, str]

    @property
    def rows(self) -> int:
        return len(self.arrays["categorical"])


def parity_rows(spec: JobSpec, layout: FeatureLayout, rows: int | None = None,
                days: list[dt.date] | None = None) -> ParityRows:
    """Up to `export.parity_rows` good rows of the evaluation days (or of `days`): with `data.evaluation`, of the
    evaluation rows only, the rows the evaluation scored."""
    label, wanted = spec.features.label, rows or spec.export.parity_rows
    held_out = [spec.evaluation_key] if spec.evaluation_key and days is None else []
    read = math.ceil(wanted / spec.data.evaluation.fraction) if held_out else wanted  # about `wanted` of them held out
    raw = raw_rows(spec, days or spec.data.eval_days.days(), list(dict.fromkeys([label, *layout.columns, *held_out])),
                   read)
    table = normalise(raw, Normaliser.from_spec(spec))
    if held_out:
        table = RowSplit.from_spec(spec).keep(table, "evaluation").slice(0, wanted)
    labels = table.column(label).to_numpy() if spec.features.task == "binary" else None
    return ParityRows(table_to_arrays(table, layout), labels, column_kinds(raw.schema, layout))


def export_checkpoint(spec: JobSpec, name: str, role: str, checkpoint: str, rows: ParityRows, run_dir: str,
                      formats: list[str] | None = None, calibrator: Calibrator | None = None) -> dict:
    """Exports one saved model in each format (default: `export.formats`, then `export.quantize`), checking
    each against the eager model on `rows`; returns {variant: {"dir", "bytes", "parity"}}. A `calibrator` is
    folded into the graph, and parity is then against the eager model followed by the same calibrator.

    Raises:
        ParityError: an export's logits differ from the eager model's beyond the format's tolerance, or a
            quantised one loses more AUC than `export.max_quantized_auc_loss`.
    """
    model, config, layout = load_model(checkpoint)
    model = calibrated(model, calibrator)
    about = _about(spec, name, role, config.model, checkpoint, file_sha256(checkpoint))
    root, results = storage.join(run_dir, EXPORT_DIR, name), {}
    for fmt in formats if formats is not None else spec.export.formats:
        exported = _export(spec, model, config, layout, fmt, rows, about, calibrator)
        with torch_threads(spec.export.threads):
            logits = predict_in_batches(exported_predictor(exported, spec.export.threads), rows.arrays)
            parity = check_parity(model, logits, rows.arrays, rows.labels, fmt)
        results[fmt] = _keep(exported, storage.join(root, fmt), parity, name)
        if fmt == "onnx" and formats is None:
            results |= _quantised(spec, name, exported, logits, rows, root)
    return results


def _about(spec: JobSpec, name: str, role: str, family: str, checkpoint: str, sha256: str) -> dict:
    """What a signature records of the exported model."""
    return {"job": spec.name, "name": name, "role": role, "family": family, "checkpoint": checkpoint,
            "checkpoint_sha256": sha256}


def _export(spec: JobSpec, model, config, layout: FeatureLayout, fmt: str, rows: ParityRows, about: dict,
            calibrator: Calibrator | None = None) -> Exported:
    """`export_model` with the input contract the spec and the parity rows give."""
    sequence = spec.features.sequence
    return export_model(model, config, layout, fmt, raw_columns=rows.kinds, dense_fill=spec.features.dense_fill,
                        sequence_delimiter=sequence.delimiter if sequence else None, about=about,
                        calibration=calibrator.to_dict() if calibrator else None)


def run_calibrator(evaluated: dict, name: str) -> Calibrator | None:
    """The calibrator a run fitted for model `name` on validation (`eval.calibration`), if any."""
    fitted = evaluated.get("models", {}).get(name, {}).get("calibrated")
    return Calibrator.from_dict(fitted["calibrator"]) if fitted else None


def _keep(exported: Exported, directory: str, parity: dict, name: str) -> dict:
    """Writes the export and its parity report, or only the report (and raises) when parity failed."""
    storage.atomic_write_json(storage.join(directory, "parity.json"), parity)
    if not parity["passed"]:
        raise ParityError(describe_parity_failure(name, exported.signature.format, parity) +
                          f"; the report is {storage.join(directory, 'parity.json')}")
    write_export(exported, directory)
    return {"dir": directory, "bytes": len(exported.model), "parity": parity}


def _quantised(spec: JobSpec, name: str, fp32: Exported, fp32_logits: np.ndarray, rows: ParityRows,
               root: str) -> dict:
    """The quantised-embedding variants of an ONNX export (`export.quantize`), each kept when it loses at most
    `max_quantized_auc_loss` AUC against the fp32 export on the parity rows (a logit tolerance does not apply: it
    rounds on purpose). One that loses more is reported and not kept; the fp32 export stands either way."""
    results = {}
    for mode in spec.export.quantize:
        exported = Exported(model=quantize_embeddings(fp32.model, mode),
                            signature=dataclasses.replace(fp32.signature, quantized=mode))
        logits = predict_in_batches(OnnxModel(exported.model, threads=spec.export.threads), rows.arrays)
        report = _quantised_report(fp32_logits, logits, rows.labels, spec.export.max_quantized_auc_loss, mode)
        report |= {"bytes": len(exported.model), "fp32_bytes": len(fp32.model)}
        directory = storage.join(root, f"onnx-{mode}")
        storage.atomic_write_json(storage.join(directory, "parity.json"), report)
        if report["passed"]:
            write_export(exported, directory)
        results[f"onnx-{mode}"] = {"dir": directory if report["passed"] else None, "kept": report["passed"],
                                   "bytes": len(exported.model), "parity": report}
    return results


def _quantised_report(fp32: np.ndarray, quantised: np.ndarray, labels: np.ndarray | None, max_loss: float,
                      mode: str) -> dict:
    from pipeline import metrics

    diff = np.abs(fp32.astype(np.float64) - quantised)
    report = {"rows": len(diff), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
              "max_auc_loss": max_loss, "worst_rows": [], "tolerance": None}
    if labels is None:  # multiclass: no AUC to hold it to; the logit drift is reported
        return report | {"passed": True}
    before, after = metrics.auc(labels, fp32), metrics.auc(labels, quantised)
    return report | {"auc_fp32": before, "auc_quantized": after, "auc_loss": before - after,
                     "passed": bool(before - after <= max_loss),
                     "error": None if before - after <= max_loss else
                     f"{mode.upper()} embeddings lose {before - after:.5f} AUC "
                     f"(> export.max_quantized_auc_loss {max_loss})"}


def serving_speed(spec: JobSpec, checkpoints: dict[str, str], exports: dict[str, dict], rows: ParityRows) -> dict:
    """{model: {runtime: {batch: {p50_ms, p99_ms, rows_per_s}}}} for eager PyTorch and each export, one call
    at a time on `export.threads` intra-op threads, plus the ratios the issue's targets are stated in."""
    if not spec.export.serving_batches:
        return {}
    table = {}
    for name, checkpoint in checkpoints.items():
        model, _, _ = load_model(checkpoint)
        runtimes = {"eager": eager_predictor(model)}
        for variant, export in exports.get(name, {}).items():
            runtimes[_runtime_name(variant)] = _load_predictor(export["dir"], spec.export.threads)
        with torch_threads(spec.export.threads):
            table[name] = {runtime: measure_calls(predict, rows.arrays, spec.export.serving_batches,
                                                  spec.export.serving_runs) for runtime, predict in runtimes.items()}
    return {"threads": spec.export.threads, "models": table, "ratios": serving_ratios(table)}


def _runtime_name(variant: str) -> str:
    return variant.replace("onnx", "onnxruntime", 1) if variant.startswith("onnx") else variant


def _load_predictor(directory: str, threads: int):
    signature = read_signature(directory)
    data = storage.read_bytes(storage.join(directory, signature.file))
    return exported_predictor(Exported(model=data, signature=signature), threads)


def serving_ratios(table: dict) -> dict:
    """The student's speed-ups over the teacher: batch-1 p50 (student's best runtime vs the teacher's eager, and
    runtime for runtime) and rows/s at batch 512 (each in its best runtime)."""
    students = [n for n in table if n.startswith("student")]
    if "teacher" not in table or not students:
        return {}
    teacher, student = table["teacher"], table[students[0]]
    ratios = {"student": students[0]}
    if "1" in teacher.get("eager", {}):
        best = min(student, key=lambda r: student[r]["1"]["p50_ms"])
        ratios["batch1_best_vs_teacher_eager"] = teacher["eager"]["1"]["p50_ms"] / student[best]["1"]["p50_ms"]
        ratios["batch1_student_best_runtime"] = best
        ratios["batch1_same_runtime"] = {r: teacher[r]["1"]["p50_ms"] / student[r]["1"]["p50_ms"]
                                         for r in student if r in teacher}
    if "512" in teacher.get("eager", {}):
        fastest = {n: max(table[n], key=lambda r: table[n][r]["512"]["rows_per_s"]) for n in ("teacher", students[0])}
        ratios["batch512_rows_per_s_best_vs_best"] = (student[fastest[students[0]]]["512"]["rows_per_s"] /
                                                      teacher[fastest["teacher"]]["512"]["rows_per_s"])
        ratios["batch512_best_runtimes"] = fastest
    return ratios


def export_run(spec: JobSpec, checkpoints: dict[str, str], recommended: str, evaluated: dict | None = None) -> dict:
    """The run's export: the recommended student in every format (with its MODEL_CARD.md, given the run's
    `evaluated` metrics), the teacher (single teacher) for the serving table; returns metrics["export"].
    Raises ParityError (after writing the parity report)."""
    if not spec.export.formats:
        return {"recommended": recommended, "models": {}, "serving": {}}
    _, _, layout = load_model(checkpoints[recommended])
    rows = parity_rows(spec, layout)
    targets = {recommended: checkpoints[recommended]}
    if "teacher" in checkpoints and spec.export.serving_batches:
        targets["teacher"] = checkpoints["teacher"]
    exports = {}
    for name, checkpoint in targets.items():
        role = "teacher" if name == "teacher" else "student"
        exports[name] = export_checkpoint(spec, name, role, checkpoint, rows, spec.run_dir,
                                          formats=None if role == "student" else spec.export.formats,
                                          calibrator=run_calibrator(evaluated or {}, name))
    serving = serving_speed(spec, targets, exports, rows)
    if evaluated and "onnx" in exports[recommended]:
        _write_card(spec, recommended, evaluated, exports[recommended], serving.get("models", {}).get(recommended, {}))
    return {"recommended": recommended, "rows": rows.rows, "models": exports, "serving": serving}


def _write_card(spec: JobSpec, name: str, evaluated: dict, exports: dict, serving: dict) -> None:
    """`<run>/export/<name>/MODEL_CARD.md`: what a registry version's card says, for the run's student."""
    from pipeline.model_card import render_card

    label = evaluated.get("label", {})
    lineage = {"teacher": (label.get("teachers") or [{}])[0] | {"checkpoint_sha256": label.get("teacher_sha256")},
               "train_days": evaluated.get("train", {}).get("days"),
               "eval_day": ", ".join(evaluated.get("eval", {}).get("days", [])), "student": name}
    card = render_card(title=f"{spec.name} {name}", metrics=evaluated["models"][name],
                       eval_days=evaluated.get("eval", {}).get("days", []), exports=exports, serving=serving,
                       signature=read_signature(exports["onnx"]["dir"]), lineage=lineage)
    storage.atomic_write_text(storage.join(spec.run_dir, EXPORT_DIR, name, "MODEL_CARD.md"), card)


def read_run(run_dir: str) -> tuple[JobSpec, dict]:
    """A finished run's resolved spec and metrics (what `distill export RUN_DIR` starts from)."""
    from pipeline.job import SPEC_FILE

    paths = {name: storage.join(run_dir, name) for name in (SPEC_FILE, "metrics.json")}
    missing = [p for p in paths.values() if not storage.exists(p)]
    if missing:
        raise UserError(f"{run_dir} is not a finished run directory: {', '.join(missing)} not found (a run writes "
                        f"{SPEC_FILE} when it starts and metrics.json when it ends; rerun `distill run` on a spec)")
    spec = JobSpec.model_validate_json(storage.read_bytes(paths[SPEC_FILE]))
    return spec, storage.read_json(paths["metrics.json"])


def export_finished_run(run_dir: str, model: str | None = None, fmt: str | None = None) -> dict:
    """`distill export`: exports `model` (default: the run's recommended student) of a finished run in `fmt`
    (default: every format of the spec), parity-checked; records it in the run's metrics.json."""
    spec, metrics = read_run(run_dir)
    checkpoints = {n: m["checkpoint"] for n, m in metrics["models"].items() if m.get("checkpoint")}
    name = model or metrics.get("selection", {}).get("recommended", "student_distilled")
    if name not in checkpoints:
        raise UserError(f"run {run_dir} has no model {name!r}; its models are {sorted(checkpoints)}")
    _, _, layout = load_model(checkpoints[name])
    rows = parity_rows(spec, layout)
    role = "teacher" if metrics["models"][name].get("role") in ("teacher", "ensemble_member") else "student"
    exported = export_checkpoint(spec, name, role, checkpoints[name], rows, run_dir, formats=[fmt] if fmt else None,
                                 calibrator=run_calibrator(metrics, name))
    section = metrics.setdefault("export", {"recommended": metrics.get("selection", {}).get("recommended")})
    section.setdefault("models", {}).setdefault(name, {}).update(exported)
    storage.atomic_write_json(storage.join(run_dir, "metrics.json"), metrics)
    return exported


def export_for_labelling(spec: JobSpec, name: str, checkpoint: str, days: list[dt.date]) -> str:
    """`label.runtime: onnxruntime`: the teacher exported to ONNX beside its checkpoint (`<name>-onnx/`), its
    logits within LABEL_TOLERANCE of the eager teacher's on the first rows of `days`; reused while the
    checkpoint, torch and the code that builds the graph are the same. Returns the export directory. Raises
    ParityError."""
    directory, sha = checkpoint.removesuffix(".pt") + "-onnx", file_sha256(checkpoint)
    if storage.exists(storage.join(directory, SIGNATURE)) and storage.exists(storage.join(directory, MODEL_FILES["onnx"])):
        about = read_signature(directory).about
        if about.get("checkpoint_sha256") == sha and made_by(about.get("factory")).items() <= about.items():
            return directory
    model, config, layout = load_model(checkpoint)
    rows = parity_rows(spec, layout, days=days)
    exported = _export(spec, model, config, layout, "onnx", rows, _about(spec, name, "teacher", config.model,
                                                                         checkpoint, sha))
    threads = max(1, int(spec.label.cpus_per_actor))  # as the actors will run it
    with torch_threads(threads):
        logits = predict_in_batches(OnnxModel(exported.model, threads=threads), rows.arrays)
        parity = parity_report(eager_logits(model, rows.arrays), logits, rows.labels, LABEL_TOLERANCE)
    _keep(exported, directory, parity, f"teacher {name!r} for labelling")
    log.info("label: teacher %s exported to ONNX for labelling (%s); parity on %d rows: max |logit diff| %.2g",
             name, directory, parity["rows"], parity["max_abs_diff"])
    return directory


def registry_files(exports: dict) -> tuple[dict[str, bytes], dict]:
    """A registry version's files from an export ({variant: result}): `<variant>/<model file>` and
    `<variant>/signature.json` of each kept variant, and the parity record that names each file with its sha256
    (what `registry.promote` checks before CURRENT may point at the version)."""
    files, variants = {}, {}
    for variant, result in exports.items():
        if not result.get("kept", True):  # a quantised variant over its AUC budget: not published
            continue
        signature = read_signature(result["dir"])
        data = storage.read_bytes(storage.join(result["dir"], signature.file))
        files[f"{variant}/{signature.file}"] = data
        files[f"{variant}/{SIGNATURE}"] = storage.read_bytes(storage.join(result["dir"], SIGNATURE))
        parity = result["parity"]
        variants[variant] = {"passed": parity["passed"], "file": f"{variant}/{signature.file}",
                             "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                             **{k: parity[k] for k in ("rows", "max_abs_diff", "tolerance", "auc_abs_diff",
                                                       "auc_loss") if k in parity}}
    return files, {"passed": all(v["passed"] for v in variants.values()), "variants": variants}
