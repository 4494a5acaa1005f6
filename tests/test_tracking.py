"""MLflow tracking without Ray: a run's metrics logged to a real SQLite store and read back, trials as child
runs, an unreachable server (warned once, the local store instead; or an error with tracking.required),
credentials refused in the spec."""

from __future__ import annotations

import logging

import pytest
import yaml

from pipeline import tracking
from pipeline.errors import SpecError, UserError
from pipeline.spec import parse_spec
from tests.conftest import ROOT
from tests.test_report import run_metrics  # noqa: F401  (the fixture)

DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens


def spec_for(tmp_path, **tracking_section):
    raw = yaml.safe_load((ROOT / "jobs" / "tiny.yaml").read_text())
    raw["output"]["root"] = str(tmp_path / "runs")
    raw["tracking"] = {"enabled": True, **tracking_section}
    return parse_spec(raw)


def client_for(spec):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking.local_store(spec.output.root)[0])


def test_a_run_and_its_search_trials_are_logged_and_read_back(tmp_path, run_metrics):  # noqa: F811
    spec = spec_for(tmp_path)
    metrics = run_metrics()
    metrics["search"] = {"teacher": {"metric": "auc", "best": 1, "max_epochs": 2, "trials": [
        {"trial": 0, "config": {"lr": 0.03, "hidden": [8]}, "epochs": [{"auc": 0.61}], "finished": False,
         "stopped_early": True, "score": None, "error": None},
        {"trial": 1, "config": {"lr": 0.01, "hidden": [16]}, "epochs": [{"auc": 0.64}, {"auc": 0.66}],
         "finished": True, "stopped_early": False, "score": 0.66, "error": None}]}}
    run_id = tracking.log_run(spec, metrics)
    client = client_for(spec)
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.003" and run.data.params["teacher.0.hidden"] == "[64, 32]"
    assert run.data.metrics["eval.student_distilled.auc"] == pytest.approx(0.69)
    assert [m.step for m in client.get_metric_history(run_id, "distilled.step.lr")] == list(range(10))
    assert [m.value for m in client.get_metric_history(run_id, "distilled.epoch.soft_loss")] == pytest.approx(
        [0.1, 0.05])
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    outcomes = {c.data.tags["outcome"]: c for c in children}
    assert set(outcomes) == {"best", "stopped early"}
    assert outcomes["best"].data.params["lr"] == "0.01" and outcomes["best"].data.metrics["auc"] == 0.66
    assert [m.value for m in client.get_metric_history(outcomes["best"].info.run_id, "val_auc")] == [0.64, 0.66]


def test_an_unreachable_server_warns_once_and_logs_locally(tmp_path, run_metrics, caplog):  # noqa: F811
    spec = spec_for(tmp_path, uri=DEAD)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        first = tracking.log_run(spec, run_metrics())
        second = tracking.log_run(spec, run_metrics())
    warnings = [r.message for r in caplog.records if "cannot be reached" in r.message]
    assert len(warnings) == 1 and DEAD in warnings[0] and "local store" in warnings[0]
    assert {r.info.run_id for r in client_for(spec).search_runs(
        [client_for(spec).get_experiment_by_name("tiny").experiment_id])} == {first, second}


def test_a_required_server_that_is_unreachable_stops_the_run(tmp_path, run_metrics):  # noqa: F811
    with pytest.raises(UserError, match=r"tracking.uri http://127.0.0.1:9/x cannot be reached.*tracking.required: false"):
        tracking.log_run(spec_for(tmp_path / "required", uri=DEAD + "/x", required=True), run_metrics())


def test_tracking_off_logs_nothing_and_credentials_are_refused(tmp_path, run_metrics):  # noqa: F811
    spec = spec_for(tmp_path, enabled=False)
    assert tracking.log_run(spec, run_metrics()) is None
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    with pytest.raises(SpecError, match="tracking.uri: the URI holds a user name or password"):
        spec_for(tmp_path, uri="https://alice:s3cret@mlflow.example:5000")
    with pytest.raises(SpecError, match=r"\['token'\] look like credentials"):
        spec_for(tmp_path, token="abc")
