"""Label stage on real Ray: rows in = rows out, the manifest, skip-if-done, redo-if-incomplete."""

from __future__ import annotations

import json

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import shards, storage
from pipeline.data import clicklogs
from pipeline.features import FeatureLayout
from pipeline.stages.label import label_columns, labelling_dataset, run_label_stage, teacher_identity
from pipeline.models import ModelConfig, build_model, save_model
from pipeline.spec import parse_spec

pytestmark = pytest.mark.ray


@pytest.fixture
def labelled_setup(ray_cluster, tiny_spec_dict, click_logs, tmp_path):
    """A spec over a small 3-day log and a (randomly initialised) saved teacher."""
    tiny_spec_dict["data"]["path"] = click_logs(days=3, rows=700)
    tiny_spec_dict["label"].update(batch_size=256, shard_rows=500)
    spec = parse_spec(tiny_spec_dict)
    layout = FeatureLayout.from_spec(spec.features)
    config = ModelConfig(model="dcn_v2", embedding_dim=4, hash_buckets=64, hidden=(8,), cross_layers=1,
                         sequence_pooling="attention")
    teacher = str(tmp_path / "teacher.pt")
    save_model(teacher, build_model(config, layout), config, layout)
    return spec, teacher, str(tmp_path / "shards")


def _shard_table(manifest: shards.ShardSet):
    return pads.dataset([s.path for s in manifest.shards], format="parquet").to_table()


def test_every_input_row_is_labelled_exactly_once(labelled_setup):
    spec, teacher, shard_dir = labelled_setup
    manifest = run_label_stage(spec, teacher, shard_dir).shard_set

    assert manifest.input_rows == manifest.total_rows == 1400  # 2 train days x 700
    table = _shard_table(manifest)
    ids = table.column("event_id").to_numpy()
    assert len(ids) == len(set(ids)) == 1400  # no duplicates, none lost
    assert table.column("teacher_logit").null_count == 0
    assert {"clicked", "teacher_logit", "hist_item_ids"} <= set(table.column_names)
    assert "true_ctr" not in table.column_names  # never a feature, never in shards
    assert sum(s.rows for s in manifest.shards) == 1400
    assert all(pq.ParquetFile(s.path).metadata.num_rows == s.rows for s in manifest.shards)


def test_each_day_has_a_manifest_recording_teacher_inputs_and_settings(labelled_setup):
    spec, teacher, shard_dir = labelled_setup
    manifest = run_label_stage(spec, teacher, shard_dir).shard_set
    assert sorted(manifest.inputs) == ["2026-11-01", "2026-11-02"]
    for day in ("2026-11-01", "2026-11-02"):
        on_disk = storage.read_json(storage.join(shard_dir, f"date={day}", shards.MANIFEST))
        assert on_disk["teacher"]["checkpoint_sha256"] == shards.file_sha256(teacher)
        assert list(on_disk["inputs"]) == [day]
        entry = on_disk["inputs"][day]
        assert entry["rows"] == on_disk["total_rows"] == 700
        assert [f["name"] for f in entry["files"]] == ["part-00000.parquet"] and entry["files"][0]["size"] > 0
        assert on_disk["label_fingerprint"] == spec.fingerprint("features", "label")
        assert on_disk["spec_hash"] == spec.fingerprint()


def test_rerun_reuses_finished_shards(labelled_setup):
    spec, teacher, shard_dir = labelled_setup
    first = run_label_stage(spec, teacher, shard_dir)
    mtimes = {s.path: storage.filesystem(s.path)[0].modified(s.path) for s in first.shard_set.shards}
    second = run_label_stage(spec, teacher, shard_dir)
    assert second.relabelled == [] and second.reused == ["2026-11-01", "2026-11-02"]
    assert {s.path: storage.filesystem(s.path)[0].modified(s.path) for s in second.shard_set.shards} == mtimes


def test_a_day_without_manifest_is_redone_and_only_it(labelled_setup):
    spec, teacher, shard_dir = labelled_setup
    run_label_stage(spec, teacher, shard_dir)
    day_dir = storage.join(shard_dir, "date=2026-11-02")
    storage.filesystem(day_dir)[0].rm(storage.join(day_dir, shards.MANIFEST))  # as if the driver died
    redone = run_label_stage(spec, teacher, shard_dir)
    assert redone.relabelled == ["2026-11-02"] and redone.reused == ["2026-11-01"]
    assert len(_shard_table(redone.shard_set)) == 1400  # the stale files were replaced, not added to


def test_a_changed_partition_is_relabelled(labelled_setup):
    import os

    spec, teacher, shard_dir = labelled_setup
    run_label_stage(spec, teacher, shard_dir)
    part = storage.list_files(storage.join(spec.data.path, "date=2026-11-01"))[0]
    os.utime(part, (os.path.getatime(part), os.path.getmtime(part) + 5))
    again = run_label_stage(spec, teacher, shard_dir)
    assert again.relabelled == ["2026-11-01"] and again.reused == ["2026-11-02"]


def test_float16_logits_round_trip_within_tolerance(labelled_setup, tiny_spec_dict):
    spec, teacher, shard_dir = labelled_setup
    exact = _shard_table(run_label_stage(spec, teacher, shard_dir).shard_set).sort_by("event_id")
    spec16 = spec.model_copy(update={"label": spec.label.model_copy(update={"logit_dtype": "float16"})})
    half = _shard_table(run_label_stage(spec16, teacher, shard_dir + "16").shard_set).sort_by("event_id")
    assert str(half.schema.field("teacher_logit").type) == "halffloat"
    a, b = exact.column("teacher_logit").to_numpy(), half.column("teacher_logit").to_numpy().astype("float32")
    assert abs(a - b).max() < 1e-2


def test_missing_columns_fail_before_any_work(labelled_setup):
    spec, teacher, shard_dir = labelled_setup
    bad = spec.model_copy(update={"features": spec.features.model_copy(update={"dense": ["price", "discount"]})})
    with pytest.raises(clicklogs.DataError, match=r"lack column\(s\) \['discount'\]"):
        run_label_stage(bad, teacher, shard_dir)
    assert not storage.exists(shard_dir)


@pytest.mark.parametrize("batch_size, actors, cpus_per_actor", [(64, (1, 1), 1.0), (700, (1, 2), 0.5),
                                                                (5000, (2, 2), 0.5)])
def test_rows_in_equal_rows_out_at_any_batch_size_and_pool(labelled_setup, batch_size, actors, cpus_per_actor):
    spec, teacher, shard_dir = labelled_setup
    label = spec.label.model_copy(update={"batch_size": batch_size, "actors": actors, "cpus_per_actor": cpus_per_actor})
    manifest = run_label_stage(spec.model_copy(update={"label": label}), teacher, shard_dir).shard_set
    ids = _shard_table(manifest).column("event_id").to_numpy()
    assert manifest.total_rows == len(ids) == len(set(ids)) == 1400


def test_shard_files_hold_about_shard_rows(labelled_setup):
    """No explosion of small files: each day's shards hold >= shard_rows rows, except a day's last one."""
    spec, teacher, shard_dir = labelled_setup
    label = spec.label.model_copy(update={"batch_size": 100, "shard_rows": 300})
    manifest = run_label_stage(spec.model_copy(update={"label": label}), teacher, shard_dir).shard_set
    for day in manifest.inputs:
        rows = [s.rows for s in manifest.shards if f"date={day}" in s.path]
        assert sum(rows) == 700 and sum(r < 300 for r in rows) <= 1, rows


def test_row_checks_run_in_the_read_tasks_not_in_the_teacher_actors(labelled_setup, tmp_path, capsys):
    """The actors are the stage's bottleneck (GPUs, on a cluster): they should run the model alone."""
    spec, teacher, _ = labelled_setup
    identity = teacher_identity(spec, {spec.teacher[0].name: teacher})
    dataset = labelling_dataset(spec, spec.data.train_days.start, label_columns(spec), identity,
                                str(tmp_path / "quarantine"))

    dataset.explain()  # prints the plans; nothing runs

    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[ReadParquet->MapBatches(prepare_batch)]" in optimized
    assert "ActorPoolMapOperator[MapBatches(TeacherPredictor)]" in optimized


def test_onnxruntime_teacher_labels_every_row_as_the_eager_one_does(labelled_setup, tmp_path):
    """label.runtime onnxruntime: rows in = rows out, logits within 1e-4 of the eager teacher's."""
    import numpy as np
    import torch

    from pipeline.models import load_model

    spec, teacher, shard_dir = labelled_setup
    model, config, layout = load_model(teacher)
    with torch.no_grad():  # weights spread like a trained teacher's, so that the logits are not all ~0
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(3))
    save_model(teacher, model, config, layout)
    eager = _shard_table(run_label_stage(spec, teacher, shard_dir).shard_set).sort_by("event_id")
    ort_spec = spec.model_copy(update={"label": spec.label.model_copy(update={"runtime": "onnxruntime"})})
    labelled = run_label_stage(ort_spec, teacher, shard_dir + "-ort")
    onnx = _shard_table(labelled.shard_set).sort_by("event_id")
    assert labelled.shard_set.total_rows == labelled.shard_set.input_rows == onnx.num_rows == 1400
    assert onnx.column("event_id").to_pylist() == eager.column("event_id").to_pylist()
    a, b = eager.column("teacher_logit").to_numpy(), onnx.column("teacher_logit").to_numpy()
    assert a.std() > 0.2  # real spread, not a flat line that any runtime would match
    assert np.max(np.abs(a - b) / np.maximum(1, np.abs(a))) <= 1e-4
    export = tmp_path / "teacher-onnx"
    assert (export / "model.onnx").exists() and (export / "parity.json").exists()
    written = (export / "model.onnx").stat().st_mtime_ns
    from pipeline.stages.export import export_for_labelling

    assert export_for_labelling(ort_spec, "teacher", teacher, []) == str(export)  # same teacher: reused as is
    assert (export / "model.onnx").stat().st_mtime_ns == written
    signature = json.loads((export / "signature.json").read_text())
    signature["about"]["graph_code"] = "0123456789abcdef"  # as an older pipeline's exporter would have made it
    (export / "signature.json").write_text(json.dumps(signature))
    export_for_labelling(ort_spec, "teacher", teacher, [])
    assert (export / "model.onnx").stat().st_mtime_ns != written  # made again by this code
    assert json.loads((export / "signature.json").read_text())["about"]["graph_code"] != "0123456789abcdef"
    _an_onnxruntime_actor_runs_without_torch(export, onnx.slice(0, 300), tmp_path)


def _an_onnxruntime_actor_runs_without_torch(export, labelled, tmp_path) -> None:
    """The actor's code in a process where importing torch fails: the same logits as the stage wrote."""
    import subprocess
    import sys

    import numpy as np

    rows = tmp_path / "rows.parquet"
    pq.write_table(labelled.drop_columns(["teacher_logit"]), rows)
    script = ("import sys\nclass _NoTorch:\n    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'torch' or name.startswith('torch.'):\n"
              "            raise ImportError('torch is blocked in this process')\n"
              "sys.meta_path.insert(0, _NoTorch())\n"
              "import pyarrow.parquet as pq\nfrom pipeline.stages.label import TeacherPredictor\n"
              "actor = TeacherPredictor({'teacher_logit': sys.argv[1]}, runtime='onnxruntime')\n"
              "pq.write_table(actor(pq.read_table(sys.argv[2])), sys.argv[3])\n")
    out = tmp_path / "out.parquet"
    proc = subprocess.run([sys.executable, "-c", script, str(export), str(rows), str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got, want = pq.read_table(out).column("teacher_logit").to_numpy(), labelled.column("teacher_logit").to_numpy()
    assert len(got) == 300 and np.array_equal(got, want)
