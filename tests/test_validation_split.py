"""The validation split, early stopping and the teacher gate: spec rules, the row hash, the recommendation
(fast), and on real Ray: the best epoch restored, a weak teacher refused before labelling."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.data.split import RowSplit, validation_mask
from pipeline.errors import SpecError
from pipeline.spec import parse_spec
from pipeline.stages.scoring import recommend


@pytest.fixture
def raw(tiny_spec_dict) -> dict:
    return copy.deepcopy(tiny_spec_dict)


@pytest.mark.parametrize("validation, message", [
    ({"days": 2}, "would leave no training data"),  # tiny.yaml trains on 2 days
    ({"days": 1, "fraction": 0.1}, "exactly one of them"),
    ({}, "exactly one of them"),
    ({"fraction": 1.5}, "fraction"),
    ({"days": 1, "by": "user_id"}, "remove it with validation.days"),
    ({"daze": 1}, "unknown key"),
])
def test_a_validation_split_is_refused_naming_the_field(raw, validation, message):
    raw["data"]["validation"] = validation
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_early_stopping_needs_a_split_and_a_metric_of_the_task(raw):
    raw["train"]["early_stopping"] = {"metric": "auc"}
    with pytest.raises(SpecError, match="add data.validation"):
        parse_spec(raw)
    raw["data"]["validation"] = {"days": 1}
    raw["train"]["early_stopping"] = {"metric": "accuracy"}
    with pytest.raises(SpecError, match="'accuracy' does not exist for task 'binary'"):
        parse_spec(raw)
    raw["train"]["early_stopping"] = {"metric": "recall"}
    with pytest.raises(SpecError, match=r"train.early_stopping.metric"):
        parse_spec(raw)


def test_min_teacher_lift_below_zero_is_refused(raw):
    raw["distill"] = {"min_teacher_lift": -0.01}
    with pytest.raises(SpecError, match="distill.min_teacher_lift"):
        parse_spec(raw)


def test_the_split_days_are_held_out_of_fitting(raw):
    raw["data"]["validation"] = {"days": 1}
    spec = parse_spec(raw)
    assert spec.data.fit_days() == spec.data.train_days.days()[:1]
    assert spec.data.validation_days() == spec.data.train_days.days()[1:]
    raw["data"]["validation"] = {"fraction": 0.2}
    spec = parse_spec(raw)
    assert spec.data.fit_days() == spec.data.validation_days() == spec.data.train_days.days()
    assert spec.validation_key == spec.features.id  # rows at random, as the evaluation days meet the same users
    raw["data"]["validation"] = {"fraction": 0.2, "by": "user_id"}
    assert parse_spec(raw).validation_key == "user_id"  # or whole users held out


def test_the_row_split_is_stable_and_keeps_each_key_on_one_side():
    keys = pa.array(np.arange(20_000) % 5_000)  # 4 rows per key
    mask = validation_mask(keys, 0.2)
    assert 0.18 < mask.mean() < 0.22
    assert np.array_equal(mask, validation_mask(pa.chunked_array([keys.slice(0, 7), keys.slice(7)]), 0.2))
    by_key = {k: set(mask[keys.to_numpy() == k]) for k in range(50)}
    assert all(len(sides) == 1 for sides in by_key.values())
    pinned = [True, False, False, False, False, True, False, False, False, False]  # pandas' hash_array of 0..9
    assert validation_mask(pa.array(np.arange(10)), 0.5).tolist() == pinned
    table = pa.table({"k": keys, "x": np.arange(20_000)})
    split = RowSplit(validation_key="k", validation_fraction=0.2)
    train, held = split.keep(table, "train"), split.keep(table, "validation")
    assert train.num_rows + held.num_rows == 20_000  # every row on exactly one side
    assert not set(train.column("x").to_pylist()) & set(held.column("x").to_pylist())


def test_the_gate_reads_recorded_scores_only_for_a_teacher_this_run_trained(raw, tmp_path):
    """A trained (or searched) teacher's and the baseline's kept-epoch scores come from their training records;
    a given checkpoint or an ensemble is scored afresh (None here), as is a record without positives."""
    from pipeline import storage
    from pipeline.stages.gate import recorded_scores

    raw["data"]["validation"] = {"fraction": 0.2}
    raw["output"]["root"] = str(tmp_path / "runs")
    spec = parse_spec(raw)
    models = Path(spec.run_dir, "models")
    epoch = {"val_auc": 0.7, "val_log_loss": 0.3, "val_rows": 500, "val_positives": 40}
    for role, auc in (("teacher", 0.71), ("student_hard", 0.69)):
        storage.atomic_write_json(str(models / f"{role}.json"), {"fingerprint": "x", "steps": [], "restarts": 0,
                                  "best_epoch": 2, "history": [epoch | {"val_auc": 0.5}, epoch | {"val_auc": auc}]})
    paths = {"teacher": str(models / "teacher.pt")}
    scores = recorded_scores(spec, paths, str(models / "student_hard.pt"))
    assert scores == {"teacher": {"auc": 0.71, "log_loss": 0.3, "rows": 500, "positives": 40, "epoch": 2},
                      "student_hard": {"auc": 0.69, "log_loss": 0.3, "rows": 500, "positives": 40, "epoch": 2}}
    given = parse_spec(raw | {"teacher": raw["teacher"] | {"checkpoint": str(tmp_path / "t.pt")}})
    assert recorded_scores(given, {"teacher": str(tmp_path / "t.pt")}, str(models / "student_hard.pt")) is None
    storage.atomic_write_json(str(models / "student_hard.json"), {"fingerprint": "x", "steps": [], "restarts": 0,
                              "best_epoch": 1, "history": [{k: v for k, v in epoch.items() if k != "val_positives"}]})
    assert recorded_scores(spec, paths, str(models / "student_hard.pt")) is None  # a record from before positives


def test_the_recommendation_is_the_hard_label_student_when_distillation_loses():
    lost = recommend({"student_distilled": {"auc": 0.701}, "student_hard": {"auc": 0.704}}, "auc")
    assert lost["recommended"] == "student_hard" and not lost["distillation_helped"]
    assert lost["reason"] == "distillation did not help on validation: auc 0.7010 distilled vs 0.7040 hard-label"
    tie = recommend({"student_distilled": {"auc": 0.7}, "student_hard": {"auc": 0.7}}, "auc")
    assert tie["recommended"] == "student_hard"  # no gain: ship the simpler model
    won = recommend({"student_distilled": {"accuracy": 0.61}, "student_hard": {"accuracy": 0.6}}, "accuracy")
    assert won["recommended"] == "student_distilled" and won["distillation_helped"]


@pytest.mark.ray
def test_early_stopping_keeps_the_best_epoch_on_an_overfitting_teacher(ray_cluster, tiny_spec_dict, click_logs):
    """A big teacher at a high learning rate on a few hundred rows overfits after an epoch or two: training
    stops `patience` epochs after the best, and the exported weights are the best epoch's, exactly."""
    import torch

    from pipeline import metrics
    from pipeline.features import table_to_inputs
    from pipeline.models import load_model
    from pipeline.stages.teacher import ensure_teacher

    tiny_spec_dict["data"].update(path=click_logs(days=3, rows=600), validation={"days": 1},
                                  train_days={"start": "2026-11-01", "end": "2026-11-02"},
                                  eval_days={"start": "2026-11-03", "end": "2026-11-03"})
    tiny_spec_dict["teacher"].update(embedding_dim=32, hash_buckets=5000, hidden=[64], epochs=8, lr=0.05)
    tiny_spec_dict["train"].update(num_workers=1, cpus_per_worker=1, batch_size=64, zero_stage=0,
                                   early_stopping={"metric": "log_loss", "patience": 2})
    spec = parse_spec(tiny_spec_dict)

    path = ensure_teacher(spec)

    record = json.loads(Path(spec.run_dir, "models", "teacher.json").read_text())
    losses = [entry["val_log_loss"] for entry in record["history"]]
    best = int(np.argmin(losses)) + 1
    assert record["best_epoch"] == best
    assert len(losses) == best + 2 < 8  # stopped 2 epochs after the best, well before the maximum
    assert all(entry["val_rows"] == 600 for entry in record["history"])  # the held-out day, every row
    model, _, layout = load_model(path)
    day = pads.dataset(f"{spec.data.path}/date=2026-11-02", format="parquet").to_table()
    with torch.no_grad():
        logits = model(table_to_inputs(day, layout)).numpy()
    assert metrics.log_loss(day.column("clicked").to_numpy(), logits) == pytest.approx(losses[best - 1], abs=1e-5)


@pytest.mark.e2e
def test_the_gate_refuses_a_weak_teacher_before_labelling(ray_cluster, tiny_spec_dict, click_logs, tmp_path,
                                                          capsys):
    """An untrained teacher (random weights) against a trained hard-label student: exit 1, both numbers in
    the message, nothing labelled."""
    from pipeline.cli import main
    from pipeline.features import FeatureLayout
    from pipeline.models import ModelConfig, build_model, save_model

    tiny_spec_dict["data"].update(path=click_logs(days=3, rows=1500), validation={"days": 1},
                                  train_days={"start": "2026-11-01", "end": "2026-11-02"},
                                  eval_days={"start": "2026-11-03", "end": "2026-11-03"})
    spec = parse_spec(tiny_spec_dict)
    config = ModelConfig.from_section(spec.teacher[0])
    teacher = str(tmp_path / "untrained.pt")
    save_model(teacher, build_model(config, FeatureLayout.from_spec(spec.features)), config,
               FeatureLayout.from_spec(spec.features))
    tiny_spec_dict["teacher"]["checkpoint"] = teacher
    tiny_spec_dict["distill"] = {"min_teacher_lift": 0.05}
    spec_path = tmp_path / "weak.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec_dict))

    assert main(["run", str(spec_path)]) == 1

    err = capsys.readouterr().err
    assert "error: teacher gate: the teacher is too weak: validation auc teacher 0." in err
    assert "vs hard-label student 0." in err and "(distill.min_teacher_lift 0.0500)" in err
    assert "Traceback" not in err
    assert not Path(spec.run_dir, "shards").exists()  # refused before the label stage
    assert Path(spec.run_dir, "models", "student_hard.pt").exists()  # the baseline it was compared with


@pytest.mark.e2e
def test_a_run_with_a_row_split_fits_on_one_side_and_chooses_on_the_other(ray_cluster, tiny_spec_dict):
    """tiny.yaml with a quarter of the rows held out by a hash of the row id: the teacher, the hard-label
    baseline and the distillation candidates fit on exactly the same rows, every epoch is scored on the other
    quarter, the gate, the candidate and the recommendation are decided there, and the report says what was
    chosen. The teacher and the hard-label student train in one call, the candidates in another."""
    from pipeline.job import run_job

    tiny_spec_dict["data"]["validation"] = {"fraction": 0.25}
    tiny_spec_dict["distill"] |= {"min_teacher_lift": 0.0, "on_weak_teacher": "warn",  # judged, never stopped
                                  "search": {"soft_loss": ["mse", "kd"], "alpha": [0.3], "temperature": [2.0]}}
    tiny_spec_dict["teacher"]["epochs"] = 1
    tiny_spec_dict["train"] |= {"epochs": 1, "num_workers": 1, "cpus_per_worker": 1, "zero_stage": 0}  # test_job: 2
    tiny_spec_dict["eval"] = {"calibration": "platt"}
    spec = parse_spec(tiny_spec_dict)

    metrics = run_job(spec)

    selection, training = metrics["selection"], metrics["training"]
    held_out = selection["gate"]["rows"]
    assert 0.22 * 16_000 < held_out < 0.28 * 16_000 and selection["scores"]["student_hard"]["rows"] == held_out
    candidates = {c["role"]: c for c in selection["candidates"]}
    assert sorted(candidates) == ["student_distilled-kd-a0.3-t2", "student_distilled-mse-a0.3"]
    best = max(candidates, key=lambda role: candidates[role]["auc"])
    assert [role for role, c in candidates.items() if c["chosen"]] == [best]
    assert metrics["models"]["student_distilled"]["checkpoint"].endswith(f"/models/{best}.pt")
    assert selection["scores"]["student_distilled"]["auc"] == candidates[best]["auc"]
    fitted = {role: training[role]["history"][0]["rows"] for role in ("teacher", "student_hard", *candidates)}
    assert set(fitted.values()) == {16_000 - held_out}, fitted  # one split for every model: no row on both sides
    calls = sorted(p.name.split("-")[0] for p in Path(spec.run_dir, "train").iterdir())
    assert calls == ["student_distilled", "teacher+student_hard"], calls  # two training calls in all
    assert all(e["val_rows"] == held_out and 0 <= e["val_auc"] <= 1 for e in training["teacher"]["history"])
    # The gate read the scores the training workers computed for the kept epochs (no second scoring pass).
    kept = {role: training[role]["history"][training[role]["best_epoch"] - 1] for role in ("teacher", "student_hard")}
    gate = selection["gate"]
    assert (gate["teacher"], gate["hard"]) == (kept["teacher"]["val_auc"], kept["student_hard"]["val_auc"])
    assert gate["positives"] == kept["student_hard"]["val_positives"] > 0
    assert metrics["label"]["total_rows"] == 16_000  # a row split labels every row; training skips the held-out
    assert selection["recommended"] in ("student_distilled", "student_hard")
    report = Path(spec.run_dir, "report.md").read_text()
    assert "## Chosen on validation" in report and f"Recommended student: **{selection['recommended']}**" in report
    _calibrated_on_validation_and_exported(spec, metrics, held_out, report)


def _calibrated_on_validation_and_exported(spec, metrics, held_out: int, report: str) -> None:
    """Each model's Platt calibrator is fitted on the held-out quarter, and the exported student serves the
    calibrated logit the evaluation scored."""
    from pipeline.cli import main
    from pipeline.metrics import log_loss
    from pipeline.serving import read_signature

    for name in ("teacher", "student_distilled", "student_hard"):
        calibrated = metrics["models"][name]["calibrated"]
        assert calibrated["calibrator"]["fitted_on"]["rows"] == held_out and calibrated["method"] == "platt"
        assert calibrated["auc"] == pytest.approx(metrics["models"][name]["auc"], abs=1e-9)  # monotone
        assert 0 <= calibrated["calibration_quantile"]["ece"] < 1
    assert "## Calibration (fitted on validation" in report
    name = metrics["selection"]["recommended"]
    onnx = metrics["export"]["models"][name]["onnx"]
    assert onnx["parity"]["passed"]
    assert read_signature(onnx["dir"]).calibration == metrics["models"][name]["calibrated"]["calibrator"]
    out = Path(spec.run_dir) / "scored.parquet"
    assert main(["score", onnx["dir"], f"{spec.data.path}/date={spec.data.eval_days.start}", "--out", str(out)]) == 0
    scored = pq.read_table(out)
    served = log_loss(scored.column("clicked").to_numpy(), scored.column("logit").to_numpy().astype(np.float64))
    assert served == pytest.approx(metrics["models"][name]["calibrated"]["log_loss"], abs=1e-5)
