"""The shipped jobs for the real samples, end to end on real Ray and DeepSpeed, read as shipped: the Taobao CSV
with the `features:` section `distill inspect` proposes, the MovieLens flat log with time-derived days, and
Criteo's raw sample, a log without days, evaluated on held-out rows.

They are schema fixtures, not quality benchmarks (a few thousand rows at most), so the assertions are about
rows and the run's honesty, not about AUC floors: every row in is labelled or quarantined, and a teacher that
is no better than the hard-label student is named as such and not distilled into the recommendation."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import shards, storage
from pipeline.cli import main
from pipeline.data.split import evaluation_mask, validation_mask
from pipeline.job import run_job
from pipeline.serving import read_signature
from pipeline.spec import parse_spec
from tests.conftest import ROOT

SHARED = ROOT.parent / "shared" / "data"
pytestmark = [pytest.mark.ray, pytest.mark.e2e,
              pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared real samples are absent ({SHARED})")]


def _job(name: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(ROOT)  # the jobs' data paths are relative to the project root
    raw = yaml.safe_load((ROOT / "jobs" / f"{name}.yaml").read_text())
    raw["output"]["root"] = str(tmp_path / "runs")
    raw["train"]["epochs"] = raw["teacher"]["epochs"] = 1
    raw["export"] = {"formats": ["onnx"], "serving_batches": []}  # the artifact on real columns; no timing
    raw["tracking"] = {"enabled": False}  # tests/test_tracking.py reads MLflow back; here it is 3-4 s of set-up
    return raw


def _manifest(spec, day: str):
    return shards.read_manifest(storage.join(spec.run_dir, "shards", f"date={day}"))


def _honest_about_a_weak_teacher(metrics: dict) -> None:
    gate, summary = metrics["selection"]["gate"], metrics["summary"]
    if not gate["passed"]:  # warned, not stopped (on_weak_teacher: warn), and never the recommended student
        assert metrics["selection"]["recommended"] == "student_hard"
    for model in ("teacher", "student_distilled", "student_hard"):
        assert 0.0 <= metrics["models"][model]["auc"] <= 1.0
    if summary["gap_recovery"] is None:
        assert "not better than the hard-label student" in summary["gap_recovery_reason"]


def test_taobao_csv_runs_with_the_features_inspect_proposes(ray_cluster, tmp_path, monkeypatch, capsys):
    raw = _job("taobao", tmp_path, monkeypatch)
    assert main(["inspect", raw["data"]["partitions"][dt.date(2017, 5, 6)]]) == 0
    proposed = yaml.safe_load(capsys.readouterr().out)["features"]
    assert proposed["sequence"]["delimiter"] == "^"
    raw["features"] = proposed
    spec = parse_spec(raw)
    metrics = run_job(spec)
    manifest = _manifest(spec, "2017-05-06")
    assert manifest.input_rows == 100 and manifest.total_rows == 100 and manifest.quarantined_rows == 0
    table = pa.concat_tables(pq.read_table(s.path) for s in manifest.shards)
    for column in ("pid", "userid"):  # text ids arrive hashed, as the student and the exported model read them
        assert table.schema.field(column).type == pa.int64()
    assert metrics["eval"]["rows"] == 100 and metrics["eval"]["positives"] == 4
    _honest_about_a_weak_teacher(metrics)
    # the exported student reads the log as shipped: text ids hashed outside its graph, as the signature says
    exported = metrics["export"]["models"][metrics["selection"]["recommended"]]["onnx"]
    assert exported["parity"]["passed"] and exported["parity"]["rows"] == 100
    kinds = read_signature(exported["dir"]).raw_columns
    assert kinds["pid"] == kinds["userid"] == "text"
    out = tmp_path / "scored.parquet"
    assert main(["score", exported["dir"], raw["data"]["partitions"][dt.date(2017, 5, 7)], "--out", str(out),
                 "--delimiter", raw["data"].get("csv", {}).get("delimiter") or ","]) == 0
    assert pq.read_table(out).num_rows == 100


def test_movielens_flat_log_runs_on_days_from_its_timestamp(ray_cluster, tmp_path, monkeypatch):
    raw = _job("movielens", tmp_path, monkeypatch)
    # 2017-05-10 has no ratings: a quiet first day, whose manifest lists no shards, must not hide the others'.
    raw["data"] |= {"train_days": {"start": "2017-05-10", "end": "2017-05-14"},
                    "eval_days": {"start": "2017-05-15", "end": "2017-05-31"}, "validation": {"days": 2}}
    spec = parse_spec(raw)
    metrics = run_job(spec)
    ratings = pq.read_table(SHARED / "movielens" / "ml_latest_small_ratings.parquet", columns=["timestamp", "rating"])
    days = np.array([dt.datetime.fromtimestamp(t, dt.timezone.utc).date() for t in ratings.column("timestamp").to_pylist()])
    assert _manifest(spec, "2017-05-10").input_rows == 0
    for day in spec.data.fit_days():
        assert _manifest(spec, day.isoformat()).input_rows == int((days == day).sum())
    in_eval = (days >= dt.date(2017, 5, 15)) & (days <= dt.date(2017, 5, 31))
    assert metrics["eval"]["rows"] == int(in_eval.sum())
    assert metrics["eval"]["positives"] == int((ratings.column("rating").to_numpy()[in_eval] >= 4).sum())
    _honest_about_a_weak_teacher(metrics)


def _ids(dataset) -> list[int]:
    return pa.concat_tables(list(dataset.iter_batches(batch_format="pyarrow", batch_size=None))).column("Id").to_pylist()


def test_criteo_raw_log_without_days_is_evaluated_on_held_out_rows(ray_cluster, tmp_path, monkeypatch):
    from pipeline.stages.click_logs import read_evaluation, split_side
    from pipeline.stages.students import read_shards

    spec = parse_spec(_job("criteo-raw", tmp_path, monkeypatch))
    metrics = run_job(spec)
    # The sides, computed here from the file with the split functions alone (no Ray, no pipeline read).
    log = pq.read_table(SHARED / "criteo" / "criteo_raw_tiny.parquet", columns=["Id", "Label"])
    ids, clicks = log.column("Id").to_numpy(), log.column("Label").to_numpy()
    evaluation = evaluation_mask(log.column("Id"), 0.2)
    validation = validation_mask(log.column("Id"), 0.15) & ~evaluation
    held_out = set(ids[evaluation].tolist())
    assert len(held_out) == 403 and int(validation.sum()) == 280 and log.num_rows == 1_999

    # Evaluation scored exactly the evaluation rows, and says they are held-out rows of the one day.
    assert metrics["eval"]["rows"] == 403 and metrics["eval"]["positives"] == int(clicks[evaluation].sum()) == 86
    assert metrics["eval"]["held_out"] == {"by": "rows", "fraction": 0.2, "key": "Id"}
    evaluated = _ids(read_evaluation(spec, ["Id"]))  # the read the evaluation stage scores
    assert len(evaluated) == 403 and set(evaluated) == held_out
    report = (tmp_path / "runs" / "criteo-raw" / "report.md").read_text()
    assert "held-out rows, not held-out days: the 20% of the rows whose `Id` hashes" in report
    assert "- On the evaluation rows, which took no part in the choice," in report

    # Every row was labelled once; the students' read of the soft labels holds no evaluation row.
    manifest = _manifest(spec, "2026-01-01")
    assert manifest.input_rows == manifest.total_rows == 1_999 and manifest.quarantined_rows == 0
    trained_on = _ids(split_side(read_shards(shards.ShardSet((manifest,)), ["Id"]), spec, "train"))
    assert len(trained_on) == 1_316 and not set(trained_on) & held_out
    # Every model trained on the training rows and validated on the validation rows, nothing else.
    for role in ("teacher", "student_hard", "student_distilled"):
        epoch = metrics["training"][role]["history"][-1]
        assert (epoch["rows"], epoch["val_rows"]) == (1_316, 280)
        assert epoch["rows"] + epoch["val_rows"] + metrics["eval"]["rows"] == 1_999  # no bad rows in this file
    assert metrics["selection"]["gate"]["rows"] == 280
    for model in ("teacher", "student_distilled", "student_hard"):
        assert np.isfinite(metrics["models"][model]["auc"])
    assert metrics["selection"]["recommended"] in ("student_distilled", "student_hard")
    _honest_about_a_weak_teacher(metrics)
    # The exported student was checked on the evaluation rows too, and fills and flags missing counts itself.
    exported = metrics["export"]["models"][metrics["selection"]["recommended"]]["onnx"]
    assert exported["parity"]["passed"] and exported["parity"]["rows"] == 403
    layout = read_signature(exported["dir"]).feature_layout
    assert layout.missing_indicators and len(layout.dense) == 13
