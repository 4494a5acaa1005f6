"""The soft-label contract (`pipeline/shards.py`): manifests old and new, the reuse rule, targets, collate."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import shards
from pipeline.features import FeatureLayout
from pipeline.shards import FileRows, Manifest, ShardCollate, ShardSet, SoftLabelTargets, TeacherIdentity

# A day's manifest exactly as the label stage wrote it before `Manifest` existed (2026-11-30).
OLD_MANIFEST = {
    "format": 1, "created_at": "2026-11-30T10:00:00+00:00",
    "teacher": {"name": "teacher", "model": "dcn_v2", "checkpoint": "/runs/demo/models/teacher.pt",
                "checkpoint_sha256": "ab" * 32, "weight": 1.0,
                "members": [{"name": "teacher", "model": "dcn_v2", "checkpoint": "/runs/demo/models/teacher.pt",
                             "checkpoint_sha256": "ab" * 32, "weight": 1.0}]},
    "label_fingerprint": "f" * 16, "spec_hash": "e" * 16,
    "inputs": {"2026-11-01": {"files": [{"name": "part-00000.parquet", "size": 123, "mtime_ns": 5}], "rows": 700}},
    "input_rows": 700,
    "shards": [{"path": "/runs/demo/shards/date=2026-11-01/data/a.parquet", "rows": 500},
               {"path": "/runs/demo/shards/date=2026-11-01/data/b.parquet", "rows": 198}],
    "total_rows": 698,
    "quarantine": [{"path": "/runs/demo/quarantine/date=2026-11-01/q.parquet", "rows": 2}],
    "quarantined_rows": 2,
    "columns": ["event_id", "clicked", "price", "teacher_logit"],
}


@pytest.fixture
def old_day(tmp_path):
    day_dir = tmp_path / "date=2026-11-01"
    day_dir.mkdir()
    (day_dir / shards.MANIFEST).write_text(json.dumps(OLD_MANIFEST))
    return str(day_dir)


def test_a_manifest_written_before_the_typed_contract_is_read_and_reused(old_day):
    manifest = shards.read_manifest(old_day)
    assert (manifest.input_rows, manifest.total_rows, manifest.quarantined_rows) == (700, 698, 2)
    assert manifest.teacher.checkpoint_sha256 == "ab" * 32 and manifest.teacher.members[0].name == "teacher"
    assert manifest.hidden_dim is None and manifest.complete
    same = {"teacher_sha256": "ab" * 32, "label_fingerprint": "f" * 16, "inputs": OLD_MANIFEST["inputs"]}
    assert manifest.is_reusable(**same)
    assert not manifest.is_reusable(**same | {"teacher_sha256": "cd" * 32})  # a new teacher relabels
    assert not manifest.is_reusable(**same | {"label_fingerprint": "0" * 16})  # new label settings too
    assert not manifest.is_reusable(**same | {"inputs": {"2026-11-01": {"files": [], "rows": 700}}})


def test_the_manifest_round_trips_and_keeps_the_json_shape_other_tools_read(old_day, tmp_path):
    manifest = shards.read_manifest(old_day)
    shards.write_manifest(str(tmp_path), manifest)
    written = json.loads((tmp_path / shards.MANIFEST).read_text())
    assert written == OLD_MANIFEST | {"hidden_dim": None}  # the same keys and values, plus the hidden width
    assert shards.read_manifest(str(tmp_path)) == manifest
    assert shards.read_manifest(str(tmp_path / "missing")) is None  # no manifest: the day is incomplete


def test_a_day_whose_rows_do_not_add_up_is_never_reused(old_day):
    short = Manifest.from_dict(OLD_MANIFEST | {"shards": OLD_MANIFEST["shards"][:1]})
    assert short.total_rows + short.quarantined_rows == 502 != short.input_rows
    assert not short.complete
    assert not short.is_reusable(teacher_sha256="ab" * 32, label_fingerprint="f" * 16, inputs=OLD_MANIFEST["inputs"])


def test_build_manifest_counts_rows_from_footers_and_reads_the_hidden_width(tmp_path):
    paths = []
    for name, rows in (("a", 5), ("b", 3)):
        hidden = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(rows * 4, "float32")), 4)  # (rows, 4)
        table = pa.table({"clicked": [0] * rows, "teacher_logit": np.zeros(rows, "float32"), "teacher_hidden": hidden})
        pq.write_table(table, tmp_path / f"{name}.parquet")
        paths.append(str(tmp_path / f"{name}.parquet"))
    teacher = TeacherIdentity.from_dict(OLD_MANIFEST["teacher"])
    inputs = {"2026-11-01": {"files": [], "rows": 8}}
    manifest = shards.build_manifest(teacher=teacher, label_fingerprint="x", spec_hash="y", inputs=inputs,
                                     shard_files=paths)
    assert [s.rows for s in manifest.shards] == [5, 3] and manifest.complete
    assert manifest.columns == ("clicked", "teacher_logit", "teacher_hidden") and manifest.hidden_dim == 4


def test_a_shard_set_is_every_day_its_manifests_list(old_day):
    day1 = shards.read_manifest(old_day)
    day2 = Manifest.from_dict(OLD_MANIFEST | {"inputs": {"2026-11-02": {"files": [], "rows": 10}},
                                              "shards": [{"path": "c.parquet", "rows": 10}], "quarantine": []})
    both = ShardSet((day1, day2))
    assert (both.input_rows, both.total_rows, both.quarantined_rows) == (710, 708, 2)
    assert sorted(both.inputs) == ["2026-11-01", "2026-11-02"]
    assert [s.path for s in both.shards][-1] == "c.parquet" and both.shards[0] == FileRows(
        "/runs/demo/shards/date=2026-11-01/data/a.parquet", 500)


def test_a_quiet_first_day_does_not_hide_the_columns_of_the_days_after_it(tmp_path):
    """A flat log's day without rows has a manifest with no shards, so no columns of its own."""
    pq.write_table(pa.table({"clicked": [1, 0], "teacher_logit": np.zeros(2, "float32")}), tmp_path / "a.parquet")
    teacher = TeacherIdentity.from_dict(OLD_MANIFEST["teacher"])
    quiet, busy = (shards.build_manifest(teacher=teacher, label_fingerprint="x", spec_hash="y",
                                         inputs={day: {"files": [], "rows": rows}}, shard_files=files)
                   for day, rows, files in (("2026-11-01", 0, []), ("2026-11-02", 2, [str(tmp_path / "a.parquet")])))
    assert quiet.columns == () and quiet.complete
    assert ShardSet((quiet, busy)).columns == ("clicked", "teacher_logit") and ShardSet((quiet, busy)).total_rows == 2


@pytest.mark.parametrize("targets, columns", [
    (SoftLabelTargets(), ["teacher_logit"]),
    (SoftLabelTargets(task="multiclass"), ["teacher_logits"]),
    (SoftLabelTargets(task="multiclass", top_k=3, hint_dim=16),
     ["teacher_topk_indices", "teacher_topk_values", "teacher_hidden"]),
])
def test_targets_name_the_shard_columns_a_distilled_student_reads(targets, columns):
    assert targets.columns == columns


def test_collate_turns_a_shard_batch_into_the_tensors_the_loss_reads():
    layout = FeatureLayout(categorical=("user_id",), dense=("price",))
    batch = pa.table({"user_id": [7, 8], "price": [1.5, 2.5], "clicked": [1, 0], "session": [3, 3],
                      "teacher_topk_indices": pa.FixedSizeListArray.from_arrays(pa.array([0, 2, 1, 0], pa.int32()), 2),
                      "teacher_topk_values": pa.FixedSizeListArray.from_arrays(pa.array([2.0, 1.0, 0.5, 0.1]), 2)})
    tensors = ShardCollate(layout, "clicked", SoftLabelTargets(task="multiclass", top_k=2), "session",
                           task="multiclass")(batch)
    assert tensors["label"].dtype == torch.int64 and tensors["label"].tolist() == [1, 0]
    assert tensors["teacher_topk_indices"].tolist() == [[0, 2], [1, 0]]
    assert tensors["teacher_topk_values"].shape == (2, 2) and tensors["teacher_topk_values"].dtype == torch.float32
    assert tensors["group"].tolist() == [3, 3] and tensors["categorical"].tolist() == [[7], [8]]
    hard = ShardCollate(layout, "clicked", None, None)(batch)
    assert set(hard) == {"categorical", "dense", "label"} and hard["label"].dtype == torch.float32
