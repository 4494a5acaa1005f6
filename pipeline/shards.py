"""Soft-label shards: Parquet files of (student inputs, label, teacher_logit) plus `_MANIFEST.json`.

The manifest is written last and atomically: a shard directory without one is incomplete and is
redone, never read by training. It records what was labelled (input partitions and their row
counts), by which teacher (checkpoint hash) and under which label settings (spec fingerprint),
so a rerun with the same inputs skips the stage.
"""

from __future__ import annotations

import datetime as dt
import hashlib

import pyarrow.parquet as pq

from pipeline import storage

MANIFEST = "_MANIFEST.json"
FORMAT_VERSION = 1


def file_sha256(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def build_manifest(*, teacher: dict, label_fingerprint: str, spec_hash: str, inputs: dict[str, dict],
                   shard_files: list[str], columns: list[str], quarantine_files: list[str] = ()) -> dict:
    """Counts rows per shard (and per quarantine file) from Parquet footers and assembles the manifest."""
    shards = [{"path": path, "rows": _parquet_rows(path)} for path in shard_files]
    quarantine = [{"path": path, "rows": _parquet_rows(path)} for path in quarantine_files]
    return {
        "format": FORMAT_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "teacher": teacher,
        "label_fingerprint": label_fingerprint,
        "spec_hash": spec_hash,
        "inputs": inputs,
        "input_rows": sum(i["rows"] for i in inputs.values()),
        "shards": shards,
        "total_rows": sum(s["rows"] for s in shards),
        "quarantine": quarantine,
        "quarantined_rows": sum(q["rows"] for q in quarantine),
        "columns": columns,
    }


def write_manifest(shard_dir: str, manifest: dict) -> None:
    storage.atomic_write_json(storage.join(shard_dir, MANIFEST), manifest)


def read_manifest(shard_dir: str) -> dict | None:
    """The manifest, or None when the shard set is absent or incomplete."""
    path = storage.join(shard_dir, MANIFEST)
    return storage.read_json(path) if storage.exists(path) else None


def is_reusable(manifest: dict | None, *, teacher_sha256: str, label_fingerprint: str,
                inputs: dict[str, dict]) -> bool:
    """True when existing shards were made by this teacher, these label settings and these inputs."""
    return (
        manifest is not None
        and manifest.get("format") == FORMAT_VERSION
        and manifest["teacher"]["checkpoint_sha256"] == teacher_sha256
        and manifest["label_fingerprint"] == label_fingerprint
        and manifest["inputs"] == inputs
        and manifest["total_rows"] + manifest.get("quarantined_rows", 0) == manifest["input_rows"]
    )


def shard_schema(uri: str):
    """The Arrow schema of a shard file, from its footer."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).schema_arrow


def _parquet_rows(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def combine(manifests: list[dict]) -> dict:
    """One view over per-day manifests (what training reads): every input, every shard, the totals."""
    first = manifests[0]
    return {
        "teacher": first["teacher"],
        "hidden_dim": first.get("hidden_dim"),
        "label_fingerprint": first["label_fingerprint"],
        "inputs": {day: entry for m in manifests for day, entry in m["inputs"].items()},
        "input_rows": sum(m["input_rows"] for m in manifests),
        "shards": [shard for m in manifests for shard in m["shards"]],
        "total_rows": sum(m["total_rows"] for m in manifests),
        "quarantined_rows": sum(m.get("quarantined_rows", 0) for m in manifests),
        "columns": first["columns"],
    }
