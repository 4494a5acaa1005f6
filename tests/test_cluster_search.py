"""The teacher search on a real multi-node Ray cluster (`ray start` on loopback, token auth): a head that runs no
work and two worker nodes, joined by a `distill run` through `ray.address`, as on a user's cluster.

Two trials train at once, each through Ray Train on the worker nodes (the head has no CPU for them); the search
must finish both, publish the best trial's model as the run's teacher, and the job must go on to the end.

Marked `soak` (a four-process cluster and a whole job: minutes on 2 cores): `make soak` and `.ci/run` run it.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from pipeline.spec import parse_spec
from tests.conftest import ROOT
from tests.test_node_loss import cluster  # noqa: F401  (the fixture: a head without CPUs, two worker nodes)

pytestmark = [pytest.mark.e2e, pytest.mark.soak]


def _spec(tmp_path: Path, address: str) -> dict:
    from pipeline.data.synthetic import generate_click_logs

    clicks = tmp_path / "clicks"
    generate_click_logs(str(clicks), start_date=dt.date(2026, 11, 1), days=3, rows_per_day=3000,
                        users=300, items=1000, categories=10, seq_len=5, seed=3)
    raw = yaml.safe_load((ROOT / "jobs" / "tiny.yaml").read_text())
    raw["data"] = {"source": "parquet", "path": str(clicks), "validation": {"fraction": 0.2},
                   "train_days": {"start": "2026-11-01", "end": "2026-11-02"},
                   "eval_days": {"start": "2026-11-03", "end": "2026-11-03"}}
    raw["teacher"].update(embedding_dim=8, hash_buckets=2000, hidden=[32], epochs=2, lr=0.003,
                          search={"trials": 2, "max_concurrent_trials": 2, "grace_epochs": 2,
                                  "space": {"lr": {"loguniform": [1e-3, 1e-2]}}})
    raw["train"].update(num_workers=1, cpus_per_worker=1, epochs=1, batch_size=256, zero_stage=0)
    raw["distill"]["on_weak_teacher"] = "warn"  # a tiny log: this test is about where trials run, not quality
    raw["output"]["root"] = str(tmp_path / "runs")
    raw["ray"] = {"address": address}
    return raw


def _train_worker_nodes(cluster) -> set[str]:  # noqa: F811
    """Node ids of every Ray Train worker actor the cluster ran, dead or alive."""
    reply = requests.get(f"{cluster.address}/api/v0/actors", params={"detail": "true", "limit": 1000}, timeout=10,
                         headers={"Authorization": f"Bearer {cluster.token}"})
    actors = reply.json()["data"]["result"]["result"]
    return {a["node_id"] for a in actors if "RayTrainWorker" in a["class_name"]}


def _head_node(cluster) -> str:  # noqa: F811
    reply = requests.get(f"{cluster.address}/api/v0/nodes", params={"detail": "true"}, timeout=10,
                         headers={"Authorization": f"Bearer {cluster.token}"})
    return next(n["node_id"] for n in reply.json()["data"]["result"]["result"] if n["is_head_node"])


def test_the_teacher_search_runs_its_trials_on_the_clusters_worker_nodes(cluster, tmp_path):  # noqa: F811
    raw = _spec(tmp_path, f"127.0.0.1:{cluster.gcs_port}")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec = parse_spec(raw)
    env = cluster.env | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", str(spec_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    trials = json.loads(Path(spec.run_dir, "search", "trials.json").read_text())
    assert len(trials["trials"]) == 2 and all(t["finished"] for t in trials["trials"])
    assert trials["trials"][0]["config"] == {"lr": 0.003}  # the teacher section as written, first
    best = next(t for t in trials["trials"] if t["trial"] == trials["best"])
    assert Path(spec.run_dir, "models", "teacher.pt").read_bytes() == Path(best["model"]).read_bytes()
    metrics = json.loads(Path(spec.run_dir, "metrics.json").read_text())
    assert metrics["search"]["teacher"] == trials

    nodes = _train_worker_nodes(cluster)
    assert nodes and _head_node(cluster) not in nodes  # every training worker ran on a worker node
