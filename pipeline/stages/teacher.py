"""Teacher stage: a checkpoint for every teacher of the spec, given or trained here on hard labels.

Input: the spec; output: {teacher name: checkpoint path}. Training reads the training days with the
spec's bad-row policy (bad rows are dropped here; the label stage quarantines them).
"""

from __future__ import annotations

from pipeline import storage
from pipeline.errors import UserError
from pipeline.models import ModelConfig
from pipeline.spec import JobSpec, TeacherSpec
from pipeline.stages.search import search_teacher
from pipeline.stages.training import Planned, click_log_model, teacher_role, train_on_click_logs


def ensure_teachers(spec: JobSpec, baseline: Planned | None = None) -> dict[str, str]:
    """{teacher name: checkpoint} for every teacher of the spec (one, or an ensemble): given, searched, or
    trained here on hard labels, all in one pass over the click logs; `baseline` (the hard-label student)
    trains in the same pass, as `{baseline.role: path}` in the result."""
    ready = {t.name: _given_or_searched(spec, t) for t in spec.teacher}
    planned = {t.name: _teacher_model(spec, t) for t in spec.teacher if ready[t.name] is None}
    if baseline is not None:
        planned[baseline.role] = baseline
    trained = {}
    for group in _by_layout(list(planned.values())):
        trained |= train_on_click_logs(spec, group)
    paths = {name: trained[p.role] for name, p in planned.items()}
    return {name: path for name, path in ready.items() if path} | paths


def _by_layout(planned: list[Planned]) -> list[list[Planned]]:
    """The models grouped by the columns they read, one training pass per group.

    A teacher with extra (teacher-only) features reads columns the hard-label student must never see. It
    trains in a pass of its own rather than sharing one collate of the union of columns with per-model
    input selection in every step and validation: simpler, and it costs one more training call only when
    such a teacher is trained here (a searched teacher trains in its own trials anyway)."""
    groups: dict = {}
    for p in planned:
        groups.setdefault(p.run.layout, []).append(p)
    return list(groups.values())


def ensure_teacher(spec: JobSpec, teacher: TeacherSpec | None = None) -> str:
    """A teacher checkpoint: the spec's, the best of its search, or one trained here on hard labels."""
    teacher = teacher or spec.teacher[0]
    if path := _given_or_searched(spec, teacher):
        return path
    planned = _teacher_model(spec, teacher)
    return train_on_click_logs(spec, [planned])[planned.role]


def _given_or_searched(spec: JobSpec, teacher: TeacherSpec) -> str | None:
    if teacher.search:  # Ray Tune trials; the best one's model is the teacher
        return search_teacher(spec, teacher)
    if teacher.checkpoint:
        if not storage.exists(teacher.checkpoint):
            raise UserError(f"teacher.checkpoint {teacher.checkpoint!r} does not exist; fix the path or "
                            "remove the field to train a teacher")
        return teacher.checkpoint
    return None


def _teacher_model(spec: JobSpec, teacher: TeacherSpec) -> Planned:
    train = spec.train.model_copy(update={"epochs": teacher.epochs or spec.train.epochs,
                                          "lr": teacher.lr or spec.train.lr})
    role = teacher_role(spec, teacher)
    return click_log_model(spec, role, ModelConfig.from_section(teacher, spec.features.out_dim), train,
                           extra={"epochs": teacher.epochs, "lr": teacher.lr},
                           features=spec.teacher_features(teacher))
