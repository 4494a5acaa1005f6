"""Nightly re-distillation on real Ray: incremental relabelling, the gate, the registry, idempotent reruns,
and the scheduler's catch-up and no-overlap rules with a fake clock."""

from __future__ import annotations

import copy
import datetime as dt
import os

import pytest
import yaml

from pipeline import registry, storage
from pipeline.nightly import cycle_path, run_cycle
from pipeline.spec import parse_spec
from tests.conftest import ROOT

NIGHT = [dt.date(2026, 11, d) for d in range(4, 10)]


def small_nightly(tmp) -> dict:
    raw = yaml.safe_load((ROOT / "jobs" / "nightly.yaml").read_text())
    raw["data"]["path"] = str(tmp / "clicks")
    raw["data"]["synthetic"].update(rows_per_day=3000, users=300, items=1000, categories=10, seq_len=5)
    raw["features"]["sequence"]["length"] = 5
    raw["teacher"].update(embedding_dim=8, hash_buckets=2000, hidden=[32])
    raw["student"].update(hash_buckets=1000, hidden=[16])
    raw["label"].update(batch_size=1024)
    raw["train"].update(batch_size=256, cpus_per_worker=0.5)
    raw["schedule"]["registry"] = str(tmp / "registry")
    raw["output"]["root"] = str(tmp / "runs")
    raw["export"] = {"serving_batches": [1], "serving_runs": 10}
    return raw


@pytest.fixture(scope="module")
def nights(ray_cluster, tmp_path_factory):
    """Runs the cycles once for the module, recording each night's record and state."""
    tmp = tmp_path_factory.mktemp("nightly")
    raw = small_nightly(tmp)
    spec = parse_spec(raw)
    out = {"spec": spec, "raw": raw, "tmp": tmp}
    out[1] = run_cycle(spec, NIGHT[0])
    # Touch one old partition (a late upsert, say): the next night relabels it beside its new day, nothing else.
    touched = next((tmp / "clicks" / "date=2026-11-03").glob("*.parquet"))
    os.utime(touched, (touched.stat().st_atime, touched.stat().st_mtime + 60))
    out[2] = run_cycle(spec, NIGHT[1])
    out["versions_after_night2"] = registry.list_versions(spec.schedule.registry, "nightly")
    shard_file = _shard_files(spec, "2026-11-02")[0]
    out["mtime_day2_after_night2"] = os.path.getmtime(shard_file)
    out["rerun"] = run_cycle(spec, NIGHT[1])
    out["versions_after_rerun"] = registry.list_versions(spec.schedule.registry, "nightly")
    # A deliberately worse challenger: a learning rate that cannot move the weights, no warm start.
    worse = copy.deepcopy(raw)
    worse["train"]["lr"] = 1e-12
    worse["schedule"]["warm_start"] = False
    # ... calibrated on a validation split, under an ECE bound no uncalibrated champion meets: the kept
    # champion is recalibrated (the night's one calibration cycle, the suite's time being short)
    worse["data"]["validation"] = {"fraction": 0.2}
    worse["eval"] = {"calibration": "platt"}
    worse["schedule"]["gate"]["max_ece"] = 1e-4
    out["champion_before_worse"] = registry.current(spec.schedule.registry, "nightly")
    out[3] = run_cycle(parse_spec(worse), NIGHT[2])
    # A new teacher invalidates every shard; that night's export runtime is also subtly wrong: its parity
    # fails, and nothing may be published (one cycle for both, the suite's time being short).
    import numpy as np

    import pipeline.stages.export as stage

    new_teacher = copy.deepcopy(raw)
    new_teacher["teacher"]["checkpoint"] = _random_teacher(spec, tmp)
    real = stage.exported_predictor
    out["champion_before_bad_export"] = registry.current(spec.schedule.registry, "nightly")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage, "exported_predictor", lambda exported, threads=1: (
            lambda arrays: real(exported, threads)(arrays) + np.float32(1e-3)))
        out[4] = run_cycle(parse_spec(new_teacher), NIGHT[3])
    return out


def _shard_files(spec, day: str) -> list[str]:
    return storage.list_files(storage.join(spec.nightly_dir, "shards", f"date={day}"))


def _random_teacher(spec, tmp) -> str:
    from pipeline.features import FeatureLayout
    from pipeline.models import ModelConfig, build_model, save_model

    layout = FeatureLayout.from_spec(spec.features)
    config = ModelConfig(model="dcn_v2", embedding_dim=4, hash_buckets=500, hidden=(8,), cross_layers=1)
    path = str(tmp / "other-teacher.pt")
    save_model(path, build_model(config, layout), config, layout)
    return path


pytestmark = [pytest.mark.ray, pytest.mark.e2e]


def test_first_night_labels_its_window_and_promotes(nights):
    first = nights[1]
    assert first["relabelled"] == ["2026-11-01", "2026-11-02", "2026-11-03"] and first["reused"] == []
    assert first["decision"] == "promoted" and first["champion_before"] is None
    assert first["challenger"]["auc"] > 0.55


def test_second_night_labels_only_the_new_day_and_a_touched_one(nights):
    second = nights[2]
    assert second["relabelled"] == ["2026-11-03", "2026-11-04"]  # 11-03's file changed since night one labelled it
    assert second["reused"] == ["2026-11-02"]
    assert second["champion"] is not None  # evaluated against the champion on the same day


def test_rerunning_a_night_changes_nothing(nights):
    spec = nights["spec"]
    assert nights["rerun"]["rerun"] is True and nights["rerun"]["version"] == nights[2]["version"]
    assert os.path.getmtime(_shard_files(spec, "2026-11-02")[0]) == nights["mtime_day2_after_night2"]
    assert nights["versions_after_rerun"] == nights["versions_after_night2"]  # no duplicate version


def test_worse_challenger_is_refused_and_the_drifted_champion_recalibrated(nights):
    worse, spec = nights[3], nights["spec"]
    root, champion = spec.schedule.registry, nights["champion_before_worse"]
    assert worse["decision"] in ("rejected", "recalibrated"), worse
    assert worse["version"] != worse["champion_after"] and registry.current(root, "nightly") == worse["champion_after"]
    assert worse["challenger_ece"] == worse["challenger"]["calibrated"]["calibration"]["ece"]  # as it would serve
    assert worse["champion_ece"] == worse["champion"]["calibration"]["ece"] > 1e-4  # uncalibrated until now
    recalibration = worse["recalibration"]
    assert recalibration["ece_before"] == worse["champion_ece"]
    assert 0.15 * 9000 < recalibration["fitted_on"]["rows"] < 0.25 * 9000  # the window's validation rows
    if worse["decision"] == "rejected":  # recalibrating did not help on the day: the champion stays as it is
        assert worse["champion_after"] == champion and "not better, champion kept" in worse["reason"]
        return
    recalibrated = worse["recalibrated_version"]
    assert worse["champion_after"] == recalibrated == f"{worse['version']}-recalibrated"
    assert recalibration["ece_after"] < recalibration["ece_before"]
    assert recalibration["log_loss_after"] <= recalibration["log_loss_before"]
    old, new = (registry.version_dir(root, "nightly", v) for v in (champion, recalibrated))
    assert storage.read_bytes(f"{new}/model.pt") == storage.read_bytes(f"{old}/model.pt")  # the same model
    from pipeline.serving import read_signature

    assert read_signature(f"{new}/onnx").calibration == recalibration["calibrator"]
    assert registry.export_problems(root, "nightly", recalibrated) == []
    assert "- Calibrated (platt: " in registry.card(root, "nightly", recalibrated)
    assert registry.history(root, "nightly")[-1]["reason"].startswith("recalibrated: champion")


def test_the_ece_gate_refuses_a_miscalibrated_challenger():
    from pipeline.nightly import gate, needs_recalibration

    def scored(auc: float, ece: float, calibrated_ece: float | None = None) -> dict:
        model = {"auc": auc, "calibration": {"ece": ece}}
        return model | ({"calibrated": {"calibration": {"ece": calibrated_ece}}} if calibrated_ece is not None else {})

    better_but_off = {"models": {"challenger": scored(0.72, 0.001, calibrated_ece=0.012),
                                 "champion": scored(0.70, 0.002)}}
    decision, reason = gate(better_but_off, "auc", 0.0, max_ece=0.005)
    assert decision == "rejected" and reason == "challenger ECE 0.0120 is above schedule.gate.max_ece 0.005"
    assert gate(better_but_off, "auc", 0.0)[0] == "promoted"  # no bound: the ranking decides
    assert gate({"models": {"challenger": scored(0.72, 0.03, calibrated_ece=0.004)}}, "auc", 0.0, 0.005)[0] == \
        "promoted"  # the calibrated ECE is what serves
    assert needs_recalibration(0.012, 0.005, "platt") and not needs_recalibration(0.004, 0.005, "platt")
    assert not needs_recalibration(0.012, 0.005, "none") and not needs_recalibration(0.012, None, "platt")


def test_new_teacher_relabels_everything(nights):
    fourth = nights[4]
    assert fourth["relabelled"] == ["2026-11-04", "2026-11-05", "2026-11-06"] and fourth["reused"] == []
    assert fourth["teacher_sha256"] != nights[3]["teacher_sha256"]


def test_cycle_records_and_registry_lineage(nights):
    spec = nights["spec"]
    record = storage.read_json(cycle_path(spec, NIGHT[1]))
    assert record["decision"] in {"promoted", "rejected"} and "reason" in record
    assert record["student"] == "student_distilled"  # no validation split: nothing to choose the hard one on
    shown = registry.show(spec.schedule.registry, "nightly", nights[1]["version"])
    assert shown["lineage"]["train_days"] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert shown["lineage"]["eval_day"] == "2026-11-04"
    assert shown["metrics"]["auc"] == pytest.approx(nights[1]["challenger"]["auc"])
    # each cycle is one MLflow run in the model's experiment (a rerun of a finished night logs none)
    from mlflow import MlflowClient

    from pipeline.tracking import local_store

    client = MlflowClient(tracking_uri=local_store(spec.output.root)[0])
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("nightly").experiment_id])}
    assert sorted(runs) == [night.isoformat() for night in NIGHT[:4]]
    third = runs[NIGHT[2].isoformat()].data
    assert third.tags["decision"] == nights[3]["decision"] and third.tags["registry_version"] == nights[3]["version"]
    assert third.metrics["challenger_ece"] == pytest.approx(nights[3]["challenger_ece"])
    assert third.metrics["challenger.auc"] == pytest.approx(nights[3]["challenger"]["auc"])


def test_each_version_ships_parity_checked_exports_and_a_model_card(nights, tmp_path, capsys):
    from pipeline.cli import main

    spec, version = nights["spec"], nights[1]["version"]
    directory = registry.version_dir(spec.schedule.registry, "nightly", version)
    for name in ("model.pt", "onnx/model.onnx", "onnx/signature.json", "torchscript/model.ts", "MODEL_CARD.md",
                 "parity.json"):
        assert storage.exists(storage.join(directory, name)), name
    parity = registry.show(spec.schedule.registry, "nightly", version)["parity"]
    assert parity["passed"] and parity["variants"]["onnx"]["max_abs_diff"] <= 1e-5
    assert parity["variants"]["onnx"]["rows"] == 3000  # the whole evaluation day
    assert registry.export_problems(spec.schedule.registry, "nightly", version) == []
    spec_file = tmp_path / "nightly.yaml"
    spec_file.write_text(yaml.safe_dump(nights["raw"]))
    assert main(["registry", str(spec_file), "show", version]) == 0
    card = capsys.readouterr().out
    for heading in (f"# nightly {version}", "## Inputs", "## Metrics on the evaluation days", "## Parity",
                    "## Latency", "## Size", "## Lineage"):
        assert heading in card, heading
    assert "| hist_item_ids | list<integer> | sequence |" in card and "Evaluated on: 2026-11-04" in card
    page = storage.join(spec.nightly_dir, "index.html")
    assert os.path.exists(page)  # each cycle refreshed it
    os.remove(page)
    assert main(["history", str(spec_file)]) == 0 and f"wrote {page}" in capsys.readouterr().out
    text = storage.read_bytes(page).decode()
    assert all(night.isoformat() in text for night in NIGHT[:4]) and text.count('src="data:image/png;base64,') == 3
    assert "recalibrated" in text or "not better, champion kept" in text  # night 3's decision is listed


def test_an_export_failing_parity_publishes_nothing(nights):
    bad, spec = nights[4], nights["spec"]
    assert bad["decision"] == "rejected" and "export parity failed, nothing published" in bad["reason"]
    assert "max |logit diff| 0.001" in bad["reason"]
    assert bad["version"] not in registry.list_versions(spec.schedule.registry, "nightly")
    assert bad["champion_after"] == nights["champion_before_bad_export"] == registry.current(
        spec.schedule.registry, "nightly")
