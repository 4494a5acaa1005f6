"""Student stage: students trained on the soft-label shards, with the distillation losses or on hard
labels only (the baseline every distilled student must beat).

Input: the spec and the `ShardSet` the label stage made; output: {role: model path}.
"""

from __future__ import annotations

from pipeline import storage
from pipeline.data.clicklogs import read_named_files
from pipeline.features import FeatureLayout
from pipeline.models import ModelConfig
from pipeline.shards import ShardSet, SoftLabelTargets
from pipeline.spec import JobSpec
from pipeline.stages.click_logs import read_validation, split_side
from pipeline.stages.training import split_fingerprint, train_on_click_logs, train_or_reuse
from pipeline.train import TrainingRun

DISTILLED, HARD = "student_distilled", "student_hard"


def train_students(spec: JobSpec, shard_set: ShardSet, hard_baseline: str | None = None) -> dict[str, str]:
    """The distilled student and the hard-label student of a run: {role: model path}. The hard-label
    student the teacher gate already trained (on the click logs' same rows) is used, not trained again."""
    hard = hard_baseline or train_student(spec, shard_set, HARD)
    return {DISTILLED: train_student(spec, shard_set, DISTILLED), HARD: hard}


def train_hard_baseline(spec: JobSpec) -> str:
    """The hard-label student trained on the click logs, before any labelling (the teacher gate's baseline)."""
    model = ModelConfig.from_section(spec.student, spec.features.out_dim)
    return train_on_click_logs(spec, HARD, model, spec.train, extra={"baseline": "click_logs"})


def train_student(spec: JobSpec, shard_set: ShardSet, role: str, init_model: str | None = None) -> str:
    """Trains a student on the shards: with the distillation losses (`student_distilled`) or on hard
    labels only (`student_hard`); from `init_model`'s weights when given (warm start)."""
    rows = round(shard_set.total_rows * (1 - spec.data.held_out_fraction))  # what the lr schedule will see
    run = student_run(spec, role, rows, shard_set.hidden_dim, init_model)
    depends_on = {"model": run.model.to_dict(), "train": spec.train.model_dump(),
                  "distill": run.distill.model_dump() if run.distill else None,
                  "teacher": shard_set.teacher.checkpoint_sha256, "inputs": shard_set.inputs,
                  "init_model": init_model, **split_fingerprint(spec)}
    key = [spec.validation_key] if spec.validation_key else []
    wanted = [spec.features.label, spec.features.group, *spec.features.input_columns(), *key,
              *(run.targets.columns if run.targets else [])]
    columns = [c for c in dict.fromkeys(wanted) if c and c in shard_set.columns]
    inputs = [spec.features.label, *spec.features.input_columns()]
    return train_or_reuse(spec.run_dir, role, run, depends_on,
                          dataset=lambda: split_side(read_shards(shard_set, columns), spec, validation=False),
                          validation=lambda: read_validation(spec, inputs))


def student_run(spec: JobSpec, role: str, rows: int, hidden_dim: int | None = None,
                init_model: str | None = None) -> TrainingRun:
    """The training plan of a student role over `rows` shard rows (the benchmarks train it directly)."""
    distill = spec.distill if role == DISTILLED else None
    return TrainingRun(role=role, model=ModelConfig.from_section(spec.student, spec.features.out_dim),
                       layout=FeatureLayout.from_spec(spec.features), train=spec.train, task=spec.features.task,
                       label=spec.features.label, rows=rows, group=spec.features.group, distill=distill,
                       targets=SoftLabelTargets.for_spec(spec, hidden_dim) if distill else None,
                       init_model=init_model)


def read_shards(shard_set: ShardSet, columns: list[str]):
    """A Ray Dataset over the shard files the manifests list (never a directory), `columns` only."""
    files, filesystem = storage.arrow_paths([s.path for s in shard_set.shards])
    return read_named_files(files, filesystem).select_columns(columns)
