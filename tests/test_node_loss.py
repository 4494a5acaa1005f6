"""A node lost on a real multi-node Ray cluster (`ray start` on loopback, token auth): a head that runs no
work and two worker nodes. A `distill run` joins it; the test kills every process of the node that hosts the
teacher actor while it labels a day, adds a fresh node, then kills every process of the node that hosts the
training worker after its first committed checkpoint. Only processes of nodes this test started are killed.

What happens, and why:
- Labelling completes, exactly. The dead node's read tasks, write tasks and the actor's in-flight batches
  are lost with it: Ray retries tasks lost to a node failure (system failures), the label stage's actor
  pool is restartable (`max_restarts=-1`, `max_task_retries=-1`), so Ray restarts the actor on a live node
  and resubmits its batches, and lost blocks are rebuilt from lineage. Ray Data names each written file by
  its write task, so a retried write replaces its file instead of adding one; the stage's row check (rows
  read = labelled + quarantined, from the Parquet footers) stands behind that. The test checks ids too.
- Training resumes: Ray Train sees its worker group fail, and within `train.max_failures` starts a new one
  on the live nodes, from the last committed checkpoint; the restart is recorded in models/<role>.json.

Marked `soak` (a four-process cluster and a whole job: minutes on 2 cores): `make soak` and `.ci/run` run it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import shards
from pipeline.spec import parse_spec
from tests.conftest import ROOT, free_port
from tests.test_faults import _committed_epochs, _save_teacher, _wait_for
from tests.test_submit import JobsCluster, _suppress_gone

pytestmark = [pytest.mark.e2e, pytest.mark.soak]

DAYS = [dt.date(2026, 11, 1), dt.date(2026, 11, 2)]
ROWS = 200_000  # per day: labelling a day takes several seconds on the teacher below, so the kill lands inside it


class LossCluster(JobsCluster):
    """A head with no CPUs (no work lands on it, so killing workers never kills the GCS) and worker nodes
    that can be added and killed."""

    def __init__(self, temp_dir: str):
        super().__init__(temp_dir)
        self.killed: list[subprocess.Popen] = []

    def start(self) -> None:
        self._start_node("head", "--head", f"--port={self.gcs_port}", "--num-cpus=0", "--include-dashboard=true",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                         f"--ray-client-server-port={free_port()}")
        self._wait_for(lambda nodes: nodes >= 1, "the head node's dashboard")
        for name in ("worker-a", "worker-b"):
            self._start_node(name, f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=2")
        self._wait_for(lambda nodes: nodes == 3, "the worker nodes to join")

    def add_worker(self, name: str) -> None:
        self._start_node(name, f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=2")
        self._wait_for_registered(len(self.nodes) + len(self.killed), f"{name} to join")

    def _wait_for_registered(self, count: int, what: str, timeout_s: float = 180) -> None:
        """Until the GCS knows `count` nodes, dead or alive (a killed node stays ALIVE there for a while)."""
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException, ValueError, KeyError):
                reply = requests.get(f"{self.address}/api/v0/nodes", timeout=5,
                                     headers={"Authorization": f"Bearer {self.token}"})
                if len(reply.json()["data"]["result"]["result"]) >= count:
                    return
            time.sleep(1)
        raise RuntimeError(f"test cluster: gave up waiting for {what}")

    def workers(self) -> list[subprocess.Popen]:
        return [node for node in self.nodes[1:] if node.poll() is None]

    def node_of(self, pid: int) -> subprocess.Popen:
        """The worker node's `ray start` process whose process tree holds `pid`."""
        for node in self.workers():
            with _suppress_gone(psutil):
                if pid in {p.pid for p in psutil.Process(node.pid).children(recursive=True)}:
                    return node
        raise AssertionError(f"pid {pid} is on none of this cluster's worker nodes")

    def kill_node(self, node: subprocess.Popen) -> None:
        """SIGKILLs the node's `ray start` process and every process under it (raylet, object store, agents,
        workers): the node is gone as if its machine died."""
        root = psutil.Process(node.pid)
        procs = [root, *root.children(recursive=True)]
        for proc in procs:
            with _suppress_gone(psutil):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=30)
        self.nodes.remove(node)  # the base class waits on live nodes only
        self.killed.append(node)


@pytest.fixture
def cluster():
    cluster = LossCluster(tempfile.mkdtemp(prefix="dloss-", dir="/tmp"))  # short: Ray's socket paths
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _actors(cluster: LossCluster, class_part: str) -> list[dict]:
    import requests

    reply = requests.get(f"{cluster.address}/api/v0/actors", params={"detail": "true", "limit": 1000}, timeout=10,
                         headers={"Authorization": f"Bearer {cluster.token}"})
    actors = reply.json()["data"]["result"]["result"]
    return [a for a in actors if class_part in a["class_name"] and a["state"] == "ALIVE" and a.get("pid")]


def _spec(tmp_path: Path, address: str) -> dict:
    from pipeline.data.synthetic import generate_click_logs

    clicks = tmp_path / "clicks"
    generate_click_logs(str(clicks), start_date=DAYS[0], days=3, rows_per_day=ROWS, users=2000, items=5000,
                        categories=20, seq_len=5, seed=7)
    raw = yaml.safe_load((ROOT / "jobs" / "tiny.yaml").read_text())
    raw["data"] = {"source": "parquet", "path": str(clicks), "train_days": {"start": "2026-11-01", "end": "2026-11-02"},
                   "eval_days": {"start": "2026-11-03", "end": "2026-11-03"}}
    raw["label"].update(batch_size=256, shard_rows=5000, actors=[1, 1])
    raw["train"].update(num_workers=1, cpus_per_worker=1, epochs=3, batch_size=256, max_failures=2, zero_stage=0)
    raw["distill"]["on_weak_teacher"] = "warn"  # an untrained teacher: this test is about rows, not quality
    raw["export"] = {"formats": ["onnx"], "serving_batches": []}
    raw["output"]["root"] = str(tmp_path / "runs")
    raw["ray"] = {"address": address}
    spec = parse_spec(raw)
    raw["teacher"]["checkpoint"] = _save_teacher(spec, tmp_path / "teacher.pt", embedding_dim=16, hidden=(256, 128))
    return raw


def test_a_node_lost_mid_label_and_mid_training_loses_and_repeats_no_row(cluster, tmp_path):
    raw = _spec(tmp_path, f"127.0.0.1:{cluster.gcs_port}")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec = parse_spec(raw)
    log = tmp_path / "run.log"
    env = cluster.env | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(spec_path), "--verbose"], cwd=ROOT,
                               env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # 1. mid-label: the node hosting the teacher actor, 2 s into its first day (a day takes several)
        actor = _wait_for(lambda: run.poll() is not None or _actors(cluster, "TeacherPredictor")[:1], 300,
                          "the teacher actor")
        assert run.poll() is None, _tail(log)
        time.sleep(2)
        assert _unlabelled(spec) == DAYS, "killed too late: a day was done"
        cluster.kill_node(cluster.node_of(actor[0]["pid"]))
        cluster.add_worker("worker-c")
        # 2. mid-training: the node hosting the student's training worker, after epoch 1 is committed
        train_root = Path(spec.run_dir, "train")
        _wait_for(lambda: run.poll() is not None or _committed_epochs(train_root, "student_distilled") >= 1, 600,
                  "the student's first committed checkpoint")
        assert run.poll() is None, _tail(log)
        worker = _actors(cluster, "RayTrainWorker")[0]
        cluster.kill_node(cluster.node_of(worker["pid"]))
        assert run.wait(timeout=900) == 0, _tail(log)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)

    for day in DAYS:
        _assert_labelled_exactly_once(spec, day)
    record = json.loads(Path(spec.run_dir, "models", "student_distilled.json").read_text())
    assert record["restarts"] >= 1, record
    assert [e["epoch"] for e in record["history"]] == [1, 2, 3]


def _unlabelled(spec) -> list[dt.date]:
    """Days without a manifest yet."""
    return [day for day in DAYS if not Path(spec.run_dir, "shards", f"date={day}", shards.MANIFEST).exists()]


def _assert_labelled_exactly_once(spec, day: dt.date) -> None:
    day_dir = Path(spec.run_dir, "shards", f"date={day}")
    manifest = shards.read_manifest(str(day_dir))
    assert manifest is not None and manifest.complete, f"{day}: no complete manifest"
    files = sorted((day_dir / "data").glob("*.parquet"))
    assert sorted(Path(s.path).name for s in manifest.shards) == [f.name for f in files], "a file outside the manifest"
    ids = [i for f in files for i in pq.read_table(f, columns=[spec.features.id]).column(0).to_pylist()]
    source = next(Path(spec.data.path, f"date={day}").glob("*.parquet"))
    expected = pq.read_table(source, columns=[spec.features.id]).column(0).to_pylist()
    assert len(ids) == len(set(ids)), f"{day}: {len(ids) - len(set(ids))} ids labelled twice"
    assert sorted(ids) == sorted(expected), f"{day}: rows lost"


def _tail(log: Path) -> str:
    return "\n".join(log.read_text().splitlines()[-60:])
