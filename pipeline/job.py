"""One distillation run, stage by stage: click logs -> teacher -> soft labels -> students -> evaluation.

Each stage (`pipeline/stages/`) reads the previous stage's outputs and skips itself when its own
outputs are already there and were made from the same inputs, so rerunning a finished or crashed job
redoes only what is missing.
"""

from __future__ import annotations

import contextlib
import time

from pipeline import report, runtime, storage, tracking
from pipeline.errors import ExportError, ParityError
from pipeline.locks import RunLock
from pipeline.spec import JobSpec
from pipeline.stages import click_logs, export, gate, label, profile, scoring, students, teacher
from pipeline.stages.training import training_records

STAGES = 6
SPEC_FILE = "spec.json"  # the spec the run used, as resolved (`distill export RUN_DIR` reads it)


def run_job(spec: JobSpec) -> dict:
    """Runs the whole job described by `spec`; returns the metrics also written to `<run>/metrics.json`.
    Raises DirectoryLocked when another process runs on the same run directory."""
    started = time.perf_counter()
    runtime.configure_storage(**spec.storage.model_dump())  # first: every stage may read or write s3:// paths
    storage.check_writable(spec.run_dir)  # a read-only or full output fails now, not after training
    with RunLock(spec.run_dir):  # one run at a time per run directory
        return _run_stages(spec, started)


def _run_stages(spec: JobSpec, started: float) -> dict:
    with _stage(1, "click logs"):
        click_logs.ensure_click_logs(spec)
        click_logs.check_inputs(spec)
    with runtime.ray_session(spec):
        spec = profile.data_aware_spec(spec)  # hash_buckets: auto sized from the click logs' distinct ids
        storage.atomic_write_bytes(storage.join(spec.run_dir, SPEC_FILE), spec.model_dump_json(indent=2).encode())
        with _stage(2, _teacher_title(spec)) as stage:
            # one pass over the click logs trains the teachers and the hard-label student (the gate's baseline)
            teachers = teacher.ensure_teachers(spec, baseline=students.hard_baseline(spec))
            hard = teachers.pop(students.HARD)
            verdict = gate.gate_teacher(spec, teachers, hard)  # None without a validation split
            stage["rows"] = _trained_rows(spec.run_dir, students.HARD)
        with _stage(3, "label: teacher actor pool -> soft-label shards") as stage:
            labelled = label.run_label_stage(spec, teachers, storage.join(spec.run_dir, "shards"))
            stage["rows"] = labelled.shard_set.total_rows
            stage["note"] = "" if labelled.relabelled else " (every day reused)"
        with _stage(4, f"student: distilled on the soft labels ({_soft_loss_name(spec)})") as stage:
            trained = students.train_students(spec, labelled.shard_set, hard)
            stage["rows"] = _trained_rows(spec.run_dir, trained.chosen)
        with _stage(5, f"evaluate on held-out {'rows' if spec.data.evaluation else 'days'}") as stage:
            metrics = scoring.evaluate_run(spec, teachers, trained, labelled, verdict)
            stage["rows"] = metrics["eval"]["rows"]
    failure = None
    with _stage(6, "export: the recommended student for serving, parity-checked, and its serving speed") as stage:
        try:
            metrics["export"] = export.export_run(spec, _checkpoints(spec, metrics),
                                                  metrics["selection"]["recommended"], metrics)
        except (ParityError, ExportError) as exc:  # the run's results stand; what failed is the artifact
            metrics["export"], failure = {"error": str(exc)}, exc
        stage["rows"] = metrics["export"].get("rows")
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    storage.atomic_write_json(storage.join(spec.run_dir, "metrics.json"), metrics)
    report.write_report(spec.run_dir, metrics)
    tracking.log_run(spec, metrics)  # the run, its trials, its report and exported student, in MLflow
    if failure:
        raise failure
    return metrics


def _checkpoints(spec: JobSpec, metrics: dict) -> dict[str, str]:
    """The models the export stage may take. A teacher with teacher-only features cannot serve (serving has
    no such columns), so it is left out of the serving-speed table; `distill export RUN_DIR --model teacher`
    still exports it, its signature listing the extra inputs."""
    checkpoints = {name: m["checkpoint"] for name, m in metrics["models"].items() if m.get("checkpoint")}
    if spec.teacher_only_columns and checkpoints.pop("teacher", None):
        print(f"export: the teacher is not timed for serving: it reads teacher-only columns "
              f"{spec.teacher_only_columns} (teacher.extra_features) that serving does not have", flush=True)
    return checkpoints


def _teacher_title(spec: JobSpec) -> str:
    title = "teacher" if len(spec.teacher) == 1 else f"teacher ensemble of {len(spec.teacher)}"
    title += " and the hard-label student, in one pass"
    return title + (", then the gate: teacher vs hard-label student on validation" if spec.data.validation else "")


def _soft_loss_name(spec: JobSpec) -> str:
    """The stage heading names the loss really used."""
    if spec.distill.search:
        return f"{len(spec.distill.search.candidates())} candidates in one pass, chosen on validation"
    return "KD loss" if spec.distill.soft_loss == "kd" else "logit-matching (MSE) loss"


def _trained_rows(run_dir: str, role: str) -> int | None:
    """Rows the role's last epoch trained on (its training record), for the stage's line."""
    history = training_records(run_dir).get(role, {}).get("history") or [{}]
    return history[-1].get("rows")


@contextlib.contextmanager
def _stage(number: int, title: str):
    """One line when the stage starts and one when it ends: rows (when the stage sets them), seconds, rows/s."""
    print(f"[stage {number}/{STAGES}] {title}", flush=True)
    started, done = time.perf_counter(), {"rows": None, "note": ""}
    yield done
    seconds = time.perf_counter() - started
    rows = f"{done['rows']:,} rows in " if done["rows"] else ""
    # a stage that reused its outputs took no time worth a rate
    speed = f" ({done['rows'] / seconds:,.0f} rows/s)" if done["rows"] and seconds >= 1 else ""
    print(f"[stage {number}/{STAGES}] done: {rows}{seconds:.1f}s{speed}{done['note']}", flush=True)
