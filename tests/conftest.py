"""Shared fixtures: one local Ray per test session, and builders for click logs and specs."""

from __future__ import annotations

import copy
import datetime as dt
import os
import socket
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
# Fake AWS credentials, planted so tests/test_s3.py can check they never leak into outputs, logs or errors.
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "AKIAPLANTEDSECRET123", "AWS_SECRET_ACCESS_KEY": "planted-secret-value-xyz"}


def free_port() -> int:
    """A loopback port nothing listens on: bound for a moment, closed again on return."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local Ray shared by every test that needs one (starting Ray costs seconds)."""
    import ray
    from ray.data import DataContext

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    with pytest.MonkeyPatch.context() as env:
        # Ray workers inherit the environment of `ray.init` and nothing later (a runtime_env would put the
        # credentials in Ray's logs), so they get the fake ones now, and never a developer's real ones.
        for name, value in FAKE_AWS.items():
            env.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        # Workers import `model: custom` factories by module path, like a user's package on their image.
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])))
        from pipeline.job import start_local_ray  # retries when a busy machine delays the node's start

        start_local_ray(num_cpus=2, dashboard_host="127.0.0.1", include_dashboard=True, logging_level="WARNING")
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_spec_dict(tmp_path) -> dict:
    """jobs/tiny.yaml as a dict, with data and outputs under this test's tmp_path."""
    raw = yaml.safe_load((JOBS / "tiny.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["data"]["path"] = str(tmp_path / "clicks")
    raw["output"]["root"] = str(tmp_path / "runs")
    return raw


@pytest.fixture
def click_logs(tmp_path):
    """Builder: click_logs(days=2, rows=500, seed=0) -> the root holding date= partitions."""
    from pipeline.data.synthetic import generate_click_logs

    def build(days: int = 2, rows: int = 500, seed: int = 0, start: dt.date = dt.date(2026, 11, 1),
              root: Path | None = None) -> str:
        out = str(root or tmp_path / f"clicks-{seed}-{days}-{rows}")
        generate_click_logs(out, start_date=start, days=days, rows_per_day=rows, users=200, items=500,
                            categories=10, seq_len=5, seed=seed)
        return out

    return build
