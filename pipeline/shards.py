"""The soft-label contract between the label stage and the students: columns, manifests, targets, collate.

A day's shards are Parquet files of (row id, label, the student's inputs, the teacher's outputs) plus a
`_MANIFEST.json` written last and atomically: a shard directory without one is incomplete and is
redone, never read by training. The manifest records what was labelled (input partitions and their
row counts), by which teacher (checkpoint hash) and under which label settings (spec fingerprint), so
a rerun with the same inputs skips the day. This module owns every column name and manifest field;
nothing else reads a manifest by string key.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.features import FeatureLayout, table_to_inputs

if TYPE_CHECKING:
    import torch

MANIFEST = "_MANIFEST.json"
FORMAT_VERSION = 1
# Teacher output columns of a shard (and the batch keys the losses read).
TEACHER_LOGIT = "teacher_logit"  # binary: (B,) float
TEACHER_LOGITS = "teacher_logits"  # multiclass: (B, C) fixed-size list
TOPK_INDICES, TOPK_VALUES = "teacher_topk_indices", "teacher_topk_values"  # multiclass top-k: (B, k) each
TEACHER_HIDDEN = "teacher_hidden"  # the teacher's last hidden layer (B, H), for hint losses


def target_column(task: str) -> str:
    """The column holding the distillation target for a task."""
    return TEACHER_LOGITS if task == "multiclass" else TEACHER_LOGIT


def member_column(task: str, teacher_name: str) -> str:
    """The column holding one ensemble member's logits (`teacher_logit__<name>`)."""
    return f"{target_column(task)}__{teacher_name}"


@dataclass(frozen=True)
class TeacherMember:
    name: str
    model: str
    checkpoint: str
    checkpoint_sha256: str
    weight: float = 1.0


@dataclass(frozen=True)
class TeacherIdentity:
    """What made the soft labels: one teacher, or an ensemble with one hash over its members and weights."""

    name: str
    model: str
    checkpoint: str | None  # None for an ensemble
    checkpoint_sha256: str
    members: tuple[TeacherMember, ...]
    combine: str | None = None  # ensembles: "mean" or "weighted"

    @classmethod
    def from_dict(cls, raw: dict) -> TeacherIdentity:
        members = tuple(TeacherMember(**m) for m in raw["members"])
        return cls(**{k: raw.get(k) for k in ("name", "model", "checkpoint", "checkpoint_sha256", "combine")},
                   members=members)

    def to_dict(self) -> dict:
        members = [dataclasses.asdict(m) for m in self.members]
        if self.combine is None:  # one teacher: its own fields, as manifests have always held them
            return members[0] | {"members": members}
        return {"name": self.name, "model": self.model, "checkpoint": self.checkpoint,
                "checkpoint_sha256": self.checkpoint_sha256, "combine": self.combine, "members": members}


@dataclass(frozen=True)
class FileRows:
    path: str
    rows: int


@dataclass(frozen=True)
class Manifest:
    """One day's soft labels: what they were made from, and every file with its row count."""

    teacher: TeacherIdentity
    label_fingerprint: str
    spec_hash: str
    inputs: dict[str, dict]  # {day: partition fingerprint (files, sizes, mtimes or ETags, rows)}
    shards: tuple[FileRows, ...]
    columns: tuple[str, ...]
    quarantine: tuple[FileRows, ...] = ()
    hidden_dim: int | None = None  # width of `teacher_hidden` when stored
    created_at: str = ""
    format: int = FORMAT_VERSION

    @property
    def input_rows(self) -> int:
        return sum(i["rows"] for i in self.inputs.values())

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def quarantined_rows(self) -> int:
        return sum(q.rows for q in self.quarantine)

    @property
    def complete(self) -> bool:
        """Exactly once: every input row is labelled or quarantined."""
        return self.total_rows + self.quarantined_rows == self.input_rows

    def is_reusable(self, *, teacher_sha256: str, label_fingerprint: str, inputs: dict[str, dict]) -> bool:
        """True when these shards were made by this teacher, these label settings and these inputs."""
        return (self.format == FORMAT_VERSION and self.teacher.checkpoint_sha256 == teacher_sha256
                and self.label_fingerprint == label_fingerprint and self.inputs == inputs and self.complete)

    def to_dict(self) -> dict:
        """The JSON form; the derived row totals are written too, for people and other tools."""
        return {"format": self.format, "created_at": self.created_at, "teacher": self.teacher.to_dict(),
                "label_fingerprint": self.label_fingerprint, "spec_hash": self.spec_hash, "inputs": self.inputs,
                "input_rows": self.input_rows, "shards": [dataclasses.asdict(s) for s in self.shards],
                "total_rows": self.total_rows, "quarantine": [dataclasses.asdict(q) for q in self.quarantine],
                "quarantined_rows": self.quarantined_rows, "columns": list(self.columns),
                "hidden_dim": self.hidden_dim}

    @classmethod
    def from_dict(cls, raw: dict) -> Manifest:
        return cls(teacher=TeacherIdentity.from_dict(raw["teacher"]), label_fingerprint=raw["label_fingerprint"],
                   spec_hash=raw["spec_hash"], inputs=raw["inputs"], columns=tuple(raw["columns"]),
                   shards=tuple(FileRows(s["path"], s["rows"]) for s in raw["shards"]),
                   quarantine=tuple(FileRows(q["path"], q["rows"]) for q in raw.get("quarantine", [])),
                   hidden_dim=raw.get("hidden_dim"), created_at=raw.get("created_at", ""),
                   format=raw.get("format", 0))


def build_manifest(*, teacher: TeacherIdentity, label_fingerprint: str, spec_hash: str, inputs: dict[str, dict],
                   shard_files: list[str], quarantine_files: list[str] = ()) -> Manifest:
    """Counts rows per shard (and per quarantine file) from Parquet footers; columns and hidden width
    come from the first shard's schema."""
    schema = _schema(shard_files[0]) if shard_files else None
    hidden = schema.field(TEACHER_HIDDEN).type.list_size if schema and TEACHER_HIDDEN in schema.names else None
    return Manifest(
        teacher=teacher, label_fingerprint=label_fingerprint, spec_hash=spec_hash, inputs=inputs,
        shards=tuple(FileRows(p, _parquet_rows(p)) for p in shard_files),
        quarantine=tuple(FileRows(p, _parquet_rows(p)) for p in quarantine_files),
        columns=tuple(schema.names) if schema else (), hidden_dim=hidden,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def write_manifest(shard_dir: str, manifest: Manifest) -> None:
    storage.atomic_write_json(storage.join(shard_dir, MANIFEST), manifest.to_dict())


def read_manifest(shard_dir: str) -> Manifest | None:
    """The manifest, or None when the shard set is absent or incomplete."""
    path = storage.join(shard_dir, MANIFEST)
    return Manifest.from_dict(storage.read_json(path)) if storage.exists(path) else None


def file_sha256(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def _schema(uri: str):
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).schema_arrow


def _parquet_rows(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


@dataclass(frozen=True)
class ShardSet:
    """The soft labels of several days, as training reads them: every shard every manifest lists."""

    days: tuple[Manifest, ...]

    @property
    def teacher(self) -> TeacherIdentity:
        return self.days[0].teacher

    @property
    def hidden_dim(self) -> int | None:
        return self._with_rows.hidden_dim

    @property
    def columns(self) -> tuple[str, ...]:
        return self._with_rows.columns

    @property
    def _with_rows(self) -> Manifest:
        """The first day with shards: a quiet day of a flat log has a manifest but no files, so no columns."""
        return next((m for m in self.days if m.shards), self.days[0])

    @property
    def inputs(self) -> dict[str, dict]:
        return {day: entry for m in self.days for day, entry in m.inputs.items()}

    @property
    def shards(self) -> tuple[FileRows, ...]:
        return tuple(s for m in self.days for s in m.shards)

    @property
    def input_rows(self) -> int:
        return sum(m.input_rows for m in self.days)

    @property
    def total_rows(self) -> int:
        return sum(m.total_rows for m in self.days)

    @property
    def quarantined_rows(self) -> int:
        return sum(m.quarantined_rows for m in self.days)


@dataclass(frozen=True)
class SoftLabelTargets:
    """Which teacher outputs a distilled student reads from the shards, and their shapes."""

    task: str = "binary"
    top_k: int | None = None  # multiclass: only the k largest logits are stored
    hint_dim: int | None = None  # width of `teacher_hidden` when the hint loss reads it

    @classmethod
    def for_spec(cls, spec, hidden_dim: int | None = None) -> SoftLabelTargets:
        multiclass = spec.features.task == "multiclass"
        hint = spec.label.store_hidden and spec.distill.hint_weight > 0
        return cls(task=spec.features.task, top_k=spec.label.top_k if multiclass else None,
                   hint_dim=hidden_dim if hint else None)

    @property
    def columns(self) -> list[str]:
        """The shard columns these targets read."""
        logits = [TOPK_INDICES, TOPK_VALUES] if self.top_k else [target_column(self.task)]
        return logits + ([TEACHER_HIDDEN] if self.hint_dim else [])


class ShardCollate:
    """Arrow batch -> flat dict of tensors (model inputs, label, teacher targets[, group])."""

    def __init__(self, layout: FeatureLayout, label: str, targets: SoftLabelTargets | None, group: str | None,
                 task: str = "binary"):
        self.layout, self.label, self.group, self.task = layout, label, group, task
        self.targets = targets.columns if targets else []

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        import torch  # here, not at the top: the label stage's ONNX Runtime actors import this module without torch

        tensors = table_to_inputs(batch, self.layout)
        label = batch.column(self.label).to_numpy()
        tensors["label"] = torch.from_numpy(label.astype("int64" if self.task == "multiclass" else "float32"))
        for column in self.targets:  # (B,) for a binary logit, (B, K) for every list column
            values = batch.column(column)
            if column == TEACHER_LOGIT:
                tensors[column] = torch.from_numpy(values.to_numpy().astype("float32"))
            else:
                tensors[column] = _matrix(values, "int64" if column == TOPK_INDICES else "float32")
        if self.group and self.group in batch.column_names:
            tensors["group"] = torch.from_numpy(batch.column(self.group).to_numpy().astype("int64"))
        return tensors


def _matrix(column, dtype: str) -> torch.Tensor:
    """A list column whose rows all have the same length -> (B, K) tensor, without per-row Python."""
    import torch

    rows = len(column)
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(dtype)
    return torch.from_numpy(values.reshape(rows, -1) if rows else values.reshape(0, 0))
