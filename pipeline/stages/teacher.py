"""Teacher stage: a checkpoint for every teacher of the spec, given or trained here on hard labels.

Input: the spec; output: {teacher name: checkpoint path}. Training reads the training days with the
spec's bad-row policy (bad rows are dropped here; the label stage quarantines them).
"""

from __future__ import annotations

from pipeline import storage
from pipeline.data import clicklogs
from pipeline.errors import UserError
from pipeline.features import FeatureLayout
from pipeline.models import ModelConfig
from pipeline.spec import JobSpec, TeacherSpec
from pipeline.stages.click_logs import bad_rows_located, read_window
from pipeline.stages.training import train_or_reuse
from pipeline.train import TrainingRun


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
    days = spec.data.train_days.days()
    columns = [spec.features.label] + spec.features.input_columns()
    inputs = {d.isoformat(): clicklogs.count_rows([p])
              for d, p in clicklogs.partition_paths(spec.data.location, days).items()}
    train = spec.train.model_copy(update={"epochs": teacher.epochs or spec.train.epochs,
                                          "lr": teacher.lr or spec.train.lr})
    run = TrainingRun(role="teacher", model=ModelConfig.from_section(teacher, spec.features.out_dim),
                      layout=FeatureLayout.from_spec(spec.features), train=train, task=spec.features.task,
                      label=spec.features.label, rows=sum(inputs.values()), group=spec.features.group)
    depends_on = {"model": run.model.to_dict(), "train": spec.train.model_dump(), "inputs": inputs,
                  "epochs": teacher.epochs, "lr": teacher.lr}
    role = "teacher" if len(spec.teacher) == 1 else f"teacher_{teacher.name}"
    with bad_rows_located(spec, days, columns):  # bad rows are dropped here, and quarantined by the label stage
        return train_or_reuse(spec.run_dir, role, run, depends_on,
                              dataset=lambda: read_window(spec, days, columns))
