"""Label stage: a Ray Data actor pool runs the teacher over the click logs and writes soft-label shards.

Each actor loads the teacher once (`TeacherPredictor.__init__`) and maps Arrow batches to Arrow
batches with a `teacher_logit` column. The stage is skipped when a valid manifest already covers
the same inputs, teacher and label settings.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from pipeline import shards, storage
from pipeline.data import clicklogs
from pipeline.errors import DataError, UserError
from pipeline.features import table_to_inputs

log = logging.getLogger(__name__)


class TeacherPredictor:
    """Callable class for `map_batches`: Arrow batch in, the same batch plus one logit column per model out.

    `checkpoints` maps an output column to a saved model, e.g. {"teacher_logit": ".../teacher.pt"};
    evaluation scores several models in one pass. Models load once per actor, here in `__init__`.
    """

    def __init__(self, checkpoints: dict[str, str], logit_dtype: str = "float32", threads: int = 1,
                 device: str = "cpu", keep_columns: list[str] | None = None):
        from pipeline.models import load_model

        torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        self.models = {}
        for column, path in checkpoints.items():
            model, _, self.layout = load_model(path)  # every model of one job shares the feature layout
            self.models[column] = model.to(self.device)
        self.logit_dtype = np.dtype(logit_dtype)
        self.keep_columns = keep_columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in table_to_inputs(batch, self.layout).items()}
        out = batch.select(self.keep_columns) if self.keep_columns is not None else batch
        with torch.inference_mode():
            for column, model in self.models.items():
                logits = model(inputs).float().cpu().numpy()  # (B,)
                out = out.append_column(column, pa.array(logits.astype(self.logit_dtype)))
        return out


def run_label_stage(spec, teacher_checkpoint: str, shard_dir: str) -> dict:
    """Labels the spec's training days into `shard_dir`; returns the (new or reused) manifest."""
    days = spec.data.train_days.days()
    paths = clicklogs.partition_paths(spec.data.path, days)
    columns = [spec.features.id, spec.features.label] + spec.features.input_columns()
    clicklogs.check_columns(list(paths.values()), columns)
    inputs = {d.isoformat(): {"path": p, "rows": clicklogs.count_rows([p])} for d, p in paths.items()}
    teacher = {"checkpoint": teacher_checkpoint, "checkpoint_sha256": shards.file_sha256(teacher_checkpoint),
               "model": spec.teacher.model}
    fingerprint = spec.fingerprint("features", "label")

    existing = shards.read_manifest(shard_dir)
    if shards.is_reusable(existing, teacher_sha256=teacher["checkpoint_sha256"],
                          label_fingerprint=fingerprint, inputs=inputs):
        log.info("label: reusing %d soft labels in %s (same teacher, inputs and settings)",
                 existing["total_rows"], shard_dir)
        return existing | {"reused": True}

    storage.remove_tree(shard_dir)  # partial or stale shards: redo them all, never mix
    dataset = clicklogs.read_click_logs(spec.data.path, days, columns)
    predictor = {"checkpoints": {"teacher_logit": teacher_checkpoint}, "logit_dtype": spec.label.logit_dtype}
    labelled = dataset.map_batches(TeacherPredictor, **pool_options(spec, predictor))
    (data_path,), filesystem = storage.arrow_paths([storage.join(shard_dir, "data")])
    labelled.write_parquet(data_path, filesystem=filesystem, min_rows_per_file=spec.label.shard_rows)

    shard_files = [storage.join(shard_dir, "data", f) for f in storage.list_dir(storage.join(shard_dir, "data"))
                   if f.endswith(".parquet")]
    manifest = shards.build_manifest(
        teacher=teacher, label_fingerprint=fingerprint, spec_hash=spec.fingerprint(),
        inputs=inputs, shard_files=shard_files, columns=columns + ["teacher_logit"],
    )
    if manifest["total_rows"] != manifest["input_rows"]:  # the exactly-once invariant
        raise DataError(f"label stage wrote {manifest['total_rows']} rows for {manifest['input_rows']} input rows; "
                        f"the shards in {shard_dir} are left without a manifest and will be redone")
    shards.write_manifest(shard_dir, manifest)
    return manifest


def pool_options(spec, predictor_kwargs: dict) -> dict:
    """`map_batches` arguments for a bounded teacher actor pool sized by the spec's `label` section."""
    import ray

    low, high = spec.label.actors
    gpus = spec.label.gpus_per_actor
    cpus = ray.cluster_resources().get("CPU", 0)
    if gpus == 0 and high * spec.label.cpus_per_actor >= cpus:
        # Actors holding every CPU starve Ray Data's read and write tasks: the stage would hang.
        raise UserError(
            f"label.actors max {high} x label.cpus_per_actor {spec.label.cpus_per_actor} reserves all "
            f"{cpus:g} CPUs of the cluster, leaving none to read and write Parquet; lower label.actors "
            "or label.cpus_per_actor"
        )
    options = {
        "compute": ray.data.ActorPoolStrategy(min_size=low, max_size=high),
        "batch_size": spec.label.batch_size,
        "batch_format": "pyarrow",
        "num_cpus": spec.label.cpus_per_actor,
        "num_gpus": gpus,
        "fn_constructor_kwargs": predictor_kwargs | {
            "threads": max(1, int(spec.label.cpus_per_actor)),
            "device": "cuda" if gpus > 0 else "cpu",
        },
    }
    if storage.worker_env():
        # Actors read the checkpoints themselves, maybe from S3: give them the endpoint and region even
        # when Ray was started by someone else (a notebook, a test) without our runtime_env.
        options["runtime_env"] = {"env_vars": storage.worker_env()}
    return options
