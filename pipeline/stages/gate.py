"""The teacher gate: before a teacher labels anything, it must beat the hard-label student on validation.

Distillation only helps with a strong teacher. The gate takes the hard-label student trained on the click
logs in the teacher's pass (the run keeps it as its `student_hard`) and compares both on the validation
split: with the scores their training workers computed for their kept epochs (what early stopping and the
student's selection also read), or, for an ensemble or a teacher given as a checkpoint, by scoring them in
one actor-pool pass. It stops the run (`distill.on_weak_teacher: fail`, exit 1) or goes on and says so
(`warn`) when the teacher's lead is below `distill.min_teacher_lift`. An ensemble is gated as the weighted
mean it labels with.
"""

from __future__ import annotations

import logging

from pipeline import storage
from pipeline.errors import WeakTeacher
from pipeline.spec import JobSpec
from pipeline.stages import scoring
from pipeline.stages.students import HARD
from pipeline.stages.training import teacher_role, training_records

log = logging.getLogger(__name__)


def gate_teacher(spec: JobSpec, teachers: dict[str, str], baseline: str) -> dict | None:
    """The gate's verdict ({metric, teacher, hard, lift, min_lift, passed}) of the teachers against the
    hard-label student `baseline`, or None without a validation split (nothing held out to judge on).

    Raises:
        WeakTeacher: the teacher's lead is below `distill.min_teacher_lift` and `on_weak_teacher` is fail.
    """
    if spec.data.validation is None:
        return None
    scores = recorded_scores(spec, teachers, baseline)
    if scores is None:
        checkpoints, combine = scoring.teacher_models(spec, teachers)
        scores = scoring.validation_scores(spec, checkpoints | {HARD: baseline}, combine)
    metric = spec.selection_metric
    teacher, hard = scores["teacher"][metric], scores[HARD][metric]
    verdict = {"metric": metric, "teacher": teacher, "hard": hard, "lift": teacher - hard,
               "min_lift": spec.distill.min_teacher_lift, "passed": teacher - hard >= spec.distill.min_teacher_lift,
               "rows": scores[HARD]["rows"], "positives": scores[HARD]["positives"]}
    print(f"teacher gate: {describe(verdict)}", flush=True)
    if not verdict["passed"] and spec.distill.on_weak_teacher == "fail":
        raise WeakTeacher(f"{describe(verdict)}. Distilling from it would not beat a plain student. Try a "
                          "stronger teacher (more epochs or data, another teacher.model, larger embeddings), or "
                          "set distill.on_weak_teacher: warn to go on anyway")
    if not verdict["passed"]:
        log.warning("teacher gate: %s; going on (distill.on_weak_teacher: warn)", describe(verdict))
    return verdict


def recorded_scores(spec: JobSpec, teachers: dict[str, str], baseline: str) -> dict | None:
    """{"teacher": ..., HARD: ...} validation scores of the kept epochs, from the training records this run
    wrote beside the two models, or None when there are none to trust: an ensemble (its weighted mean was
    never trained), a teacher given as a checkpoint (a record beside it would be an older run's), a record
    from before positives were counted."""
    if len(spec.teacher) != 1 or spec.teacher[0].checkpoint:
        return None
    teacher, records = spec.teacher[0], training_records(spec.run_dir)
    trained = {"teacher": (teacher_role(spec, teacher), teachers[teacher.name]), HARD: (HARD, baseline)}
    scores = {}
    for name, (role, path) in trained.items():
        if role not in records or path != storage.join(spec.run_dir, "models", f"{role}.pt"):
            return None
        scores[name] = scoring.kept_scores(records[role], spec.selection_metric)
        if scores[name]["positives"] is None and spec.features.task == "binary":
            return None
    return scores


def describe(verdict: dict) -> str:
    """One line: both numbers, the lift and what was asked of it."""
    state = "passed" if verdict["passed"] else "the teacher is too weak"
    return (f"{state}: validation {verdict['metric']} teacher {verdict['teacher']:.4f} vs hard-label student "
            f"{verdict['hard']:.4f}, lift {verdict['lift']:+.4f} (distill.min_teacher_lift "
            f"{verdict['min_lift']:.4f}) on {verdict['rows']:,} rows")
