"""Teacher stage: a checkpoint for every teacher of the spec, given or trained here on hard labels.

Input: the spec; output: {teacher name: checkpoint path}. Training reads the training days with the
spec's bad-row policy (bad rows are dropped here; the label stage quarantines them).
"""

from __future__ import annotations

from pipeline import storage
from pipeline.errors import UserError
from pipeline.models import ModelConfig
from pipeline.spec import JobSpec, TeacherSpec
from pipeline.stages.training import train_on_click_logs


def ensure_teachers(spec: JobSpec) -> dict[str, str]:
    """{teacher name: checkpoint} for every teacher of the spec (one, or an ensemble)."""
    return {t.name: ensure_teacher(spec, t) for t in spec.teacher}


def ensure_teacher(spec: JobSpec, teacher: TeacherSpec | None = None) -> str:
    """A teacher checkpoint: the spec's, or one trained here on hard labels (same loop as students)."""
    teacher = teacher or spec.teacher[0]
    if teacher.checkpoint:
        if not storage.exists(teacher.checkpoint):
            raise UserError(f"teacher.checkpoint {teacher.checkpoint!r} does not exist; fix the path or "
                            "remove the field to train a teacher")
        return teacher.checkpoint
    train = spec.train.model_copy(update={"epochs": teacher.epochs or spec.train.epochs,
                                          "lr": teacher.lr or spec.train.lr})
    role = "teacher" if len(spec.teacher) == 1 else f"teacher_{teacher.name}"
    return train_on_click_logs(spec, role, ModelConfig.from_section(teacher, spec.features.out_dim), train,
                               extra={"epochs": teacher.epochs, "lr": teacher.lr})
