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
from pipeline.train import TrainingRun, TrainRequest, train_model


def train_or_reuse(run_dir: str, role: str, run: TrainingRun, depends_on: dict, dataset: Callable[[], object]) -> str:
    """`models/<role>.pt` trained from `run` on `dataset()`, unless it exists for the same `depends_on`.

    Args:
        run: the plan; its `role` is replaced by `<role>-<fingerprint>` (the Ray Train run name).
        dataset: builds the Ray Dataset (only called when training is needed).
    """
    fingerprint = hashlib.sha256(json.dumps(depends_on, sort_keys=True, default=str).encode()).hexdigest()[:12]
    model_path = storage.join(run_dir, "models", f"{role}.pt")
    record_path = storage.join(run_dir, "models", f"{role}.json")
    if storage.exists(model_path) and storage.exists(record_path):
        if storage.read_json(record_path)["fingerprint"] == fingerprint:
            print(f"{role}: reusing {model_path} (same spec and inputs)", flush=True)
            return model_path
    named = dataclasses.replace(run, role=f"{role}-{fingerprint}")
    result = train_model(TrainRequest(run=named, dataset=dataset(), model_path=model_path, run_dir=run_dir))
    for epoch in result.history:
        print(f"{role}: epoch {epoch['epoch']} loss {epoch['loss']:.4f} ({epoch['rows_per_s']:,.0f} rows/s)")
    if result.restarts:
        print(f"{role}: resumed from a checkpoint {result.restarts} time(s)", flush=True)
    storage.atomic_write_json(record_path, {"fingerprint": fingerprint, "history": result.history,
                                            "steps": result.steps, "restarts": result.restarts})
    return model_path


def training_records(run_dir: str) -> dict:
    """Per-role training history, sampled steps and restarts, from `models/<role>.json`."""
    records = {}
    for path in storage.list_files(storage.join(run_dir, "models"), suffix=".json"):
        role = path.rsplit("/", 1)[-1].removesuffix(".json")
        record = storage.read_json(path)
        records[role] = {k: record[k] for k in ("history", "steps", "restarts")}
    return records
