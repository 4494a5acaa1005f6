"""Shared fixtures: one local Ray per test session, and builders for click logs and specs.

Every test that uses Ray carries the `ray` (or `e2e`) marker, so that `pytest -m "not ray"` starts no
Ray: a test that asks for `ray_cluster`, or leaves Ray running, without one fails and says so.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import socket
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
# Fake AWS credentials, planted so tests/test_s3.py can check they never leak into outputs, logs or errors.
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "AKIAPLANTEDSECRET123", "AWS_SECRET_ACCESS_KEY": "planted-secret-value-xyz"}


RAY_MARKERS = {"ray", "e2e"}


def _marked_for_ray(item) -> bool:
    return bool(RAY_MARKERS & {mark.name for mark in item.iter_markers()})


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")  # never imported here: a test that needs no Ray pays nothing for it
    return ray is not None and ray.is_initialized()


def pytest_collection_modifyitems(items):
    """An end-to-end test runs Ray too: it carries the `ray` marker as well, so `-m "not ray"` leaves it out."""
    for item in items:
        if item.get_closest_marker("e2e") and not item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.ray)


def pytest_runtest_setup(item):
    if "ray_cluster" in getattr(item, "fixturenames", ()) and not _marked_for_ray(item):
        pytest.fail(f"{item.nodeid} uses the ray_cluster fixture without the `ray` or `e2e` marker; add "
                    "@pytest.mark.ray so that `pytest -m 'not ray'` leaves it out", pytrace=False)


@pytest.fixture(autouse=True)
def _unmarked_tests_start_no_ray(request):
    if _marked_for_ray(request.node):
        yield
        return
    was_up = _ray_is_up()
    yield
    if not was_up and _ray_is_up():
        sys.modules["ray"].shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray without the `ray` or `e2e` marker; add "
                    "@pytest.mark.ray (or e2e) to it", pytrace=False)


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
        from pipeline.runtime import start_local_ray  # retries when a busy machine delays the node's start

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
