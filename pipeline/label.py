"""Label stage: a Ray Data actor pool runs the teacher over the click logs and writes soft-label shards.

Each actor loads the teacher once (`TeacherPredictor.__init__`) and maps Arrow batches to Arrow
batches with a `teacher_logit` column. Shards live per input partition (`date=YYYY-MM-DD/`), each
with its own manifest, so a day is skipped when its manifest covers the same input files, teacher
and label settings, and only new or changed days are labelled.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

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


@dataclass
class Labelled:
    """Soft labels for a set of days: the combined manifest, and which days were (re)labelled or reused."""

    manifest: dict
    relabelled: list[str]
    reused: list[str]


def label_days(spec, teacher_checkpoint: str, shard_root: str, days: list[dt.date]) -> Labelled:
    """Labels each day into `<shard_root>/date=YYYY-MM-DD/` unless its manifest shows the same teacher,
    label settings and input files (names, sizes, modification times or ETags): only new or changed
    partitions are labelled, and a new teacher relabels every one.
    """
    paths = clicklogs.partition_paths(spec.data.path, days)
    columns = [spec.features.id, spec.features.label] + spec.features.input_columns()
    clicklogs.check_columns(list(paths.values()), columns)
    teacher = {"checkpoint": teacher_checkpoint, "checkpoint_sha256": shards.file_sha256(teacher_checkpoint),
               "model": spec.teacher.model}
    fingerprint = spec.fingerprint("features", "label")
    manifests, relabelled, reused = {}, [], []
    for day, path in paths.items():
        day_dir = storage.join(shard_root, f"date={day.isoformat()}")
        inputs = {day.isoformat(): clicklogs.partition_fingerprint(path)}
        existing = shards.read_manifest(day_dir)
        if shards.is_reusable(existing, teacher_sha256=teacher["checkpoint_sha256"],
                              label_fingerprint=fingerprint, inputs=inputs):
            manifests[day] = existing
            reused.append(day.isoformat())
            continue
        manifests[day] = _label_partition(spec, day, day_dir, columns,
                                          teacher=teacher, fingerprint=fingerprint, inputs=inputs)
        relabelled.append(day.isoformat())
    log.info("label: %d day(s) labelled %s, %d reused %s", len(relabelled), relabelled, len(reused), reused)
    return Labelled(shards.combine(list(manifests.values())), relabelled, reused)


def _label_partition(spec, day: dt.date, day_dir: str, columns: list[str], *, teacher: dict,
                     fingerprint: str, inputs: dict) -> dict:
    """Runs the teacher actor pool over one partition; the manifest is written last, after the row check."""
    storage.remove_tree(day_dir)  # partial or stale shards: redo the day, never mix
    dataset = clicklogs.read_click_logs(spec.data.path, [day], columns)
    predictor = {"checkpoints": {"teacher_logit": teacher["checkpoint"]}, "logit_dtype": spec.label.logit_dtype}
    labelled = dataset.map_batches(TeacherPredictor, **pool_options(spec, predictor))
    (data_path,), filesystem = storage.arrow_paths([storage.join(day_dir, "data")])
    labelled.write_parquet(data_path, filesystem=filesystem, min_rows_per_file=spec.label.shard_rows)
    manifest = shards.build_manifest(
        teacher=teacher, label_fingerprint=fingerprint, spec_hash=spec.fingerprint(), inputs=inputs,
        shard_files=storage.list_files(storage.join(day_dir, "data")), columns=columns + ["teacher_logit"],
    )
    if manifest["total_rows"] != manifest["input_rows"]:  # the exactly-once invariant
        raise DataError(f"label stage wrote {manifest['total_rows']} rows for {manifest['input_rows']} input rows "
                        f"of {day}; the shards in {day_dir} are left without a manifest and will be redone")
    shards.write_manifest(day_dir, manifest)
    return manifest


def run_label_stage(spec, teacher_checkpoint: str, shard_root: str) -> dict:
    """Labels the spec's training days; returns the combined manifest (`reused` when nothing was labelled)."""
    labelled = label_days(spec, teacher_checkpoint, shard_root, spec.data.train_days.days())
    return labelled.manifest | {"reused": not labelled.relabelled, "relabelled": labelled.relabelled,
                                "reused_days": labelled.reused}


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
