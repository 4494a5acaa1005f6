"""Student stage: students trained on the soft-label shards, with the distillation losses or on hard
labels only (the baseline every distilled student must beat).

Input: the spec and the `ShardSet` the label stage made; output: {role: model path}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import storage
from pipeline.data.clicklogs import read_named_files
from pipeline.features import FeatureLayout
from pipeline.models import ModelConfig
from pipeline.shards import ShardSet, SoftLabelTargets
from pipeline.spec import DistillSpec, JobSpec
from pipeline.stages.click_logs import read_validation, split_side
from pipeline.stages.training import (Planned, click_log_model, split_fingerprint, train_or_reuse_together,
                                      training_records)
from pipeline.train import TrainingRun

DISTILLED, HARD = "student_distilled", "student_hard"


@dataclass(frozen=True)
class Students:
    """The run's two students ({DISTILLED: path, HARD: path}) and, with `distill.search`, every candidate
    ({role: its distill settings}) and the role of the one chosen on validation."""

    paths: dict[str, str]
    chosen: str = DISTILLED  # the candidate role behind paths[DISTILLED]
    candidates: dict[str, dict] = field(default_factory=dict)


def hard_baseline(spec: JobSpec) -> Planned:
    """The hard-label student, trained on the click logs before any labelling (in the teacher's pass): the
    teacher gate's baseline and the run's `student_hard`."""
    model = ModelConfig.from_section(spec.student, spec.features.out_dim)
    return click_log_model(spec, HARD, model, spec.train, extra={"baseline": "click_logs"})


def train_students(spec: JobSpec, shard_set: ShardSet, hard: str) -> Students:
    """The distilled student (with `distill.search`, every candidate trained in one pass over the shards, and
    the best on validation chosen) beside the hard-label student already trained on the click logs."""
    if not spec.distill.search:
        return Students({DISTILLED: train_student(spec, shard_set, DISTILLED), HARD: hard})
    candidates = {candidate_role(c): c for c in spec.distill.search.candidates()}
    paths = _train_on_shards(spec, shard_set, _distill_settings(spec))
    records = training_records(spec.run_dir)
    chosen = max(candidates, key=lambda role: kept_validation(records[role], spec.selection_metric))
    return Students({DISTILLED: paths[chosen], HARD: hard}, chosen, candidates)


def train_challenger(spec: JobSpec, shard_set: ShardSet, init_model: str | None = None) -> tuple[str, str]:
    """(role, path) of the student a nightly cycle publishes: with a validation split, the best on it of the
    distilled student(s) and the hard-label student, all trained in one pass over the shards (from
    `init_model`'s weights when given); without one, the distilled student."""
    if spec.data.validation is None:
        return DISTILLED, train_student(spec, shard_set, DISTILLED, init_model)
    settings = _distill_settings(spec) | {HARD: None}
    paths = _train_on_shards(spec, shard_set, settings, init_model)
    records = training_records(spec.run_dir)
    best = max(settings, key=lambda role: (kept_validation(records[role], spec.selection_metric), role == HARD))
    return best, paths[best]


def _distill_settings(spec: JobSpec) -> dict[str, DistillSpec]:
    """{role: distill settings}: every `distill.search` candidate, or the spec's one distilled student."""
    if not spec.distill.search:
        return {DISTILLED: spec.distill}
    return {candidate_role(c): spec.distill.model_copy(update=c | {"search": None})
            for c in spec.distill.search.candidates()}


def candidate_role(candidate: dict) -> str:
    """e.g. student_distilled-kd-a0.3-t2 (a file name and a metric prefix)."""
    temperature = f"-t{candidate['temperature']:g}" if candidate["soft_loss"] == "kd" else ""
    return f"{DISTILLED}-{candidate['soft_loss']}-a{candidate['alpha']:g}{temperature}"


def kept_validation(record: dict, metric: str) -> float:
    """The validation `metric` of a model's kept epoch, from its training record (higher is better)."""
    value = record["history"][record["best_epoch"] - 1][f"val_{metric}"]
    return -value if metric == "log_loss" else value


def train_student(spec: JobSpec, shard_set: ShardSet, role: str, init_model: str | None = None) -> str:
    """Trains a student on the shards: with the distillation losses (`student_distilled`) or on hard
    labels only (`student_hard`); from `init_model`'s weights when given (warm start)."""
    return _train_on_shards(spec, shard_set, {role: spec.distill if role != HARD else None}, init_model)[role]


def _train_on_shards(spec: JobSpec, shard_set: ShardSet, settings: dict[str, DistillSpec | None],
                     init_model: str | None = None) -> dict[str, str]:
    """{role: path}: one student per `settings` entry (its distill settings; None: hard labels), trained
    together on one read of the shards."""
    rows = round(shard_set.total_rows * (1 - spec.data.held_out_fraction))  # what the lr schedule will see
    planned = []
    for role, distill in settings.items():
        run = student_run(spec, role, rows, shard_set.hidden_dim, init_model, distill)
        depends_on = {"model": run.model.to_dict(), "train": spec.train.model_dump(),
                      "distill": distill.model_dump(exclude={"search"}) if distill else None,
                      "teacher": shard_set.teacher.checkpoint_sha256, "inputs": shard_set.inputs,
                      "init_model": init_model, **split_fingerprint(spec)}
        planned.append(Planned(role, run, depends_on))
    targets = next((p.run.targets for p in planned if p.run.targets), None)
    wanted = [spec.features.label, spec.features.group, *spec.features.input_columns(), *spec.split_keys,
              *(targets.columns if targets else [])]
    columns = [c for c in dict.fromkeys(wanted) if c and c in shard_set.columns]
    inputs = [spec.features.label, *spec.features.input_columns()]
    return train_or_reuse_together(spec.run_dir, planned,
                                   dataset=lambda: split_side(read_shards(shard_set, columns), spec, "train"),
                                   validation=lambda: read_validation(spec, inputs))


def student_run(spec: JobSpec, role: str, rows: int, hidden_dim: int | None = None,
                init_model: str | None = None, distill: DistillSpec | None = None) -> TrainingRun:
    """The training plan of a student over `rows` shard rows (the benchmarks train it directly): distilled
    with `distill`, or on hard labels only."""
    return TrainingRun(role=role, model=ModelConfig.from_section(spec.student, spec.features.out_dim),
                       layout=FeatureLayout.from_spec(spec.features), train=spec.train, task=spec.features.task,
                       label=spec.features.label, rows=rows, group=spec.features.group, distill=distill,
                       targets=SoftLabelTargets.for_spec(spec, hidden_dim) if distill else None,
                       init_model=init_model)


def read_shards(shard_set: ShardSet, columns: list[str]):
    """A Ray Dataset over the shard files the manifests list (never a directory), `columns` only."""
    files, filesystem = storage.arrow_paths([s.path for s in shard_set.shards])
    return read_named_files(files, filesystem).select_columns(columns)
