"""The whole job end to end on real Ray, DeepSpeed (2 workers, ZeRO 2) and Parquet, plus CLI behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import shards, storage
from pipeline.cli import main
from pipeline.job import run_job
from pipeline.spec import parse_spec
from tests.conftest import ROOT
from tests.test_report import strict_json


@pytest.fixture(scope="module")
def finished_run(ray_cluster, tmp_path_factory):
    """jobs/tiny.yaml run once for the module: (spec, metrics)."""
    raw = yaml.safe_load((ROOT / "jobs" / "tiny.yaml").read_text())
    out = tmp_path_factory.mktemp("tiny")
    raw["data"]["path"] = str(out / "clicks")
    raw["output"]["root"] = str(out / "runs")
    raw["export"] = {"formats": ["onnx", "torchscript"], "quantize": ["int8"], "serving_batches": [1, 512],
                     "serving_runs": 20}  # every export, and a short serving table
    raw["tracking"] = {"enabled": True}  # the default store: <output.root>/mlflow.db
    spec = parse_spec(raw)
    return spec, run_job(spec)


@pytest.mark.e2e
def test_rows_in_equal_soft_labels_out(finished_run):
    spec, metrics = finished_run
    days = [d.isoformat() for d in spec.data.train_days.days()]
    manifest = shards.ShardSet(tuple(shards.read_manifest(storage.join(spec.run_dir, "shards", f"date={d}"))
                                     for d in days))
    assert manifest.input_rows == manifest.total_rows == 2 * spec.data.synthetic.rows_per_day
    assert metrics["label"]["total_rows"] == manifest.total_rows
    assert manifest.teacher.checkpoint_sha256 == shards.file_sha256(metrics["models"]["teacher"]["checkpoint"])


@pytest.mark.e2e
def test_distilled_student_learns_and_is_smaller(finished_run):
    spec, metrics = finished_run
    models = metrics["models"]
    assert metrics["eval"]["rows"] == spec.data.synthetic.rows_per_day
    assert models["student_distilled"]["auc"] > 0.58, models  # random is 0.5
    assert models["teacher"]["auc"] > 0.58, models
    assert models["student_hard"]["auc"] > 0.55, models
    assert 0.75 < metrics["eval"]["ceiling_auc"] < 0.85
    assert models["student_distilled"]["params"]["total"] * 4 < models["teacher"]["params"]["total"]
    assert models["student_distilled"]["params"] == models["student_hard"]["params"]  # same architecture


@pytest.mark.e2e
def test_the_recommended_student_leaves_as_a_parity_checked_artifact(finished_run, tmp_path):
    spec, metrics = finished_run
    export, name = metrics["export"], metrics["selection"]["recommended"]
    assert export["recommended"] == name and set(export["models"]) == {name, "teacher"}
    for variant in ("onnx", "torchscript"):
        parity = export["models"][name][variant]["parity"]
        assert parity["passed"] and parity["rows"] == spec.data.synthetic.rows_per_day  # every eval row (< 10,000)
        assert parity["max_scaled_diff"] <= 1e-5 and parity["auc_abs_diff"] <= 1e-6
    int8 = export["models"][name]["onnx-int8"]
    assert int8["kept"] and int8["parity"]["auc_loss"] <= 0.0005, int8["parity"]  # a trained student
    assert int8["bytes"] < export["models"][name]["onnx"]["bytes"]
    serving = export["serving"]["models"]
    assert set(serving) == {name, "teacher"} and set(serving[name]) == {"eager", "torchscript", "onnxruntime",
                                                                         "onnxruntime-int8"}
    assert serving[name]["onnxruntime"]["512"]["rows_per_s"] > 0 and export["serving"]["ratios"]["student"] == name
    # what the artifact scores is what was evaluated: the same AUC on the eval day, through `distill score`
    out = tmp_path / "scored.parquet"
    day = f"{spec.data.path}/date={spec.data.eval_days.start.isoformat()}"
    assert main(["score", export["models"][name]["onnx"]["dir"], day, "--out", str(out)]) == 0
    import pyarrow.parquet as pq

    from pipeline.metrics import auc

    scored = pq.read_table(out)
    assert scored.num_rows == metrics["eval"]["rows"]
    assert auc(scored.column("clicked").to_numpy(), scored.column("logit").to_numpy()) == pytest.approx(
        metrics["models"][name]["auc"], abs=1e-6)
    report = storage.read_bytes(storage.join(spec.run_dir, "report.md")).decode()
    assert "## Serving artifact" in report and f"| {name} | onnxruntime |" in report
    card = storage.read_bytes(storage.join(spec.run_dir, "export", name, "MODEL_CARD.md")).decode()
    assert "## Inputs" in card and "## Latency" in card and spec.data.eval_days.start.isoformat() in card


@pytest.mark.e2e
def test_outputs_written_and_consistent(finished_run):
    spec, metrics = finished_run
    on_disk = strict_json(storage.read_bytes(storage.join(spec.run_dir, "metrics.json")).decode())  # no NaN
    assert on_disk["models"]["student_distilled"]["auc"] == metrics["models"]["student_distilled"]["auc"]
    report = storage.read_bytes(storage.join(spec.run_dir, "report.md")).decode()
    assert f"{metrics['models']['teacher']['auc']:.4f}" in report
    for role in ("teacher", "student_distilled", "student_hard"):
        record = storage.read_json(storage.join(spec.run_dir, "models", f"{role}.json"))
        assert [e["epoch"] for e in record["history"]] == [1, 2]
        assert all(e["rows"] == 2 * spec.data.synthetic.rows_per_day for e in record["history"])
        for epoch in record["history"]:  # where the epoch went: start-up wait within all waits within the loop
            assert 0 < epoch["first_batch_seconds"] <= epoch["input_wait_seconds"] < epoch["seconds"]
            assert 0 < epoch["loop_cpu_seconds"] < epoch["seconds"] + 0.1  # one thread's CPU time fits its wall time


@pytest.mark.e2e
def test_rerun_reuses_every_finished_stage(finished_run, capsys):
    spec, metrics = finished_run
    before = {r: storage.filesystem(p)[0].modified(p) for r, p in
              ((r, storage.join(spec.run_dir, "models", f"{r}.pt")) for r in metrics["models"])}
    again = run_job(spec)
    assert again["label"]["status"] == "reused"
    assert {r: storage.filesystem(p)[0].modified(p) for r, p in
            ((r, storage.join(spec.run_dir, "models", f"{r}.pt")) for r in metrics["models"])} == before
    assert again["models"]["student_distilled"]["auc"] == pytest.approx(metrics["models"]["student_distilled"]["auc"])


@pytest.mark.e2e
def test_the_console_shows_stage_lines_and_the_table_and_ray_goes_to_a_log(finished_run, tmp_path, capfd):
    """`distill run` on the finished run (every stage reused, but the evaluation and export run again, with
    Ray Data's progress output): a line per stage start and end, the final table, nothing of Ray's."""
    spec, _ = finished_run
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    capfd.readouterr()
    assert main(["run", str(path)]) == 0
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) <= 30, "\n".join(lines)
    assert [line for line in lines if line.startswith("[stage ")][::2] == [
        line for line in lines if line.startswith("[stage ") and "done" not in line]  # start, end, start, end, ...
    assert any(line.startswith("[stage 5/6] done: 8,000 rows in ") and "rows/s" in line for line in lines), lines
    for noise in ("Parquet dataset sampling", "logging_progress", "Running Dataset", "Token authentication",
                  "core_worker", "Traceback"):
        assert noise not in out + err, noise
    assert "| student_distilled | mlp |" in out
    assert (Path(spec.run_dir) / "logs" / "stderr.log").exists()  # where Ray's lines go (tests/test_console.py)


@pytest.mark.e2e
def test_the_run_is_tracked_in_mlflow(finished_run):
    """Read back through MlflowClient: the resolved spec as params, per-step and per-epoch training metrics
    with their steps, each model's evaluation, the tags, and the report and exported student as artifacts."""
    from mlflow import MlflowClient

    from pipeline.tracking import local_store

    spec, metrics = finished_run
    client = MlflowClient(tracking_uri=local_store(spec.output.root)[0])
    experiment = client.get_experiment_by_name("tiny")
    run = min(client.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time)  # the fixture's
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    params, tags, logged = run.data.params, run.data.tags, run.data.metrics
    assert params["train.lr"] == "0.003" and params["student.model"] == "mlp" and params["teacher.0.model"] == "dcn_v2"
    assert tags["teacher_sha256"] == metrics["label"]["teacher_sha256"] and tags["eval_days"] == "2026-11-03"
    for name in ("teacher", "student_distilled", "student_hard"):
        assert logged[f"eval.{name}.auc"] == pytest.approx(metrics["models"][name]["auc"])
        assert logged[f"eval.{name}.ece"] == pytest.approx(metrics["models"][name]["calibration"]["ece"])
    epochs = client.get_metric_history(run.info.run_id, "teacher.epoch.loss")
    assert [m.step for m in epochs] == [1, 2]
    assert [m.value for m in epochs] == pytest.approx([e["loss"] for e in metrics["training"]["teacher"]["history"]])
    steps = client.get_metric_history(run.info.run_id, "student_distilled.step.lr")
    assert len(steps) == len(metrics["training"]["student_distilled"]["steps"]) > 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.html", "metrics.json", "plots", "export"} <= artifacts, artifacts
    recommended = metrics["selection"]["recommended"]
    exported = {a.path for a in client.list_artifacts(run.info.run_id, f"export/{recommended}/onnx")}
    assert f"export/{recommended}/onnx/model.onnx" in exported


@pytest.mark.e2e
def test_report_command_rebuilds_report(finished_run, capsys):
    spec, _ = finished_run
    written = storage.read_bytes(storage.join(spec.run_dir, "report.md"))
    assert main(["report", spec.run_dir]) == 0
    out = capsys.readouterr().out
    assert "recovery" in out and "| student_distilled | mlp |" in out
    assert storage.read_bytes(storage.join(spec.run_dir, "report.md")) == written  # byte for byte what run wrote
    page = storage.read_bytes(storage.join(spec.run_dir, "report.html")).decode()
    assert "<td>student_distilled</td>" in page and page.count('src="data:image/png;base64,') >= 3


def test_cli_missing_data_exits_2_without_traceback(tmp_path, tiny_spec_dict):
    tiny_spec_dict["data"].update(source="parquet", path=str(tmp_path / "no-such-log"))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec_dict))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(spec_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no-such-log' does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_bad_spec_exits_2_with_field_path(tmp_path, tiny_spec_dict):
    tiny_spec_dict["train"]["num_workers"] = 0
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec_dict))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(spec_path), "--set", "distill.alpha=0.3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.num_workers" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_is_deterministic_through_the_cli(tmp_path, tiny_spec_dict):
    tiny_spec_dict["data"]["synthetic"]["rows_per_day"] = 200
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec_dict))
    assert main(["generate", str(spec_path)]) == 0
    first = {str(p): p.read_bytes() for p in (tmp_path / "clicks").rglob("*.parquet")}
    assert len(first) == 3
    assert main(["generate", str(spec_path)]) == 0
    assert {str(p): p.read_bytes() for p in (tmp_path / "clicks").rglob("*.parquet")} == first


def test_given_teacher_checkpoint_is_used_not_retrained(tmp_path, tiny_spec_dict):
    from pipeline.errors import UserError
    from pipeline.features import FeatureLayout
    from pipeline.stages.teacher import ensure_teacher
    from pipeline.models import ModelConfig, build_model, save_model

    spec = parse_spec(tiny_spec_dict)
    layout = FeatureLayout.from_spec(spec.features)
    config = ModelConfig(model="dcn_v2", embedding_dim=4, hash_buckets=64, hidden=(8,), cross_layers=1)
    path = str(tmp_path / "teacher.pt")
    save_model(path, build_model(config, layout), config, layout)
    tiny_spec_dict["teacher"]["checkpoint"] = path
    assert ensure_teacher(parse_spec(tiny_spec_dict)) == path  # no Ray needed: nothing is trained

    tiny_spec_dict["teacher"]["checkpoint"] = str(tmp_path / "missing.pt")
    with pytest.raises(UserError, match=r"teacher.checkpoint '.*missing.pt' does not exist"):
        ensure_teacher(parse_spec(tiny_spec_dict))


def test_data_memory_limit_caps_ray_data_and_its_blocks(tiny_spec_dict):
    from ray.data import DataContext

    from pipeline.runtime import limit_data_memory

    context = DataContext.get_current()
    saved = (context.execution_options.resource_limits, context.target_max_block_size)
    tiny_spec_dict["ray"] = {"data_memory_limit_mb": 64}
    try:
        limit_data_memory(parse_spec(tiny_spec_dict).ray.data_memory_limit_mb)
        assert context.execution_options.resource_limits.object_store_memory == 64 * 2**20
        assert context.target_max_block_size == 8 * 2**20
    finally:
        context.execution_options.resource_limits, context.target_max_block_size = saved
