"""The run-directory lock with real processes: two started together (exactly one runs), `distill run` on a
locked directory (exit 2 naming the holder, before any work), a dead holder's lock and an expired one taken
over with a warning, release on every exit path. S3 (a conditional PUT) is in tests/test_s3.py."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from pipeline.locks import LOCK_FILE, DirectoryLocked, RunLock
from tests.conftest import ROOT

HOLD = textwrap.dedent('''
    import sys, time
    from pipeline.locks import DirectoryLocked, RunLock
    try:
        with RunLock(sys.argv[1]):
            print("held", flush=True)
            time.sleep(3)
    except DirectoryLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
''')


def test_of_two_processes_started_together_exactly_one_holds_the_directory(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=60), *p.communicate()) for p in procs)
    (won, won_out, _), (lost, _, lost_err) = results
    assert (won, lost) == (0, 2) and won_out == "held\n"
    winner = next(p.pid for p in procs if p.returncode == 0)
    assert "is in use by " in lost_err and f"pid {winner} " in lost_err and socket.gethostname() in lost_err
    assert not (tmp_path / LOCK_FILE).exists()  # released when the holder finished


def test_distill_run_on_a_locked_run_directory_exits_2_naming_the_holder(tmp_path):
    raw = yaml.safe_load((ROOT / "jobs" / "tiny.yaml").read_text())
    raw["data"]["path"], raw["output"]["root"] = str(tmp_path / "clicks"), str(tmp_path / "runs")
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    with RunLock(str(tmp_path / "runs" / "tiny")):
        proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(spec_path)], cwd=ROOT, text=True,
                              capture_output=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "runs/tiny is in use by " in proc.stderr and f"pid {os.getpid()} " in proc.stderr
    assert "Traceback" not in proc.stderr and "[stage 1/6]" not in proc.stdout  # stopped before any work
    assert not (tmp_path / "clicks").exists()


def plant(directory, **held) -> None:
    record = {"user": "someone", "host": socket.gethostname(), "pid": 1, "command": "distill run x",
              "started": "2026-12-01T00:00:00+00:00", "expires": "2099-01-01T00:00:00+00:00"} | held
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_FILE).write_text(json.dumps(record))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    plant(tmp_path, pid=dead_pid())
    with caplog.at_level(logging.WARNING, logger="pipeline.locks"), RunLock(str(tmp_path)):
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid()
    assert "is no longer running on this host" in caplog.text and "taking over the lock" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_taking_over_removes_the_temporary_files_the_dead_holder_left(tmp_path, caplog):
    plant(tmp_path, pid=dead_pid())
    (tmp_path / "models").mkdir()
    orphans = [tmp_path / ".tmp-abc123metrics.json", tmp_path / "models" / ".tmp-x9student.pt"]
    kept = [tmp_path / "metrics.json", tmp_path / "models" / "student.pt", tmp_path / ".hidden"]
    for path in orphans + kept:
        path.write_text("x")
    with caplog.at_level(logging.WARNING, logger="pipeline.locks"), RunLock(str(tmp_path)) as lock:
        assert lock.took_over
    assert [p.exists() for p in orphans] == [False, False] and all(p.exists() for p in kept)
    assert "removed 2 temporary file(s) the dead holder left" in caplog.text


def test_a_released_lock_is_not_a_take_over_and_removes_nothing(tmp_path):
    (tmp_path / ".tmp-abc123metrics.json").write_text("a live writer's")  # no dead holder: not ours to remove
    with RunLock(str(tmp_path)) as lock:
        assert not lock.took_over
    assert (tmp_path / ".tmp-abc123metrics.json").exists()


def test_another_hosts_lock_holds_until_it_expires(tmp_path, caplog):
    plant(tmp_path, host="other-host", pid=4242, expires="2026-12-04T10:00:00+00:00")
    before = lambda: dt.datetime(2026, 12, 4, 9, 0, tzinfo=dt.timezone.utc)  # noqa: E731
    after = lambda: dt.datetime(2026, 12, 4, 11, 0, tzinfo=dt.timezone.utc)  # noqa: E731
    with pytest.raises(DirectoryLocked, match=r"in use by someone@other-host pid 4242 .* expires at 2026-12-04T10"):
        RunLock(str(tmp_path), clock=before).acquire()
    with caplog.at_level(logging.WARNING, logger="pipeline.locks"), RunLock(str(tmp_path), clock=after):
        pass
    assert "expired at 2026-12-04T10:00:00+00:00 without being renewed" in caplog.text


def test_the_lock_is_released_when_the_run_fails_and_renewed_while_it_runs(tmp_path):
    with pytest.raises(RuntimeError), RunLock(str(tmp_path)):
        raise RuntimeError("a stage failed")
    assert not (tmp_path / LOCK_FILE).exists()
    lock = RunLock(str(tmp_path), ttl=dt.timedelta(seconds=0.3))
    with lock:
        first = json.loads((tmp_path / LOCK_FILE).read_text())["expires"]
        time.sleep(1.3)  # the renewer runs every ttl / 3
        assert json.loads((tmp_path / LOCK_FILE).read_text())["expires"] > first
