"""Skip-if-done around one training call, shared by the teacher and student stages.

A model is retrained only when something it depends on changed: `models/<role>.json` keeps the
fingerprint of those inputs beside `models/<role>.pt`. A crashed call resumes by name (Ray Train).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Callable

from pipeline import storage
from pipeline.data import clicklogs
from pipeline.features import FeatureLayout
from pipeline.models import ModelConfig
from pipeline.spec import FeaturesSpec, JobSpec, TrainSpec
from pipeline.stages.click_logs import bad_rows_located, log_source, read_validation, read_window, split_side
from pipeline.train import TrainingRun, TrainPass, TrainResult, train_pass


@dataclass(frozen=True)
class Planned:
    """One model to train or reuse: its role (`models/<role>.pt`), plan, and what it depends on."""

    role: str
    run: TrainingRun
    depends_on: dict

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.depends_on, sort_keys=True, default=str).encode()).hexdigest()[:12]


def train_or_reuse(run_dir: str, role: str, run: TrainingRun, depends_on: dict, dataset: Callable[[], object],
                   validation: Callable[[], object] | None = None) -> str:
    """`models/<role>.pt` trained from `run` on `dataset()`, unless it exists for the same `depends_on`."""
    return train_or_reuse_together(run_dir, [Planned(role, run, depends_on)], dataset, validation)[role]


def train_or_reuse_together(run_dir: str, planned: list[Planned], dataset: Callable[[], object],
                            validation: Callable[[], object] | None = None) -> dict[str, str]:
    """{role: `models/<role>.pt`}: the models whose file exists for the same `depends_on` are reused, the
    others train together in one call (one read of `dataset()`, the fixed cost paid once).

    Args:
        dataset, validation: build the Ray Datasets (only called when training is needed); validation
            rows are scored after every epoch.
    """
    paths = {p.role: storage.join(run_dir, "models", f"{p.role}.pt") for p in planned}
    todo = [p for p in planned if not _reusable(run_dir, p)]
    for p in planned:
        if p not in todo:
            print(f"{p.role}: reusing {paths[p.role]} (same spec and inputs)", flush=True)
    if not todo:
        return paths
    name = "+".join(p.role for p in todo) if len(todo) <= 2 else f"{todo[0].role}+{len(todo) - 1}"
    name += "-" + hashlib.sha256("".join(p.fingerprint for p in todo).encode()).hexdigest()[:12]
    results = train_pass(TrainPass(name=name, runs=tuple(dataclasses.replace(p.run, role=p.role) for p in todo),
                                   model_paths={p.role: paths[p.role] for p in todo}, dataset=dataset(),
                                   run_dir=run_dir, validation=validation() if validation else None))
    for p in todo:
        _record(run_dir, p, results[p.role])
    return paths


def _reusable(run_dir: str, planned: Planned) -> bool:
    model_path = storage.join(run_dir, "models", f"{planned.role}.pt")
    record_path = storage.join(run_dir, "models", f"{planned.role}.json")
    return (storage.exists(model_path) and storage.exists(record_path)
            and storage.read_json(record_path)["fingerprint"] == planned.fingerprint)


def _record(run_dir: str, planned: Planned, result: TrainResult) -> None:
    """Prints how the model trained and writes `models/<role>.json` (its fingerprint and history)."""
    role = planned.role
    for epoch in result.history:
        print(f"{role}: epoch {epoch['epoch']} loss {epoch['loss']:.4f} ({epoch['rows_per_s']:,.0f} rows/s)")
    if result.restarts:
        print(f"{role}: resumed from a checkpoint {result.restarts} time(s)", flush=True)
    if result.best_epoch != len(result.history):
        print(f"{role}: kept epoch {result.best_epoch}, the best on validation", flush=True)
    storage.atomic_write_json(storage.join(run_dir, "models", f"{role}.json"),
                              {"fingerprint": planned.fingerprint, "history": result.history,
                               "steps": result.steps, "restarts": result.restarts, "best_epoch": result.best_epoch})


def training_records(run_dir: str) -> dict:
    """Per-role training history, sampled steps and restarts, from `models/<role>.json`."""
    records = {}
    for path in storage.list_files(storage.join(run_dir, "models"), suffix=".json"):
        role = path.rsplit("/", 1)[-1].removesuffix(".json")
        record = storage.read_json(path)
        records[role] = {k: record[k] for k in ("history", "steps", "restarts", "best_epoch")}
    return records


def split_fingerprint(spec: JobSpec) -> dict:
    """What a model's fingerprint adds for the held-out rows (validation, evaluation); nothing without them,
    so a run without a split keeps the fingerprint it always had."""
    held_out = {"validation": spec.data.validation, "evaluation": spec.data.evaluation}
    return {name: section.model_dump() for name, section in held_out.items() if section is not None}


def click_log_model(spec: JobSpec, role: str, model: ModelConfig, train: TrainSpec, extra: dict,
                    features: FeaturesSpec | None = None) -> Planned:
    """A model to train on hard labels straight from the click logs' fit rows: the teacher, or the
    hard-label student the teacher gate compares it with. `features`: what it reads (default: the
    student's `features`; a teacher with extra features reads `spec.teacher_features(teacher)`)."""
    inputs = fit_inputs(spec)
    layout = FeatureLayout.from_spec(features or spec.features)
    run = TrainingRun(role=role, model=model, layout=layout, train=train,
                      task=spec.features.task, label=spec.features.label, group=spec.features.group,
                      rows=round(sum(inputs.values()) * (1 - spec.data.held_out_fraction)))  # the lr schedule's
    depends_on = {"model": model.to_dict(), "train": spec.train.model_dump(), "inputs": inputs, **extra,
                  **split_fingerprint(spec)}
    if features is not None and features != spec.features:  # teacher-only columns are an input too
        depends_on["layout"] = layout.to_dict()
    return Planned(role, run, depends_on)


def train_on_click_logs(spec: JobSpec, planned: list[Planned]) -> dict[str, str]:
    """{role: model path}: the models trained (or reused) together on one read of the click logs' fit rows,
    validated when the spec holds some out. They read one feature layout (`train_pass` checks): its columns
    are what is read."""
    days, columns = spec.data.fit_days(), [spec.features.label, *planned[0].run.layout.columns]
    with bad_rows_located(spec, days, columns):  # bad rows are dropped here, and quarantined by the label stage
        return train_or_reuse_together(
            spec.run_dir, planned, dataset=lambda: split_side(read_window(spec, days, columns + spec.split_keys),
                                                              spec, "train"),
            validation=lambda: read_validation(spec, columns))


def teacher_role(spec: JobSpec, teacher) -> str:
    """`models/<role>.pt` of a teacher: `teacher`, or `teacher_<name>` in an ensemble."""
    return "teacher" if len(spec.teacher) == 1 else f"teacher_{teacher.name}"


def fit_inputs(spec: JobSpec) -> dict[str, int]:
    """{day: rows} of the fit days' partitions (what a click-log model's fingerprint depends on)."""
    source = log_source(spec)
    return {d.isoformat(): clicklogs.count_rows(source, [day])
            for d, day in clicklogs.day_inputs(source, spec.data.fit_days()).items()}
