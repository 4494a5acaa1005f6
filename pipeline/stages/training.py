"""Skip-if-done around one training call, shared by the teacher and student stages.

A model is retrained only when something it depends on changed: `models/<role>.json` keeps the
fingerprint of those inputs beside `models/<role>.pt`. A crashed call resumes by name (Ray Train).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Callable

from pipeline import storage
from pipeline.data import clicklogs
from pipeline.features import FeatureLayout
from pipeline.models import ModelConfig
from pipeline.spec import JobSpec, TrainSpec
from pipeline.stages.click_logs import bad_rows_located, read_validation, read_window, split_side
from pipeline.train import TrainingRun, TrainRequest, train_model


def train_or_reuse(run_dir: str, role: str, run: TrainingRun, depends_on: dict, dataset: Callable[[], object],
                   validation: Callable[[], object] | None = None) -> str:
    """`models/<role>.pt` trained from `run` on `dataset()`, unless it exists for the same `depends_on`.

    Args:
        run: the plan; its `role` is replaced by `<role>-<fingerprint>` (the Ray Train run name).
        dataset, validation: build the Ray Datasets (only called when training is needed); validation
            rows are scored after every epoch.
    """
    fingerprint = hashlib.sha256(json.dumps(depends_on, sort_keys=True, default=str).encode()).hexdigest()[:12]
    model_path = storage.join(run_dir, "models", f"{role}.pt")
    record_path = storage.join(run_dir, "models", f"{role}.json")
    if storage.exists(model_path) and storage.exists(record_path):
        if storage.read_json(record_path)["fingerprint"] == fingerprint:
            print(f"{role}: reusing {model_path} (same spec and inputs)", flush=True)
            return model_path
    named = dataclasses.replace(run, role=f"{role}-{fingerprint}")
    result = train_model(TrainRequest(run=named, dataset=dataset(), model_path=model_path, run_dir=run_dir,
                                      validation=validation() if validation else None))
    for epoch in result.history:
        print(f"{role}: epoch {epoch['epoch']} loss {epoch['loss']:.4f} ({epoch['rows_per_s']:,.0f} rows/s)")
    if result.restarts:
        print(f"{role}: resumed from a checkpoint {result.restarts} time(s)", flush=True)
    if result.best_epoch != len(result.history):
        print(f"{role}: kept epoch {result.best_epoch}, the best on validation", flush=True)
    storage.atomic_write_json(record_path, {"fingerprint": fingerprint, "history": result.history,
                                            "steps": result.steps, "restarts": result.restarts,
                                            "best_epoch": result.best_epoch})
    return model_path


def training_records(run_dir: str) -> dict:
    """Per-role training history, sampled steps and restarts, from `models/<role>.json`."""
    records = {}
    for path in storage.list_files(storage.join(run_dir, "models"), suffix=".json"):
        role = path.rsplit("/", 1)[-1].removesuffix(".json")
        record = storage.read_json(path)
        records[role] = {k: record[k] for k in ("history", "steps", "restarts", "best_epoch")}
    return records


def split_fingerprint(spec: JobSpec) -> dict:
    """What a model's fingerprint adds for the validation split; nothing without one, so a run without a
    split keeps the fingerprint it always had."""
    return {"validation": spec.data.validation.model_dump()} if spec.data.validation else {}


def train_on_click_logs(spec: JobSpec, role: str, model: ModelConfig, train: TrainSpec, extra: dict) -> str:
    """A model trained on hard labels, straight from the click logs' fit rows (validated when the spec
    holds some out): the teacher, or the hard-label student the teacher gate compares it with."""
    days, columns = spec.data.fit_days(), [spec.features.label, *spec.features.input_columns()]
    key = [spec.validation_key] if spec.validation_key else []
    inputs = {d.isoformat(): clicklogs.count_rows([p])
              for d, p in clicklogs.partition_paths(spec.data.location, days).items()}
    run = TrainingRun(role=role, model=model, layout=FeatureLayout.from_spec(spec.features), train=train,
                      task=spec.features.task, label=spec.features.label, group=spec.features.group,
                      rows=round(sum(inputs.values()) * (1 - spec.data.held_out_fraction)))  # the lr schedule's
    depends_on = {"model": model.to_dict(), "train": spec.train.model_dump(), "inputs": inputs, **extra,
                  **split_fingerprint(spec)}
    with bad_rows_located(spec, days, columns):  # bad rows are dropped here, and quarantined by the label stage
        return train_or_reuse(spec.run_dir, role, run, depends_on,
                              dataset=lambda: split_side(read_window(spec, days, columns + key), spec, False),
                              validation=lambda: read_validation(spec, columns))
