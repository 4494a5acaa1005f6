"""`distill submit/status/logs/stop/jobs` (pipeline/submit.py): errors that need no cluster, then a real
two-node Ray cluster with token authentication, started in its own processes, ports and temp dir.

The cluster never shares the session Ray of other tests (`ray_cluster` in conftest.py) and this module never
calls `ray.init`: the CLI runs as a subprocess, as a user would run it. Teardown ends only the processes this
module started (found by an environment marker and as descendants), never `ray stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipeline import submit
from pipeline.spec import load_spec, parse_spec
from tests.conftest import JOBS, ROOT, free_port

TINY = str(JOBS / "tiny.yaml")
AUTH_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV}
    return env | extra


def distill(*args: str, env: dict[str, str], timeout: float = 120, secret: str | None = None):
    """Runs `python -m pipeline ARGS` like a user would; checks it never leaks `secret` or a traceback."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if secret:
        assert secret not in output, "the token was printed"
    if proc.returncode == 2:
        assert "Traceback" not in proc.stderr, proc.stderr
    return proc


# --- no cluster needed ---------------------------------------------------------------------------------------

def test_address_comes_from_flag_then_env_then_default(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert submit.resolve_address(None) == ("http://127.0.0.1:8265", "the default")
    monkeypatch.setenv("RAY_ADDRESS", "head:8265")
    assert submit.resolve_address(None) == ("http://head:8265", "RAY_ADDRESS")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://jobs.example/")
    assert submit.resolve_address(None) == ("https://jobs.example", "RAY_API_SERVER_ADDRESS")
    assert submit.resolve_address("http://10.0.0.1:8265") == ("http://10.0.0.1:8265", "--address")
    with pytest.raises(submit.ClusterError, match="not an http"):
        submit.connect("ray://head:10001")


def test_token_is_looked_up_where_ray_looks(monkeypatch, tmp_path):
    for name in AUTH_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert submit.find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert submit.find_token() == submit.Token("from-home", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert submit.find_token().value == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    token = submit.find_token()
    assert (token.value, token.source) == ("from-env", "RAY_AUTH_TOKEN")
    assert "from-env" not in repr(token)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submit.find_token() is None


def test_unreadable_token_path_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(submit.ClusterAuthError, match="RAY_AUTH_TOKEN_PATH"):
        submit.find_token()


def test_staged_working_dir_has_code_and_resolved_spec_but_no_data(tmp_path):
    spec = load_spec(TINY, ["train.epochs=1", "output.root=/abs/runs"])
    staged = submit.stage_working_dir(spec, tmp_path / "job", source="jobs/tiny.yaml --set train.epochs=1")
    assert (staged / "pipeline" / "__main__.py").is_file()
    assert (staged / "pipeline" / "data" / "synthetic.py").is_file()  # `data` is excluded at the root only
    assert (staged / "pyproject.toml").is_file() and (staged / "jobs" / "tiny.yaml").is_file()
    for excluded in (".venv", ".git", "data", "runs"):
        assert not (staged / excluded).exists(), excluded
    assert not list(staged.rglob("__pycache__")) and not list(staged.rglob("*.egg-info"))
    resolved = parse_spec(yaml.safe_load((staged / submit.SPEC_FILE).read_text()))
    assert resolved.ray.address == "auto"  # the job joins the cluster it runs on
    assert resolved.model_copy(update={"ray": spec.ray}) == spec
    assert submit.ENTRYPOINT == f"python -m pipeline run {submit.SPEC_FILE}"


def test_what_means_something_else_on_a_cluster_is_warned_about():
    warnings = submit.submit_warnings(load_spec(TINY, ["ray.num_cpus=4"]))
    assert [w.split()[0] for w in warnings] == ["data.path", "output.root", "ray.num_cpus"]
    absolute = load_spec(TINY, ["data.path=/shared/clicks", "output.root=s3://bucket/runs"])
    assert submit.submit_warnings(absolute) == []


@pytest.mark.parametrize("command", [["jobs"], ["status", "some-job"], ["submit", TINY]])
def test_unreachable_address_fails_fast_and_clearly(command):
    closed = free_port()  # nothing listens there
    started = time.monotonic()
    proc = distill(*command, "--address", f"http://127.0.0.1:{closed}", env=_clean_env())
    assert proc.returncode == 2, proc.stderr
    assert f"cannot connect to the Ray dashboard at http://127.0.0.1:{closed} (from --address)" in proc.stderr
    assert time.monotonic() - started < 60


@pytest.fixture
def silent_server():
    """A port that accepts connections and never answers (a hung or firewalled dashboard)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


def test_silent_cluster_times_out_instead_of_hanging(silent_server):
    port = silent_server.getsockname()[1]
    proc = distill("status", "some-job", "--address", f"127.0.0.1:{port}", "--timeout", "1", env=_clean_env())
    assert proc.returncode == 2
    assert f"http://127.0.0.1:{port} (from --address) did not answer within 1s" in proc.stderr


def test_bad_spec_exits_2_before_any_network_call(silent_server):
    port = silent_server.getsockname()[1]
    proc = distill("submit", TINY, "--set", "train.epocs=1", "--address", f"http://127.0.0.1:{port}",
                   env=_clean_env())
    assert proc.returncode == 2
    assert "train.epocs: unknown key; did you mean 'epochs'?" in proc.stderr
    silent_server.settimeout(0.5)
    with pytest.raises(socket.timeout):
        silent_server.accept()  # nobody connected


# --- a real two-node cluster ---------------------------------------------------------------------------------

class JobsCluster:
    """`ray start` head (2 CPUs, dashboard) + one worker node (1 CPU) on loopback, token auth on."""

    def __init__(self, temp_dir: str):
        self.temp_dir = temp_dir
        self.token = secrets.token_hex(32)
        self.marker = f"distill-test-{secrets.token_hex(6)}"  # every process of this cluster inherits it
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[subprocess.Popen] = []
        ray = Path(sys.executable).with_name("ray")
        self.ray = str(ray) if ray.exists() else shutil.which("ray")
        # A cluster image has the project's Python first on PATH: the entrypoint runs `python -m pipeline`.
        self.env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, DISTILL_TEST_CLUSTER=self.marker,
                              PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

    def client_env(self, **extra: str) -> dict[str, str]:
        """What a user's shell has: the cluster's token, nothing else from the cluster."""
        return _clean_env(RAY_AUTH_TOKEN=self.token) | extra

    def start(self) -> None:
        self._start_node("head", "--head", f"--port={self.gcs_port}", "--num-cpus=2", "--include-dashboard=true",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                         f"--ray-client-server-port={free_port()}")
        self._wait_for(lambda nodes: nodes >= 1, "the head node's dashboard")
        self._start_node("worker", f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=1")
        self._wait_for(lambda nodes: nodes == 2, "the worker node to join")

    def _start_node(self, name: str, *args: str) -> None:
        ports = [f"--{flag}={free_port()}" for flag in (  # no defaults: other Rays may run on this machine
            "node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port")]
        # One temp dir per node, as on separate machines: each node's runtime-env agent deletes and re-extracts
        # the job's working_dir in its own session dir, which would pull files from under the other node.
        node_dir = Path(self.temp_dir) / name
        command = [self.ray, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={node_dir}",
                   "--object-store-memory=400000000", "--disable-usage-stats", *args, *ports]
        log = open(Path(self.temp_dir) / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the node
        self.nodes.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _wait_for(self, ready, what: str, timeout_s: float = 180) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(node.poll() is not None for node in self.nodes):
                break
            try:
                reply = requests.get(f"{self.address}/api/v0/nodes", timeout=5,
                                     headers={"Authorization": f"Bearer {self.token}"})
                nodes = reply.json()["data"]["result"]["result"]
                if ready(sum(node["state"] == "ALIVE" for node in nodes)):
                    return
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(1)
        logs = "\n".join(p.read_text()[-2000:] for p in Path(self.temp_dir).glob("*.log"))
        raise RuntimeError(f"test cluster: gave up waiting for {what}\n{logs}")

    def stop(self) -> None:
        """Ends the node processes, their descendants and anything carrying this cluster's marker."""
        import psutil

        procs = {}
        for node in self.nodes:
            with _suppress_gone(psutil):
                root = psutil.Process(node.pid)
                procs |= {p.pid: p for p in [root, *root.children(recursive=True)]}
        for proc in psutil.process_iter():
            with _suppress_gone(psutil):
                if proc.environ().get("DISTILL_TEST_CLUSTER") == self.marker:
                    procs[proc.pid] = proc
        for node in self.nodes:  # `ray start --block` shuts its node down on SIGTERM
            with _suppress_gone(psutil):
                os.kill(node.pid, signal.SIGTERM)
        # Raylets and GCS exit within a second or two; what lingers after that (agents, job drivers) is killed
        _, alive = psutil.wait_procs(list(procs.values()), timeout=3)
        for proc in alive:
            with _suppress_gone(psutil):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _suppress_gone(psutil):
    return contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError)


@pytest.fixture(scope="module")
def jobs_cluster():
    # Short temp dir: Ray's unix socket paths must stay under 108 characters.
    cluster = JobsCluster(tempfile.mkdtemp(prefix="dsub-", dir="/tmp"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _job_id(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("submitted job "))
    return line.split()[2]


@pytest.mark.ray
def test_wrong_token_is_refused(jobs_cluster):
    proc = distill("jobs", "--address", jobs_cluster.address, env=jobs_cluster.client_env(RAY_AUTH_TOKEN="wrong"),
                   secret=jobs_cluster.token)
    assert proc.returncode == 2
    assert "refused the token from RAY_AUTH_TOKEN" in proc.stderr


@pytest.mark.ray
def test_missing_token_says_where_to_put_it(jobs_cluster, tmp_path):
    env = _clean_env(HOME=str(tmp_path), RAY_ADDRESS=jobs_cluster.address)  # no ~/.ray/auth_token there
    proc = distill("jobs", env=env)
    assert proc.returncode == 2
    assert f"{jobs_cluster.address} (from RAY_ADDRESS) requires token authentication" in proc.stderr
    assert "RAY_AUTH_TOKEN" in proc.stderr


@pytest.mark.ray
@pytest.mark.parametrize("command", ["status", "logs", "stop"])
def test_unknown_job_id_is_a_clear_error(jobs_cluster, command):
    proc = distill(command, "no-such-job", "--address", jobs_cluster.address, env=jobs_cluster.client_env(),
                   secret=jobs_cluster.token)
    assert proc.returncode == 2
    assert f"no job 'no-such-job' on {jobs_cluster.address}" in proc.stderr


@pytest.mark.ray
def test_job_failing_on_the_cluster_exits_1_with_its_error(jobs_cluster, tmp_path):
    # Valid here, fails there: the cluster has no click logs at /nonexistent.
    proc = distill("submit", TINY, "--wait", "--address", jobs_cluster.address, "--set", "data.source=parquet",
                   "--set", "data.path=/nonexistent", "--set", f"output.root={tmp_path}/runs",
                   env=jobs_cluster.client_env(), secret=jobs_cluster.token, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = _job_id(proc.stdout)
    assert f"error: job {job_id} FAILED: Job entrypoint command failed with exit code 2" in proc.stderr
    assert "click-log path '/nonexistent' does not exist" in proc.stderr
    status = distill("status", job_id, "--address", jobs_cluster.address, env=jobs_cluster.client_env())
    assert status.returncode == 0 and f"job {job_id}: FAILED" in status.stdout


@pytest.mark.ray
def test_stop_a_running_job(jobs_cluster, tmp_path):
    proc = distill("submit", TINY, "--address", jobs_cluster.address, "--set", f"data.path={tmp_path}/clicks",
                   "--set", f"output.root={tmp_path}/runs", env=jobs_cluster.client_env(), secret=jobs_cluster.token)
    assert proc.returncode == 0, proc.stderr
    job_id = _job_id(proc.stdout)
    assert f"distill logs {job_id} --follow" in proc.stdout
    stop = distill("stop", job_id, "--address", jobs_cluster.address, env=jobs_cluster.client_env())
    assert stop.returncode == 0 and job_id in stop.stdout, stop.stderr
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = distill("status", job_id, "--address", jobs_cluster.address, env=jobs_cluster.client_env())
        if f"job {job_id}: STOPPED" in status.stdout:
            break
        time.sleep(2)
    assert f"job {job_id}: STOPPED" in status.stdout, status.stdout


@pytest.mark.ray
@pytest.mark.e2e
def test_submit_wait_runs_the_whole_job_on_the_cluster(jobs_cluster, tmp_path):
    out = tmp_path / "out"
    proc = distill("submit", TINY, "--wait", "--address", jobs_cluster.address,
                   "--set", f"data.path={out}/clicks", "--set", f"output.root={out}/runs",
                   "--set", "train.num_workers=1", "--set", "train.epochs=1", "--set", "teacher.epochs=1",
                   env=jobs_cluster.client_env(), secret=jobs_cluster.token, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    job_id = _job_id(proc.stdout)
    assert f"job {job_id} SUCCEEDED" in proc.stdout
    assert "[stage 5/6] evaluate on held-out days" in proc.stdout  # the logs were streamed
    run_dir = out / "runs" / "tiny"  # the overrides reached the cluster through job-spec.yaml
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["models"]) == {"teacher", "student_distilled", "student_hard"}
    assert metrics["label"]["total_rows"] == 2 * 8000
    assert (run_dir / "report.md").is_file()

    env = jobs_cluster.client_env(RAY_ADDRESS=jobs_cluster.address)  # the address from the environment
    status = distill("status", job_id, env=env)
    assert f"job {job_id}: SUCCEEDED" in status.stdout and f"run directory: {run_dir}" in status.stdout
    assert "[stage 5/6]" in distill("logs", job_id, env=env).stdout
    listed = distill("jobs", env=env).stdout
    assert any(line.split()[:2] == [job_id, "SUCCEEDED"] for line in listed.splitlines())


def fake_project(tmp_path: Path, secret: str) -> Path:
    """A project as a user's may be: the code, plus credentials and private files that must never leave."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "pipeline", project / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    planted = {".env": f"API_TOKEN={secret}\n", ".env.production": secret, ".aws/credentials": secret,
               ".ssh/id_rsa": secret, "deploy/server.pem": secret, "deploy/api.key": secret,
               "conf/gcp-credentials.json": secret, "notes/private.txt": secret, "exports/clicks.csv": secret,
               "pipeline/.env": secret}
    for name, text in planted.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    (project / submit.IGNORE_FILE).write_text("# ours\nnotes/\n*.csv\n")
    return project


def test_credentials_and_ignored_files_are_never_staged(tmp_path):
    secret = secrets.token_hex(16)
    spec = load_spec(TINY, ["output.root=/abs/runs"])
    staged = submit.stage_working_dir(spec, tmp_path / "job", root=fake_project(tmp_path, secret))
    shipped = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert "pipeline/__main__.py" in shipped and submit.SPEC_FILE in shipped
    assert not any(secret in p.read_text(errors="ignore") for p in staged.rglob("*") if p.is_file())
    for name in (".env", ".env.production", ".aws", ".ssh", "deploy/server.pem", "deploy/api.key", "notes",
                 "exports/clicks.csv", "pipeline/.env", "conf/gcp-credentials.json"):
        assert not (staged / name).exists(), name
    files, size = submit.check_upload(staged)
    assert files == len(shipped) and size == sum((staged / p).stat().st_size for p in shipped)


def test_an_upload_above_the_limit_is_refused_naming_the_largest_file(tmp_path):
    project = fake_project(tmp_path, "x")
    (project / "weights.bin").write_bytes(b"\0" * (3 * submit.MiB))
    staged = submit.stage_working_dir(load_spec(TINY), tmp_path / "job", root=project)
    with pytest.raises(submit.UserError, match=r"above 1 MB \(--max-upload-mb\); the largest files: weights.bin "
                                               r"\(3.0 MB\).*\.distillignore"):
        submit.check_upload(staged, max_upload_mb=1)
    assert submit.check_upload(staged, max_upload_mb=10)[1] > 3 * submit.MiB


@pytest.mark.ray
def test_the_cluster_receives_no_credentials(jobs_cluster, tmp_path, monkeypatch):
    """What the cluster's job sees in its working_dir: read back from the cluster, by a job that lists it."""
    secret = secrets.token_hex(16)
    staged = submit.stage_working_dir(load_spec(TINY, ["output.root=/abs/runs"]), tmp_path / "job",
                                      root=fake_project(tmp_path, secret))
    monkeypatch.setenv("RAY_AUTH_TOKEN", jobs_cluster.token)
    client = submit.connect(jobs_cluster.address)
    job = client.submit_job(entrypoint="find . -type f | sort", runtime_env={"working_dir": str(staged)})
    deadline = time.monotonic() + 120
    while str(client.get_job_status(job)) not in submit.TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert str(client.get_job_status(job)) == "SUCCEEDED", logs
    listed = {line.removeprefix("./") for line in logs.splitlines() if line.startswith("./")}
    assert "pipeline/__main__.py" in listed and submit.SPEC_FILE in listed
    assert not {".env", ".env.production", "deploy/server.pem", "notes/private.txt"} & listed
    assert not any(name.startswith((".aws/", ".ssh/")) for name in listed) and secret not in logs
