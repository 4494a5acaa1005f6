"""Label stage: a Ray Data actor pool runs the teacher over the click logs and writes soft-label shards.

Input: the spec and the teacher checkpoints; output: `Labelled` (a `shards.ShardSet` and which days
were labelled or reused). Each actor loads the teacher once (`TeacherPredictor.__init__`) and maps
Arrow batches to Arrow batches with the teacher's output columns (`pipeline/shards.py`). Shards live
per input partition (`date=YYYY-MM-DD/`), each with its own manifest, so a day is skipped when its
manifest covers the same input files, teacher and label settings, and only new or changed days are
labelled.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline import shards, storage
from pipeline.data import clicklogs
from pipeline.errors import DataError, UserError
from pipeline.features import FeatureLayout, table_to_arrays, table_to_inputs
from pipeline.serving import OnnxModel, read_signature
from pipeline.shards import Manifest, ShardSet, TeacherIdentity, TeacherMember
from pipeline.stages.click_logs import bad_rows_located, log_source, read_window

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class TeacherPredictor:
    """Callable class for `map_batches`: Arrow batch in, the same batch plus the models' outputs out.

    `checkpoints` maps an output column to a saved model, e.g. {"teacher_logit": ".../teacher.pt"};
    evaluation scores several models in one pass. Models load once per actor, here in `__init__`.
    A binary model gives one float per row; a multiclass model a list of C floats (or, with `top_k`,
    only the k largest as `teacher_topk_indices` / `teacher_topk_values`). With `combine`, the
    weighted mean of the members' logits is added as the ensemble's target column; with `hidden`,
    the first model's last hidden layer is stored too (hint losses).
    """

    def __init__(self, checkpoints: dict[str, str], logit_dtype: str = "float32", threads: int = 1,
                 device: str = "cpu", keep_columns: list[str] | None = None, combine: Ensemble | None = None,
                 hidden: str | None = None, top_k: int | None = None, precision: str = "fp32",
                 runtime: str = "torch"):
        # Each model's own inputs: a teacher with extra features reads columns the students do not.
        self.models, self.onnx, self.layouts = {}, {}, {}
        self.logit_dtype = np.dtype(logit_dtype)
        self.keep_columns, self.combine, self.hidden, self.top_k = keep_columns, combine, hidden, top_k
        if runtime == "onnxruntime":  # each path is an export directory (pipeline/stages/export.py)
            # No torch here: an ONNX Runtime teacher needs none, and importing it cost each day's new actor 0.9 CPU-s.
            for column, path in checkpoints.items():
                signature = read_signature(path)
                self.onnx[column] = OnnxModel(storage.join(path, signature.file), threads=max(1, threads))
                self.layouts[column] = signature.feature_layout
            return
        import torch

        from pipeline.models import load_model

        torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        for column, path in checkpoints.items():
            model, _, self.layouts[column] = load_model(path)
            self.models[column] = model.to(self.device)
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def __call__(self, batch: pa.Table) -> pa.Table:
        outputs = self._predict_onnx(batch) if self.onnx else self._predict(batch)
        if self.combine:
            weights = self.combine.weights
            outputs[self.combine.column] = sum(w * outputs[c] for c, w in weights.items()) / sum(weights.values())
        out = batch.select(self.keep_columns) if self.keep_columns is not None else batch
        for column, values in outputs.items():
            for name, array in self._to_arrow(column, values):
                out = out.append_column(name, array)
        return out

    def _tensors(self, batch: pa.Table, layout: FeatureLayout) -> dict[str, torch.Tensor]:
        inputs = table_to_inputs(batch, layout)
        if self.device.type == "cuda":  # pinned pages copy to the GPU asynchronously
            inputs = {k: v.pin_memory() for k, v in inputs.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}

    def _predict_onnx(self, batch: pa.Table) -> dict[str, np.ndarray]:
        arrays = {layout: table_to_arrays(batch, layout) for layout in set(self.layouts.values())}
        return {column: model(arrays[self.layouts[column]]) for column, model in self.onnx.items()}

    def _predict(self, batch: pa.Table) -> dict[str, np.ndarray]:
        import torch

        outputs = {}
        tensors = {layout: self._tensors(batch, layout) for layout in set(self.layouts.values())}  # one per layout
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                                                     enabled=self.autocast is not None):
            for index, (column, model) in enumerate(self.models.items()):
                inputs = tensors[self.layouts[column]]
                if self.hidden and index == 0:
                    logits, hidden = model.forward_with_hidden(inputs)
                    outputs[self.hidden] = hidden.float().cpu().numpy()  # (B, H)
                else:
                    logits = model(inputs)
                outputs[column] = logits.float().cpu().numpy()  # (B,) or (B, C)
        return outputs

    def _to_arrow(self, column: str, values: np.ndarray) -> list[tuple[str, pa.Array]]:
        values = values.astype(self.logit_dtype)
        if values.ndim == 1:
            return [(column, pa.array(values))]
        is_target = self.combine is None or column == self.combine.column
        if self.top_k and column != self.hidden and is_target:
            top = np.argpartition(-values, self.top_k - 1, axis=1)[:, : self.top_k]  # (B, k), unordered
            kept = np.take_along_axis(values, top, axis=1)
            return [(shards.TOPK_INDICES, _fixed_list(top.astype(np.int32))), (shards.TOPK_VALUES, _fixed_list(kept))]
        return [(column, _fixed_list(values))]


def _fixed_list(matrix: np.ndarray) -> pa.Array:
    """(B, K) numpy -> Arrow fixed-size-list column, without per-row Python."""
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


@dataclass(frozen=True)
class Ensemble:
    """Scores several models and adds `column`: the weighted mean of their logits {member column: weight}."""

    column: str
    weights: dict[str, float]


@dataclass(frozen=True)
class Labelled:
    """Soft labels for a set of days, and which days were (re)labelled or reused."""

    shard_set: ShardSet
    relabelled: list[str]
    reused: list[str]


def label_days(spec, teachers: dict[str, str] | str, shard_root: str, days: list[dt.date]) -> Labelled:
    """Labels each day into `<shard_root>/date=YYYY-MM-DD/` unless its manifest shows the same teacher(s),
    label settings and input files (names, sizes, modification times or ETags): only new or changed
    partitions are labelled, and a new teacher relabels every one.

    Args:
        teachers: {teacher name: checkpoint} (an ensemble when several), or one checkpoint path.
    """
    if isinstance(teachers, str):
        teachers = {spec.teacher[0].name: teachers}
    source = log_source(spec)
    paths = clicklogs.day_inputs(source, days)
    columns = [*label_columns(spec), *spec.teacher_only_columns]  # read; the shards keep label_columns only
    clicklogs.check_columns(list(paths.values()), columns, source)
    teacher = teacher_identity(spec, teachers)
    fingerprint = spec.fingerprint("features", "label")
    manifests, relabelled, reused, exported = [], [], [], None
    for day, path in paths.items():
        day_dir = storage.join(shard_root, f"date={day.isoformat()}")
        inputs = {day.isoformat(): clicklogs.partition_fingerprint(source, path)}
        existing = shards.read_manifest(day_dir)
        if _reusable(existing, teacher, fingerprint, inputs, label_columns(spec)):
            manifests.append(existing)
            reused.append(day.isoformat())
            continue
        if exported is None and spec.label.runtime == "onnxruntime":  # only when a day is to be labelled
            exported = teachers_for_onnxruntime(spec, teacher, days)
        manifests.append(_label_partition(spec, day, day_dir, columns, teacher=teacher, fingerprint=fingerprint,
                                          inputs=inputs, exported=exported))
        relabelled.append(day.isoformat())
        print(f"  labelled {day}: {manifests[-1].total_rows:,} rows (day {len(manifests)} of {len(paths)})",
              flush=True)  # the console's progress through a long stage
    log.info("label: %d day(s) labelled %s, %d reused %s", len(relabelled), relabelled, len(reused), reused)
    return Labelled(ShardSet(tuple(manifests)), relabelled, reused)


def _reusable(existing: Manifest | None, teacher: TeacherIdentity, fingerprint: str, inputs: dict,
              kept: list[str]) -> bool:
    """A day's shards made by this teacher, these label settings and inputs, holding every column `kept`: a
    row-split key added since (with a given teacher checkpoint, nothing else changed) relabels the day."""
    return (existing is not None and existing.is_reusable(teacher_sha256=teacher.checkpoint_sha256,
                                                          label_fingerprint=fingerprint, inputs=inputs)
            and (not existing.shards or set(kept) <= set(existing.columns)))


def label_columns(spec) -> list[str]:
    """Click-log columns the shards carry: row id, label, group (listwise KD, slices) and the student's inputs;
    never a teacher-only column (the teacher reads it, the shards drop it)."""
    f = spec.features
    return list(dict.fromkeys(c for c in [f.id, f.label, f.group, *spec.split_keys, *f.input_columns()] if c))


def teacher_identity(spec, teachers: dict[str, str]) -> TeacherIdentity:
    """What made the soft labels: every teacher (model, checkpoint, hash, weight) and one combined hash
    that changes when any member, weight or the combination rule changes."""
    weights = {t.name: (t.weight if spec.distill.ensemble == "weighted" else 1.0) for t in spec.teacher}
    models = {t.name: t.model for t in spec.teacher}
    members = tuple(TeacherMember(name=name, model=models.get(name, "unknown"), checkpoint=path,
                                  checkpoint_sha256=shards.file_sha256(path), weight=weights.get(name, 1.0))
                    for name, path in teachers.items())
    if len(members) == 1:
        (one,) = members
        return TeacherIdentity(one.name, one.model, one.checkpoint, one.checkpoint_sha256, members)
    digest = hashlib.sha256(json.dumps([(m.checkpoint_sha256, m.weight) for m in members]).encode())
    return TeacherIdentity("ensemble", "+".join(m.model for m in members), None, digest.hexdigest(), members,
                           combine=spec.distill.ensemble)


def predictor_options(spec, teacher: TeacherIdentity, exported: dict[str, str] | None = None) -> dict:
    """TeacherPredictor arguments for labelling: one output column per member, plus the ensemble's target.

    `exported`: {checkpoint: its parity-checked ONNX export directory}, for `label.runtime: onnxruntime`."""
    task = spec.features.task
    if len(teacher.members) == 1:
        checkpoints, combine = {shards.target_column(task): teacher.members[0].checkpoint}, None
    else:
        checkpoints = {shards.member_column(task, m.name): m.checkpoint for m in teacher.members}
        combine = Ensemble(shards.target_column(task),
                           {shards.member_column(task, m.name): m.weight for m in teacher.members})
    if spec.label.runtime == "onnxruntime":
        checkpoints = {column: exported[path] for column, path in checkpoints.items()}
    return {"checkpoints": checkpoints, "combine": combine, "logit_dtype": spec.label.logit_dtype,
            "keep_columns": label_columns(spec),  # the teachers' outputs are added to these
            "hidden": shards.TEACHER_HIDDEN if spec.label.store_hidden else None, "top_k": spec.label.top_k,
            "precision": spec.label.precision, "runtime": spec.label.runtime}


def teachers_for_onnxruntime(spec, teacher: TeacherIdentity, days: list[dt.date]) -> dict[str, str]:
    """{checkpoint: ONNX export directory} of every teacher member, parity-checked on the days' first rows."""
    from pipeline.stages.export import export_for_labelling  # torch.onnx loads only for this runtime

    return {m.checkpoint: export_for_labelling(spec, m.name, m.checkpoint, days) for m in teacher.members}


def _label_partition(spec, day: dt.date, day_dir: str, columns: list[str], *, teacher: TeacherIdentity,
                     fingerprint: str, inputs: dict, exported: dict[str, str] | None = None) -> Manifest:
    """Runs the teacher actor pool over one partition; the manifest is written last, after the row check:
    rows read = rows labelled + rows quarantined."""
    quarantine_dir = storage.join(quarantine_root(day_dir), f"date={day.isoformat()}")
    storage.remove_tree(day_dir)  # partial or stale shards: redo the day, never mix
    storage.remove_tree(quarantine_dir)
    if not sum(i["rows"] for i in inputs.values()):  # a quiet day of a flat log: nothing to label
        manifest = shards.build_manifest(teacher=teacher, label_fingerprint=fingerprint, spec_hash=spec.fingerprint(),
                                         inputs=inputs, shard_files=[], quarantine_files=[])
        shards.write_manifest(day_dir, manifest)
        return manifest
    labelled = labelling_dataset(spec, day, columns, teacher, quarantine_dir, exported)
    task_cpus = io_task_cpus(spec)
    write_remote_args = {"num_cpus": task_cpus} if task_cpus else None
    (data_path,), filesystem = storage.arrow_paths([storage.join(day_dir, "data")])
    with bad_rows_located(spec, [day], columns):
        try:
            labelled.write_parquet(data_path, filesystem=filesystem, min_rows_per_file=spec.label.shard_rows,
                                   max_rows_per_file=spec.label.shard_rows, ray_remote_args=write_remote_args)
        except Exception as exc:  # a full disk or lost permissions, deep inside a Ray write task
            if (error := storage.write_error(exc, storage.join(day_dir, "data"))) is not None:
                raise error from None  # the day has no manifest: a rerun redoes it
            raise
    manifest = shards.build_manifest(
        teacher=teacher, label_fingerprint=fingerprint, spec_hash=spec.fingerprint(), inputs=inputs,
        shard_files=storage.list_files(storage.join(day_dir, "data")),
        quarantine_files=storage.list_files(quarantine_dir),
    )
    if not manifest.complete:  # exactly once
        raise DataError(f"label stage wrote {manifest.total_rows} rows and quarantined {manifest.quarantined_rows} "
                        f"for {manifest.input_rows} input rows of {day}; the shards in {day_dir} are left without "
                        "a manifest and will be redone")
    if manifest.quarantined_rows:
        log.warning("label: %d bad row(s) of %s quarantined under %s", manifest.quarantined_rows, day,
                    quarantine_dir)
    shards.write_manifest(day_dir, manifest)
    return manifest


def labelling_dataset(spec, day: dt.date, columns: list[str], teacher: TeacherIdentity, quarantine_dir: str,
                      exported: dict[str, str] | None = None):
    """One day's labelling as a lazy Ray Dataset: the Parquet read with the row checks fused into its tasks
    (bad rows quarantined, or the stage stopped), then the teacher actor pool."""
    dataset = read_window(spec, [day], columns, quarantine_dir=quarantine_dir, task_cpus=io_task_cpus(spec))
    if spec.label.runtime == "onnxruntime" and exported is None:
        exported = teachers_for_onnxruntime(spec, teacher, [day])
    return map_with_teachers(dataset, spec, predictor_options(spec, teacher, exported))


def map_with_teachers(dataset, spec, predictor_kwargs: dict):
    """`dataset` mapped by `TeacherPredictor(**predictor_kwargs)` on the spec's bounded actor pool."""
    with warnings.catch_warnings():
        # Ray 2.60 deprecates extra remote arguments such as max_restarts (for 2.64) but has no named
        # parameter for them yet; the pinned Ray accepts them, and a Ray upgrade runs the plan test.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return dataset.map_batches(TeacherPredictor, **pool_options(spec, predictor_kwargs))


def io_task_cpus(spec) -> float | None:
    """The CPUs each read and write task of the label stage reserves: half a CPU beside an ONNX Runtime
    teacher, Ray Data's default (None: 1) beside an eager one.

    An ONNX Runtime teacher keeps its core about half busy (it runs twice as fast as eager), so the read and
    write tasks, not the teacher, bound the stage; at one CPU each, a 2-CPU node beside one actor runs one task
    at a time and the actor waits. At half a CPU two run beside it (bench/label_throughput.py --runtime
    onnxruntime). An eager teacher keeps its core busy: there, more tasks beside it gained nothing.
    """
    return 0.5 if spec.label.runtime == "onnxruntime" else None


def quarantine_root(day_dir: str) -> str:
    """`<run>/shards/date=D` -> `<run>/quarantine`: bad rows sit next to the shards they were kept out of."""
    return storage.join(day_dir.rstrip("/").rsplit("/", 2)[0], "quarantine")


def run_label_stage(spec, teachers: dict[str, str], shard_root: str) -> Labelled:
    """Labels the days the students fit on (those without valid shards); held-out validation days are not."""
    return label_days(spec, teachers, shard_root, spec.data.fit_days())


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
        # Ray Data's defaults, stated because we rely on them: a dead actor is restarted and its batches
        # retried. Stated, they also keep the read tasks' row checks out of the actors (Ray Data fuses a
        # task step into the actor step after it only when their remote arguments are equal).
        "max_restarts": -1,
        "max_task_retries": -1,
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
