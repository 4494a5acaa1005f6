"""Distillation methods end to end on real Ray and DeepSpeed: a weighted teacher ensemble with a plug-in
student, listwise KD, an LR schedule and quarantined bad rows; a multiclass task with top-k soft labels
and a hint loss; and `data.on_bad_rows: fail` naming the file, row group and column."""

from __future__ import annotations

import datetime as dt
import glob
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline import shards, storage
from pipeline.errors import DataError
from pipeline.features import table_to_inputs
from pipeline.job import run_job
from pipeline.models import load_model
from pipeline.spec import parse_spec
from pipeline.stages.click_logs import generate
from pipeline.train.engine import lr_lambda
from tests.conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
# Planted in the first training day: (row, column, value, expected reason prefix).
BAD_ROWS = [(3, "clicked", 2, "clicked: 2"), (10, "clicked", None, "clicked: null"),
            (20, "price", float("inf"), "price: inf"), (30, "user_id", -4, "user_id: -4")]


def _shrunk(name: str, out, **overrides) -> dict:
    """A shipped job spec at test size, with data and outputs under `out`."""
    raw = yaml.safe_load((ROOT / "jobs" / f"{name}.yaml").read_text())
    raw["data"]["path"] = str(out / "clicks")
    raw["data"]["synthetic"] |= {"rows_per_day": 4000, "users": 300, "items": 1000, "categories": 10}
    raw["output"]["root"] = str(out / "runs")
    # One worker: a training call's fixed cost is less (test_job covers two workers under ZeRO 2)
    raw["train"] |= {"epochs": 1, "batch_size": 256, "num_workers": 1, "cpus_per_worker": 1, "zero_stage": 0}
    raw["label"] |= {"batch_size": 1024, "shard_rows": 2000}
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        raw[section] = value if not field else raw[section] | {field: value}
    return raw


def _plant_bad_rows(spec) -> int:
    """Rewrites the first training day with the BAD_ROWS values; returns the day's row count."""
    day_dir = f"{spec.data.path}/date={spec.data.train_days.start.isoformat()}"
    (path,) = glob.glob(f"{day_dir}/*.parquet")
    table = pq.read_table(path)
    for row, column, value, _ in BAD_ROWS:
        values = table.column(column).to_pylist()
        values[row] = value
        index = table.schema.get_field_index(column)
        table = table.set_column(index, column, pa.array(values, table.schema.field(column).type))
    pq.write_table(table, path)
    return table.num_rows


@pytest.fixture(scope="module")
def ensemble_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble")
    teachers = yaml.safe_load((ROOT / "jobs" / "ensemble.yaml").read_text())["teacher"]
    for teacher in teachers:
        teacher |= {"hash_buckets": 1000, "hidden": [32, 16], "embedding_dim": 8}
    raw = _shrunk("ensemble", out, teacher=teachers,
                  student={"model": "custom", "factory": "plugin_models:tiny_linear", "factory_args": {"width": 6}})
    raw["train"]["lr_schedule"]["warmup_steps"] = 4  # of about 16 steps at test size
    spec = parse_spec(raw)
    generate(spec)
    day_rows = _plant_bad_rows(spec)
    return spec, run_job(spec), day_rows


def _day_manifest(spec, day: dt.date) -> dict:
    return shards.read_manifest(storage.join(spec.run_dir, "shards", f"date={day.isoformat()}"))


def _shard_table(manifest: dict) -> pa.Table:
    return pa.concat_tables(pq.read_table(s.path) for s in manifest.shards)


def test_ensemble_manifest_lists_every_teacher_and_the_weighted_target(ensemble_run):
    spec, metrics, _ = ensemble_run
    manifest = _day_manifest(spec, spec.data.train_days.start)
    members = manifest.teacher.members
    assert [(m.name, m.model, m.weight) for m in members] == [("dcn", "dcn_v2", 2.0), ("deepfm", "deepfm", 1.0)]
    for member in members:
        assert member.checkpoint_sha256 == shards.file_sha256(member.checkpoint)
    assert manifest.teacher.combine == "weighted"
    table = _shard_table(manifest)
    dcn, deepfm = (table.column(f"teacher_logit__{n}").to_numpy() for n in ("dcn", "deepfm"))
    np.testing.assert_allclose(table.column("teacher_logit").to_numpy(), (2 * dcn + deepfm) / 3, rtol=1e-5, atol=1e-6)
    assert not np.allclose(dcn, deepfm)  # two different teachers, not one twice
    assert metrics["models"]["teacher"]["family"] == "ensemble"
    assert {"teacher_dcn", "teacher_deepfm", "student_distilled", "student_hard"} <= set(metrics["models"])


def test_bad_rows_are_quarantined_and_every_row_is_accounted_for(ensemble_run):
    spec, metrics, day_rows = ensemble_run
    manifest = _day_manifest(spec, spec.data.train_days.start)
    assert manifest.input_rows == day_rows
    assert manifest.quarantined_rows == len(BAD_ROWS)
    assert manifest.total_rows + manifest.quarantined_rows == manifest.input_rows
    quarantined = pa.concat_tables(pq.read_table(q.path) for q in manifest.quarantine)
    reasons = sorted(quarantined.column("reason").to_pylist())
    assert [r.split(" ")[0] + " " + r.split(" ")[1].rstrip(",") for r in reasons] == sorted(
        " ".join(expected.split(" ")[:2]) for *_, expected in BAD_ROWS)
    labelled_ids = set(_shard_table(manifest).column("event_id").to_pylist())
    bad_ids = set(quarantined.column("event_id").to_pylist())
    assert len(labelled_ids) == manifest.total_rows and not labelled_ids & bad_ids  # no duplicates, no overlap
    assert metrics["label"]["quarantined_rows"] == len(BAD_ROWS)


def test_listwise_and_schedule_are_trained_and_logged(ensemble_run):
    spec, metrics, _ = ensemble_run
    training = metrics["training"]["student_distilled"]
    assert training["history"][0]["listwise_loss"] > 0
    assert training["history"][0]["soft_loss"] > 0
    steps = training["steps"]
    total = math.ceil(metrics["label"]["total_rows"] / (spec.train.batch_size * spec.train.num_workers))
    schedule = lr_lambda(spec.train.lr_schedule, total)
    for step in steps:  # DeepSpeed steps the scheduler after each optimizer step
        assert step["lr"] == pytest.approx(spec.train.lr * schedule(step["step"]), rel=1e-6)
    assert max(s["lr"] for s in steps) > steps[-1]["lr"]  # warmed up, then decayed


def test_plugin_student_runs_on_the_workers(ensemble_run):
    _, metrics, _ = ensemble_run
    student = metrics["models"]["student_distilled"]
    assert student["family"] == "custom"
    model, config, _ = load_model(student["checkpoint"])
    assert config.factory == "plugin_models:tiny_linear" and type(model).__name__ == "TinyLinear"
    assert student["auc"] > 0.55  # it learned something


def test_report_matches_metrics(ensemble_run):
    spec, metrics, _ = ensemble_run
    on_disk = json.loads(storage.read_bytes(storage.join(spec.run_dir, "metrics.json")))
    report = storage.read_bytes(storage.join(spec.run_dir, "report.md")).decode()
    for name, model in on_disk["models"].items():
        assert f"{model['auc']:.4f}" in report, name
        assert model["latency"]["batch1_p50_ms"] > 0
        assert 0 <= model["calibration"]["ece"] < 1
    assert {s["value"] for s in on_disk["models"]["student_distilled"]["slices"]} <= {0, 1, 2}  # by device
    assert sum(s["rows"] for s in on_disk["models"]["student_distilled"]["slices"]) == on_disk["eval"]["rows"]
    assert -1 <= on_disk["models"]["student_distilled"]["agreement"]["pearson"] <= 1
    for plot in ("loss_curves.png", "calibration.png", "auc_bars.png"):
        assert storage.exists(storage.join(spec.run_dir, "plots", plot)), plot


@pytest.fixture(scope="module")
def multiclass_run(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("multiclass")
    raw = _shrunk("multiclass", out, teacher={"model": "dcn_v2", "embedding_dim": 8, "hash_buckets": 500,
                                              "hidden": [32, 16], "cross_layers": 1, "epochs": 1})
    raw["features"]["num_classes"] = 11  # categories 1..10 at test size
    raw["label"]["top_k"] = 4
    spec = parse_spec(raw)
    return spec, run_job(spec)


def test_topk_soft_labels_are_the_teachers_largest_logits(multiclass_run):
    spec, _ = multiclass_run
    manifest = _day_manifest(spec, spec.data.train_days.start)
    assert {"teacher_topk_indices", "teacher_topk_values", "teacher_hidden"} <= set(manifest.columns)
    assert "teacher_logits" not in manifest.columns  # only k of C are stored
    table = _shard_table(manifest).slice(0, 64)
    teacher, _, layout = load_model(manifest.teacher.checkpoint)
    with torch.inference_mode():
        logits, hidden = teacher.forward_with_hidden(table_to_inputs(table, layout))  # (64, 11), (64, H)
    indices = np.stack(table.column("teacher_topk_indices").to_pylist())  # (64, 4)
    values = np.stack(table.column("teacher_topk_values").to_pylist())
    assert indices.shape == (64, 4) and manifest.hidden_dim == hidden.shape[1]
    expected = torch.topk(logits, 4, dim=1).values.numpy()
    np.testing.assert_allclose(np.sort(values, axis=1), np.sort(expected, axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(logits.numpy(), indices, axis=1), values, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.stack(table.column("teacher_hidden").to_pylist()), hidden.numpy(),
                               rtol=1e-4, atol=1e-5)


def test_multiclass_students_train_with_hint_and_step_schedule(multiclass_run):
    spec, metrics = multiclass_run
    history = metrics["training"]["student_distilled"]["history"][0]
    assert history["hint_loss"] > 0 and history["soft_loss"] > 0
    assert metrics["training"]["student_hard"]["history"][0]["soft_loss"] is None
    for name in ("teacher", "student_distilled", "student_hard"):
        model = metrics["models"][name]
        assert 1 / 11 < model["accuracy"] <= 1 and model["log_loss"] > 0, (name, model)
    steps = metrics["training"]["student_distilled"]["steps"]
    gamma, size = spec.train.lr_schedule.gamma, spec.train.lr_schedule.step_size
    for step in steps:
        assert step["lr"] == pytest.approx(spec.train.lr * gamma ** (step["step"] // size), rel=1e-6)


def test_fail_policy_names_file_row_group_and_column(ray_cluster, tiny_spec_dict, tmp_path):
    from pipeline.features import FeatureLayout
    from pipeline.stages.label import run_label_stage
    from pipeline.models import ModelConfig, build_model, save_model

    tiny_spec_dict["data"]["synthetic"]["rows_per_day"] = 2000
    spec = parse_spec(tiny_spec_dict)
    generate(spec)
    _plant_bad_rows(spec)
    teacher = str(tmp_path / "teacher.pt")
    layout = FeatureLayout.from_spec(spec.features)
    config = ModelConfig.from_section(spec.teacher[0], spec.features.out_dim)
    save_model(teacher, build_model(config, layout), config, layout)
    shard_root = str(tmp_path / "shards")
    with pytest.raises(DataError, match=r"bad row in .*date=2026-11-01.*\.parquet, row group 0, row 3 of the group, "
                                        r"column 'clicked': clicked: 2") as info:
        run_label_stage(spec, teacher, shard_root)
    assert "data.on_bad_rows: quarantine" in str(info.value)
    assert shards.read_manifest(f"{shard_root}/date=2026-11-01") is None  # nothing half-done looks complete
