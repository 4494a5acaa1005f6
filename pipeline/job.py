"""One distillation run, stage by stage: click logs -> teacher -> soft labels -> students -> evaluation.

Each stage (`pipeline/stages/`) reads the previous stage's outputs and skips itself when its own
outputs are already there and were made from the same inputs, so rerunning a finished or crashed job
redoes only what is missing.
"""

from __future__ import annotations

import contextlib
import time

from pipeline import report, runtime, storage
from pipeline.errors import ExportError, ParityError
from pipeline.spec import JobSpec
from pipeline.stages import click_logs, export, gate, label, profile, scoring, students, teacher

STAGES = 6
SPEC_FILE = "spec.json"  # the spec the run used, as resolved (`distill export RUN_DIR` reads it)


def run_job(spec: JobSpec) -> dict:
    """Runs the whole job described by `spec`; returns the metrics also written to `<run>/metrics.json`."""
    started = time.perf_counter()
    runtime.configure_storage(**spec.storage.model_dump())  # first: every stage may read or write s3:// paths
    storage.check_writable(spec.run_dir)  # a read-only or full output fails now, not after training
    with _stage(1, "click logs"):
        click_logs.ensure_click_logs(spec)
        click_logs.check_inputs(spec)
    with runtime.ray_session(spec):
        spec = profile.data_aware_spec(spec)  # hash_buckets: auto sized from the click logs' distinct ids
        storage.atomic_write_bytes(storage.join(spec.run_dir, SPEC_FILE), spec.model_dump_json(indent=2).encode())
        with _stage(2, _teacher_title(spec)):
            # one pass over the click logs trains the teachers and the hard-label student (the gate's baseline)
            teachers = teacher.ensure_teachers(spec, baseline=students.hard_baseline(spec))
            hard = teachers.pop(students.HARD)
            verdict = gate.gate_teacher(spec, teachers, hard)  # None without a validation split
        with _stage(3, "label: teacher actor pool -> soft-label shards"):
            labelled = label.run_label_stage(spec, teachers, storage.join(spec.run_dir, "shards"))
        with _stage(4, f"student: distilled on the soft labels ({_soft_loss_name(spec)})"):
            trained = students.train_students(spec, labelled.shard_set, hard)
        with _stage(5, "evaluate on held-out days"):
            metrics = scoring.evaluate_run(spec, teachers, trained, labelled, verdict)
    failure = None
    with _stage(6, "export: the recommended student for serving, parity-checked, and its serving speed"):
        try:
            metrics["export"] = export.export_run(spec, _checkpoints(metrics), metrics["selection"]["recommended"],
                                                  metrics)
        except (ParityError, ExportError) as exc:  # the run's results stand; what failed is the artifact
            metrics["export"], failure = {"error": str(exc)}, exc
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    storage.atomic_write_json(storage.join(spec.run_dir, "metrics.json"), metrics)
    report.write_report(spec.run_dir, metrics)
    if failure:
        raise failure
    return metrics


def _checkpoints(metrics: dict) -> dict[str, str]:
    return {name: m["checkpoint"] for name, m in metrics["models"].items() if m.get("checkpoint")}


def _teacher_title(spec: JobSpec) -> str:
    title = "teacher" if len(spec.teacher) == 1 else f"teacher ensemble of {len(spec.teacher)}"
    title += " and the hard-label student, in one pass"
    return title + (", then the gate: teacher vs hard-label student on validation" if spec.data.validation else "")


def _soft_loss_name(spec: JobSpec) -> str:
    """The stage heading names the loss really used."""
    if spec.distill.search:
        return f"{len(spec.distill.search.candidates())} candidates in one pass, chosen on validation"
    return "KD loss" if spec.distill.soft_loss == "kd" else "logit-matching (MSE) loss"


@contextlib.contextmanager
def _stage(number: int, title: str):
    print(f"\n{'=' * 72}\n[stage {number}/{STAGES}] {title}\n{'=' * 72}", flush=True)
    started = time.perf_counter()
    yield
    print(f"[stage {number}/{STAGES}] done in {time.perf_counter() - started:.1f}s", flush=True)
