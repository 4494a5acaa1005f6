"""`s3://` data, shards, checkpoints and reports against a real S3 endpoint: moto's server on 127.0.0.1.

The fake credentials are planted (tests/conftest.py `FAKE_AWS`): every test that produces text checks
they appear nowhere in it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
import uuid
from pathlib import Path

import pytest
import yaml

from pipeline import runtime, shards, storage
from pipeline.data import clicklogs
from pipeline.errors import DataError
from pipeline.spec import parse_spec
from tests.conftest import FAKE_AWS, ROOT, free_port

DAYS = [dt.date(2026, 11, 1), dt.date(2026, 11, 2), dt.date(2026, 11, 3)]


@pytest.fixture(scope="module")
def moto_endpoint():
    """A real S3 endpoint (moto's HTTP server) on a free loopback port, for the whole module."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(moto_endpoint, monkeypatch) -> str:
    """A fresh bucket; this process gets the planted credentials and the moto endpoint (undone after)."""
    import boto3

    for name, value in FAKE_AWS.items():
        monkeypatch.setenv(name, value)
    for name in (*storage.SETTINGS_ENV.values(), "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)  # and `configure` below is undone with them
    runtime.configure_storage(endpoint_url=moto_endpoint, region="us-east-1")
    name = f"distill-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def _upload_click_logs(click_logs, bucket: str, rows: int) -> str:
    """Generates a small click log locally and copies it to `s3://<bucket>/clicks`."""
    local = click_logs(days=len(DAYS), rows=rows, start=DAYS[0])
    fs, _ = storage.filesystem(f"s3://{bucket}")
    fs.put(local, f"{bucket}/clicks", recursive=True)
    return f"s3://{bucket}/clicks"


def _objects(endpoint: str, bucket: str) -> set[str]:
    """Keys in the bucket, asked of the server directly (not through the code under test)."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def _s3_table(uri: str):
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle)


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in FAKE_AWS.values():
            assert secret not in text


def _save_random_teacher(uri: str, spec) -> str:
    """An untrained (random) teacher saved at `uri`: enough to label, and saves a whole training run."""
    from pipeline.features import FeatureLayout
    from pipeline.models import ModelConfig, build_model, save_model

    layout = FeatureLayout.from_spec(spec.features)
    config = ModelConfig(model="dcn_v2", embedding_dim=4, hash_buckets=64, hidden=(8,), cross_layers=1,
                         sequence_pooling="mean")
    save_model(uri, build_model(config, layout), config, layout)
    return uri


def _s3_spec(raw_overrides: dict):
    raw = yaml.safe_load((ROOT / "jobs" / "tiny.yaml").read_text())
    for dotted, value in raw_overrides.items():
        section, key = dotted.split(".")
        raw.setdefault(section, {})[key] = value
    return parse_spec(raw)


# ---- storage helpers -------------------------------------------------------------------------------

def test_helpers_read_and_write_through_the_configured_endpoint(bucket, moto_endpoint):
    fs, path = storage.filesystem(f"s3://{bucket}/runs/a.json")
    assert fs.client_kwargs["endpoint_url"] == moto_endpoint and path == f"{bucket}/runs/a.json"

    storage.atomic_write_json(f"s3://{bucket}/runs/a.json", {"rows": 3})
    storage.atomic_write_text(f"s3://{bucket}/runs/data/p.parquet", "x")
    assert _objects(moto_endpoint, bucket) == {"runs/a.json", "runs/data/p.parquet"}  # really on the server
    assert storage.exists(f"s3://{bucket}/runs/a.json") and not storage.exists(f"s3://{bucket}/runs/b.json")
    assert storage.read_json(f"s3://{bucket}/runs/a.json") == {"rows": 3}
    assert storage.list_dir(f"s3://{bucket}/runs") == ["a.json", "data"]
    assert storage.list_files(f"s3://{bucket}/runs") == [f"s3://{bucket}/runs/data/p.parquet"]
    storage.remove_tree(f"s3://{bucket}/runs/data")
    assert storage.list_files(f"s3://{bucket}/runs") == []
    assert storage.arrow_filesystem("runs/local") is None and storage.arrow_filesystem(f"s3://{bucket}") is not None


def test_settings_reach_ray_workers_as_env_vars_without_credentials(bucket, moto_endpoint):
    env = storage.worker_env()
    assert env == {"DISTILL_S3_ENDPOINT_URL": moto_endpoint, "DISTILL_S3_REGION": "us-east-1"}
    _assert_no_secret(json.dumps(env))


# ---- clear errors, never a hang --------------------------------------------------------------------

def test_a_run_directory_on_s3_is_locked_by_a_conditional_put(bucket):
    from pipeline.locks import LOCK_FILE, DirectoryLocked, RunLock

    run_dir = f"s3://{bucket}/runs/tiny"
    with RunLock(run_dir):
        assert storage.exists(f"{run_dir}/{LOCK_FILE}")
        assert not storage.create_exclusive(f"{run_dir}/{LOCK_FILE}", b"{}")  # If-None-Match: * refused it
        with pytest.raises(DirectoryLocked, match=f"s3://{bucket}/runs/tiny is in use by "):
            RunLock(run_dir).acquire()
    assert not storage.exists(f"{run_dir}/{LOCK_FILE}")


def test_missing_bucket_is_a_data_error_naming_it(bucket):
    with pytest.raises(DataError, match=r"S3 bucket 'no-such-bucket-x1' .*does not exist") as err:
        clicklogs.partition_paths("s3://no-such-bucket-x1/clicks", DAYS)
    _assert_no_secret(str(err.value))
    with pytest.raises(DataError, match="'no-such-bucket-x1'"):  # an output root too, before any work
        storage.exists("s3://no-such-bucket-x1/runs/tiny/models/teacher.pt")


def test_missing_bucket_exits_2_with_one_line_and_no_traceback(bucket, tmp_path, capsys):
    from pipeline.cli import main

    spec = tmp_path / "s3.yaml"
    spec.write_text((ROOT / "jobs" / "tiny.yaml").read_text())
    code = main(["run", str(spec), "--set", "data.source=parquet", "--set", "data.path=s3://no-such-bucket-x2/c",
                 "--set", f"storage.endpoint_url={os.environ['DISTILL_S3_ENDPOINT_URL']}"])
    err = capsys.readouterr().err
    assert code == 2 and "no-such-bucket-x2" in err and "Traceback" not in err
    _assert_no_secret(err)


def test_unreachable_endpoint_fails_fast(bucket):
    from pipeline.job import run_job

    spec = _s3_spec({"data.source": "parquet", "data.path": f"s3://{bucket}/clicks",
                     "storage.endpoint_url": f"http://127.0.0.1:{free_port()}"})
    started = time.monotonic()
    with pytest.raises(DataError, match=r"cannot reach the S3 endpoint http://127\.0\.0\.1:\d+ for s3://") as err:
        run_job(spec)  # stage 1, before Ray starts
    assert time.monotonic() - started < 30
    _assert_no_secret(str(err.value))


def test_access_denied_is_explained_without_the_server_text():
    from botocore.exceptions import ClientError

    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": f"key {FAKE_AWS['AWS_ACCESS_KEY_ID']}"}},
                         "GetObject")
    with pytest.raises(DataError, match=r"access denied to s3://b/k .*AWS_PROFILE") as err:
        with storage.s3_errors("s3://b/k"):
            raise PermissionError("Access Denied") from denied
    _assert_no_secret(str(err.value))


# ---- Ray: label stage and the whole job on S3 -------------------------------------------------------

@pytest.mark.ray
def test_label_stage_reads_s3_and_writes_shards_and_manifest_there(ray_cluster, bucket, moto_endpoint,
                                                                   click_logs):
    from pipeline.stages.label import run_label_stage

    root = _upload_click_logs(click_logs, bucket, rows=300)
    spec = _s3_spec({"data.source": "parquet", "data.path": root, "label.batch_size": 128})
    teacher = _save_random_teacher(f"s3://{bucket}/teacher.pt", spec)  # the actors load it from S3 themselves

    manifest = run_label_stage(spec, teacher, f"s3://{bucket}/runs/shards").shard_set
    assert manifest.input_rows == manifest.total_rows == 600  # 2 train days x 300: rows in = rows out
    assert all(s.path.startswith(f"s3://{bucket}/runs/shards/date=") for s in manifest.shards)
    keys = _objects(moto_endpoint, bucket)
    day_manifests = [f"runs/shards/date={d}/{shards.MANIFEST}" for d in ("2026-11-01", "2026-11-02")]
    assert set(day_manifests) <= keys
    assert {s.path.removeprefix(f"s3://{bucket}/") for s in manifest.shards} <= keys
    for key in day_manifests:
        _assert_no_secret(json.dumps(storage.read_json(f"s3://{bucket}/{key}")))


@pytest.mark.ray
def test_quarantined_rows_are_written_to_s3_by_the_read_tasks(ray_cluster, bucket, moto_endpoint, click_logs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.stages.label import run_label_stage

    root = _upload_click_logs(click_logs, bucket, rows=300)
    fs, _ = storage.filesystem(root)
    (first_file,) = fs.glob(f"{bucket}/clicks/date={DAYS[0].isoformat()}/*.parquet")
    table = _s3_table(f"s3://{first_file}")
    clicked = table.column("clicked").to_pylist()
    clicked[5], clicked[7] = 3, None  # two bad labels on the first training day
    table = table.set_column(table.schema.get_field_index("clicked"), "clicked",
                             pa.array(clicked, table.schema.field("clicked").type))
    with fs.open(first_file, "wb") as handle:
        pq.write_table(table, handle)
    spec = _s3_spec({"data.source": "parquet", "data.path": root, "data.on_bad_rows": "quarantine",
                     "label.batch_size": 128})
    teacher = _save_random_teacher(f"s3://{bucket}/teacher.pt", spec)

    manifest = run_label_stage(spec, teacher, f"s3://{bucket}/runs/shards").shard_set

    assert manifest.input_rows == 600 and manifest.quarantined_rows == 2
    assert manifest.total_rows == 598  # every row once: labelled or set aside
    keys = {k for k in _objects(moto_endpoint, bucket) if k.startswith("runs/quarantine/")}
    assert keys and all(k.startswith(f"runs/quarantine/date={DAYS[0].isoformat()}/bad-") for k in keys)
    reasons = pa.concat_tables(_s3_table(f"s3://{bucket}/{k}") for k in keys).column("reason").to_pylist()
    assert sorted(reasons) == ["clicked: 3 not in {0,1}", "clicked: null"]


@pytest.mark.ray
@pytest.mark.e2e
def test_tiny_job_end_to_end_on_s3(ray_cluster, bucket, moto_endpoint, click_logs, capfd, caplog):
    from pipeline.job import run_job

    caplog.set_level(logging.INFO)
    root = _upload_click_logs(click_logs, bucket, rows=1000)
    overrides = {"data.source": "parquet", "data.path": root, "output.root": f"s3://{bucket}/runs",
                 "storage.endpoint_url": moto_endpoint, "train.num_workers": 1, "train.cpus_per_worker": 1,
                 "train.epochs": 1}
    # A given teacher on S3 (not trained here) keeps the test short: the students still train on Ray Train.
    teacher = _save_random_teacher(f"s3://{bucket}/teacher.pt", _s3_spec(overrides))
    spec = _s3_spec(overrides | {"teacher.checkpoint": teacher})
    metrics = run_job(spec)

    run = f"s3://{bucket}/runs/tiny"
    keys = _objects(moto_endpoint, bucket)
    assert {"runs/tiny/metrics.json", "runs/tiny/report.md", f"runs/tiny/shards/date=2026-11-01/{shards.MANIFEST}"} <= keys
    assert {"runs/tiny/models/student_distilled.pt", "runs/tiny/models/student_hard.pt"} <= keys
    assert any(k.startswith("runs/tiny/train/student_hard-") for k in keys)  # Ray Train checkpoints on S3 too
    assert metrics["models"]["teacher"]["checkpoint"] == teacher
    days = ("2026-11-01", "2026-11-02")
    manifest = shards.ShardSet(tuple(shards.read_manifest(f"{run}/shards/date={d}") for d in days))
    assert manifest.input_rows == manifest.total_rows == 2000
    assert metrics["label"]["total_rows"] == 2000 and metrics["eval"]["rows"] == 1000
    for role in ("student_distilled", "student_hard"):  # trained from the S3 shards
        history = storage.read_json(f"{run}/models/{role}.json")["history"]
        assert history[0]["rows"] == 2000

    out = capfd.readouterr()
    assert "[stage 6/6] done" in out.out  # the capture did see the run
    _assert_no_secret(
        json.dumps([m.to_dict() for m in manifest.days]), storage.read_bytes(f"{run}/metrics.json").decode(),
        storage.read_bytes(f"{run}/report.md").decode(), out.out, out.err,
        "\n".join(record.getMessage() for record in caplog.records), _ray_logs(),
    )


def _ray_logs() -> str:
    """Everything this session's Ray wrote to its log files (drivers, workers, raylet, agents)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return "\n".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file())
