"""Faults survived, every row accounted for: killed teacher actors, a killed driver, a killed training
worker, and an output directory that is read-only or full, on real Ray, DeepSpeed and Parquet.

Processes are killed only by PIDs these tests identify as their own: actors of this session's Ray (by the
state API at its own address), or a `distill run` subprocess started here in its own session, whose Ray
processes carry a marker in their environment.
"""

from __future__ import annotations

import datetime as dt
import errno
import gc
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pytest
import yaml

from pipeline import shards, storage
from pipeline.errors import UserError
from pipeline.features import FeatureLayout
from pipeline.models import ModelConfig, build_model, save_model
from pipeline.spec import parse_spec
from tests.conftest import ROOT

pytestmark = [pytest.mark.ray]

DAY = dt.date(2026, 11, 1)
MARKER = "DISTILL_FAULT_TEST"  # env var every process of a `distill run` started here inherits


# --- helpers ------------------------------------------------------------------------------------------------

def _wait_for(condition, timeout: float, what: str, every: float = 0.2):
    """Polls `condition` until it returns something truthy; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _actors(*filters: tuple) -> list:
    """Actors of this test session's Ray matching state-API `filters`, with pid, state and restarts."""
    import ray
    from ray.util.state import list_actors

    # Other Ray instances may run on this machine: ask ours by its address, never "auto".
    return list_actors(address=ray.get_runtime_context().gcs_address, filters=list(filters), detail=True,
                       raise_on_missing_output=False)


def _alive_actors(class_part: str) -> list:
    """ALIVE actors whose class name contains `class_part`, e.g. "TeacherPredictor", "RayTrainWorker"."""
    return [a for a in _actors(("state", "=", "ALIVE")) if class_part in a.class_name and a.pid]


def _big_manifest() -> shards.Manifest:
    teacher = shards.TeacherMember("teacher", "dcn_v2", "teacher.pt", "ab" * 32)
    return shards.Manifest(teacher=shards.TeacherIdentity("teacher", "dcn_v2", "teacher.pt", "ab" * 32, (teacher,)),
                           label_fingerprint="f", spec_hash="s", inputs={}, columns=(),
                           shards=tuple(shards.FileRows("x" * 100, 1) for _ in range(1_000)))


def _save_teacher(spec, path: Path, embedding_dim: int = 4, hidden: tuple = (8,)) -> str:
    layout = FeatureLayout.from_spec(spec.features)
    config = ModelConfig(model="dcn_v2", embedding_dim=embedding_dim, hash_buckets=2000, hidden=hidden,
                         cross_layers=2, sequence_pooling="attention")
    save_model(str(path), build_model(config, layout), config, layout)
    return str(path)


def _event_ids(paths: list[str]) -> list[int]:
    return pads.dataset(paths, format="parquet").to_table(columns=["event_id"]).column("event_id").to_pylist()


def _input_ids(click_root: str, days: list[dt.date]) -> set[int]:
    return set(_event_ids([str(p) for d in days for p in Path(click_root, f"date={d}").glob("*.parquet")]))


def _one_day(raw: dict, day: dt.date = DAY) -> dict:
    raw["data"]["train_days"] = {"start": day.isoformat(), "end": day.isoformat()}
    next_day = (day + dt.timedelta(days=1)).isoformat()
    raw["data"]["eval_days"] = {"start": next_day, "end": next_day}
    return raw


# --- 1. a teacher actor killed mid-stage --------------------------------------------------------------------

def test_teacher_actor_killed_mid_day_loses_and_repeats_no_row(ray_cluster, tiny_spec_dict, click_logs, tmp_path):
    from pipeline.stages.label import label_days

    rows = 80_000  # with the teacher below, about 3 s of actor CPU: the kill lands mid-task
    clicks = click_logs(days=1, rows=rows)
    tiny_spec_dict["data"]["path"] = clicks
    tiny_spec_dict["label"].update(batch_size=512, shard_rows=5_000)
    spec = parse_spec(_one_day(tiny_spec_dict))
    teacher = _save_teacher(spec, tmp_path / "teacher.pt", embedding_dim=64, hidden=(512, 512))
    shard_root = str(tmp_path / "shards")
    day_dir = Path(shard_root, f"date={DAY}")

    with ThreadPoolExecutor(1) as pool:
        labelling = pool.submit(label_days, spec, teacher, shard_root, [DAY])
        actors = _wait_for(lambda: _alive_actors("TeacherPredictor") or labelling.done(), 180,
                           "the teacher actor to be ALIVE (model loaded)", every=0.1)
        assert not labelling.done(), f"the stage ended before its actor was seen: {labelling.exception()}"
        (actor,) = actors
        process = psutil.Process(actor.pid)
        idle = sum(process.cpu_times()[:2])  # ALIVE: __init__ is done, so CPU from here on is batches
        _wait_for(lambda: sum(process.cpu_times()[:2]) - idle > 0.5 or labelling.done(), 180,
                  "the teacher actor to work on its batches", every=0.05)
        assert not labelling.done() and not (day_dir / shards.MANIFEST).exists(), "killed too late: raise rows"
        process.kill()
        labelled = labelling.result(timeout=300)

    manifest = shards.read_manifest(str(day_dir))
    assert manifest.input_rows == manifest.total_rows == rows
    assert labelled.relabelled == [DAY.isoformat()]
    on_disk = sorted(str(p) for p in (day_dir / "data").rglob("*.parquet"))
    assert on_disk == sorted(s.path for s in manifest.shards)  # no stray file from the killed attempt
    ids = _event_ids(on_disk)
    assert len(ids) == len(set(ids)) == rows  # none repeated, none lost
    assert set(ids) == _input_ids(clicks, [DAY])
    (after,) = _actors(("actor_id", "=", actor.actor_id))
    assert after.num_restarts == 1  # Ray restarted the killed actor (max_restarts=-1) and retried its task


# --- 2. the driver killed mid-label, then the same run again ------------------------------------------------

def _ray_env(ray_tmp: str, marker: str) -> dict:
    """Environment for a `distill run` subprocess: its own local Ray, under its own temp dir, never ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env |= {"RAY_TMPDIR": ray_tmp, MARKER: marker, "PYTHONUNBUFFERED": "1"}
    return env


def _marked_processes(marker: str) -> list[psutil.Process]:
    """Processes whose environment carries `marker`: the subprocess and every Ray process it started."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_marked(marker: str) -> None:
    """SIGKILLs every process carrying `marker` (only what our subprocess started) and waits until they are gone."""
    for proc in _marked_processes(marker):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    _wait_for(lambda: not any(_running(p) for p in _marked_processes(marker)), 30, "the run's processes to exit")


@pytest.fixture
def distill_run(tmp_path):
    """Starts `python -m pipeline run SPEC` in its own session with its own Ray; kills what is left at the end."""
    ray_tmp = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths live under it
    marker = uuid.uuid4().hex
    started = []

    def start(spec_path: Path, log_name: str, *options: str) -> subprocess.Popen:
        with open(tmp_path / log_name, "w") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(spec_path), *options], cwd=ROOT,
                                    env=_ray_env(ray_tmp, marker), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        started.append(proc)
        return proc

    start.marker = marker
    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _kill_marked(marker)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _shard_state(day_dir: Path) -> dict[str, int]:
    """{file name: mtime_ns} of a day's shard files and its manifest."""
    files = [*(day_dir / "data").rglob("*.parquet"), day_dir / shards.MANIFEST]
    return {str(p.relative_to(day_dir)): p.stat().st_mtime_ns for p in files}


@pytest.mark.e2e  # the rerun goes to the end: students and evaluation
@pytest.mark.soak  # a minute and more of a whole job in a process of its own: `make soak`, and .ci/run, run it
def test_driver_killed_mid_label_then_rerun_keeps_finished_days(distill_run, tiny_spec_dict, tmp_path, ray_cluster):
    days = [DAY, DAY + dt.timedelta(days=1)]
    rows = 3_000
    raw = tiny_spec_dict
    raw["data"]["train_days"] = {"start": days[0].isoformat(), "end": days[-1].isoformat()}
    raw["data"]["eval_days"] = {"start": "2026-11-03", "end": "2026-11-03"}
    raw["data"]["synthetic"]["rows_per_day"] = rows
    raw["label"].update(batch_size=512, shard_rows=1_000)
    raw["train"].update(num_workers=1, cpus_per_worker=1, epochs=1, batch_size=256)
    raw["ray"] = {"num_cpus": 2}
    raw["teacher"]["checkpoint"] = _save_teacher(parse_spec(raw), tmp_path / "teacher.pt")  # no teacher training
    spec = parse_spec(raw)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    shard_root = Path(spec.run_dir, "shards")
    done = lambda: [d for d in days if (shard_root / f"date={d}" / shards.MANIFEST).exists()]  # noqa: E731

    # 1) Kill the whole process group once the first day is finished and the second is not.
    first = distill_run(spec_path, "first.log")
    _wait_for(lambda: done() or first.poll() is not None, 240, "the first day's manifest")
    assert first.poll() is None, f"the run ended by itself: {(tmp_path / 'first.log').read_text()[-3000:]}"
    os.killpg(first.pid, signal.SIGKILL)
    finished = done()
    assert first.wait(timeout=30) == -signal.SIGKILL
    assert finished == [days[0]], f"expected only the first day finished at the kill, got {finished}"
    _kill_marked(distill_run.marker)  # Ray's workers leave the group (seen: the teacher actor, still running)
    kept = _shard_state(shard_root / f"date={days[0]}")

    # 2) A shard directory without a manifest must never be read by training: plant one, with real rows.
    planted = shard_root / "date=2026-10-31" / "data"
    planted.mkdir(parents=True)
    shutil.copy(next((shard_root / f"date={days[0]}" / "data").rglob("*.parquet")), planted / "planted.parquet")

    # 3) Run the same job again to the end, with Ray's own output shown (--verbose) while the session's
    # Ray runs too: two Rays on the machine, which must not confuse Ray Train's placement-group cleaner.
    second = distill_run(spec_path, "second.log", "--verbose")
    assert second.wait(timeout=420) == 0, (tmp_path / "second.log").read_text()[-3000:]
    output = (tmp_path / "second.log").read_text()
    assert "Found multiple active Ray instances" not in output and "PlacementGroupCleanerMonitor" not in output
    assert "taking over the lock" in output and "is no longer running on this host" in output  # the killed run's

    assert _shard_state(shard_root / f"date={days[0]}") == kept  # same files, untouched
    metrics = json.loads(Path(spec.run_dir, "metrics.json").read_text())
    assert metrics["label"]["relabelled_days"] == [d.isoformat() for d in days[1:]]
    all_shards = []
    for day in days:
        manifest = shards.read_manifest(str(shard_root / f"date={day}"))
        assert manifest.input_rows == manifest.total_rows == rows, day
        on_disk = sorted(str(p) for p in (shard_root / f"date={day}" / "data").rglob("*.parquet"))
        assert on_disk == sorted(s.path for s in manifest.shards), day  # the killed attempt left nothing
        all_shards += on_disk
    ids = _event_ids(all_shards)
    assert len(ids) == len(set(ids)) == rows * len(days)
    assert set(ids) == _input_ids(spec.data.path, days)
    for role in ("student_distilled", "student_hard"):  # trained on manifest rows only, not the planted file
        record = json.loads(Path(spec.run_dir, "models", f"{role}.json").read_text())
        assert [e["rows"] for e in record["history"]] == [rows * len(days)], role


# --- 3. a training worker killed mid-run --------------------------------------------------------------------

def _committed_epochs(train_root: Path, role: str = "teacher") -> int:
    """Epochs whose checkpoint Ray Train has committed (in its snapshot): only those survive a worker failure."""
    snapshots = list(train_root.glob(f"{role}-*/checkpoint_manager_snapshot.json"))
    if not snapshots:
        return 0
    try:
        latest = json.loads(snapshots[0].read_text()).get("latest_checkpoint_result")
    except json.JSONDecodeError:  # being replaced right now
        return 0
    return latest["metrics"]["epoch"] if latest else 0


@pytest.mark.soak  # 40,000 rows x 2 epochs, so that the kill lands inside epoch 2: `make soak` runs it
def test_training_worker_killed_mid_run_resumes_from_last_epoch(ray_cluster, tiny_spec_dict, click_logs):
    from pipeline.stages.teacher import ensure_teacher

    rows = 40_000  # several seconds per epoch with 2 workers on 2 cores: the kill lands inside epoch 2
    tiny_spec_dict["data"]["path"] = click_logs(days=1, rows=rows)
    tiny_spec_dict["teacher"].update(embedding_dim=8, hidden=[32], epochs=2)
    tiny_spec_dict["train"].update(num_workers=2, cpus_per_worker=0.5, epochs=2, batch_size=128, max_failures=2)
    spec = parse_spec(_one_day(tiny_spec_dict))
    train_root = Path(spec.run_dir, "train")
    checkpoints = lambda: sorted(train_root.glob("teacher-*/checkpoint_*/progress.json"))  # noqa: E731

    with ThreadPoolExecutor(1) as pool:
        training = pool.submit(ensure_teacher, spec)
        _wait_for(lambda: _committed_epochs(train_root) or training.done(), 300, "epoch 1's committed checkpoint")
        workers = _alive_actors("RayTrainWorker")
        assert _committed_epochs(train_root) == 1 and not training.done(), "killed too late: raise rows"
        assert len(workers) == 2, [(a.class_name, a.pid) for a in workers]
        os.kill(workers[0].pid, signal.SIGKILL)
        model_path = training.result(timeout=400)

    assert Path(model_path).stat().st_size > 0
    record = json.loads(Path(spec.run_dir, "models", "teacher.json").read_text())
    assert [e["epoch"] for e in record["history"]] == [1, 2]
    assert [e["rows"] for e in record["history"]] == [rows, rows]
    assert record["restarts"] == 1
    progress = [json.loads(p.read_text()) for p in checkpoints()]
    histories = [p["models"]["teacher"]["history"] for p in progress]
    assert progress[-1]["restarts"] == 1 and len(histories[-1]) == 2
    # Epoch 1 was resumed from, not trained again. (The killed attempt may have left an uncommitted
    # epoch-2 checkpoint when the kill landed during its upload: Ray Train ignores it, and so do we.)
    assert [len(h) for h in histories].count(1) == 1, progress


# --- 4. output not writable, disk full ----------------------------------------------------------------------

@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(name, size="64k", read_only=False) -> a fresh tmpfs directory (needs root; else skipped)."""
    mounted = []

    def mount(name: str, size: str = "64k", read_only: bool = False) -> Path:
        target = tmp_path / name
        target.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def read_only_dir(tmp_path, mount_tmpfs):
    """A directory this process cannot write into: mode 0555, or a read-only mount for root (who ignores modes)."""
    if os.geteuid() != 0:
        target = tmp_path / "read-only"
        target.mkdir()
        target.chmod(0o555)
        yield target
        target.chmod(0o755)
    else:
        yield mount_tmpfs("read-only", read_only=True)


def test_check_writable_names_the_path_and_leaves_nothing(read_only_dir, tmp_path):
    with pytest.raises(UserError, match=rf"output directory {read_only_dir}/runs is not writable: .*output.root"):
        storage.check_writable(str(read_only_dir / "runs"))
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    with pytest.raises(UserError, match=rf"{a_file}/runs is not writable: not a directory"):
        storage.check_writable(str(a_file / "runs"))
    good = tmp_path / "good" / "runs"
    storage.check_writable(str(good))
    assert good.is_dir() and list(good.iterdir()) == []  # the probe file is gone


def test_cli_read_only_output_root_exits_2_before_any_work(read_only_dir, distill_run, tiny_spec_dict, tmp_path):
    tiny_spec_dict["output"]["root"] = str(read_only_dir)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec_dict))
    log = tmp_path / "run.log"
    started = time.monotonic()
    proc = distill_run(spec_path, log.name)
    # Stop it as soon as it reaches the teacher stage: by then it has already failed this test.
    _wait_for(lambda: proc.poll() is not None or "[stage 2/6]" in log.read_text(), 120, "`distill run` to stop")
    seconds = time.monotonic() - started
    output = log.read_text()
    assert "[stage 2/6]" not in output, "went on to Ray and training with a read-only output root"
    assert proc.returncode == 2, output[-2000:]
    assert f"output directory {read_only_dir}/tiny is not writable" in output and "output.root" in output
    assert "Traceback" not in output
    assert seconds < 60, seconds  # Python and imports only; generous for busy CI machines


def _no_space(how: str, mount_tmpfs, monkeypatch, tmp_path: Path) -> Path:
    """A directory whose writes fail with ENOSPC: a 64 KiB tmpfs, or an injected failure (any user)."""
    if how == "tmpfs":
        return mount_tmpfs("full", size="64k")
    directory = tmp_path / "full"
    directory.mkdir()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")).startswith(str(directory)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return directory


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_disk_full_write_fails_clearly_and_leaves_old_file_or_nothing(how, mount_tmpfs, monkeypatch, tmp_path):
    directory = _no_space(how, mount_tmpfs, monkeypatch, tmp_path)
    big = os.urandom(256 * 1024)  # larger than the 64 KiB disk

    target = directory / "models" / "student.pt"
    with pytest.raises(UserError, match=rf"cannot write {target}: no space left on device; free space on that disk"):
        storage.atomic_write_bytes(str(target), big)
    assert list(target.parent.iterdir()) == []  # no destination, no temp file

    manifest = directory / "shards" / "date=2026-11-01"
    if how == "tmpfs":
        storage.atomic_write_text(str(directory / "models" / "small.json"), "{}")  # room for a small file
    with pytest.raises(UserError, match="no space left on device"):
        shards.write_manifest(str(manifest), _big_manifest())  # ~100 KiB of JSON
    assert list(manifest.iterdir()) == []  # a day without a manifest is redone, never half-read

    if how == "tmpfs":  # an existing file survives a failed overwrite untouched
        with pytest.raises(UserError):
            storage.atomic_write_bytes(str(directory / "models" / "small.json"), big)
        assert (directory / "models" / "small.json").read_text() == "{}"
        assert sorted(p.name for p in (directory / "models").iterdir()) == ["small.json"]


def _label_onto_full_disk(spec, teacher: str, disk: Path) -> tuple[type, str]:
    """Runs the label stage onto a full disk; returns the error's type and message, and only those.

    The error's traceback reaches into Ray Data's frames, which hold the failed stage's actor (and its CPU):
    kept alive, it would starve the next stage on this 2-CPU cluster. So neither this function nor pytest's
    log capture (Ray Data logs the error with its traceback) may keep it.
    """
    from pipeline.stages.label import label_days

    failure = None
    try:
        label_days(spec, teacher, str(disk), [DAY])
    except Exception as exc:  # noqa: BLE001 - whatever reaches the caller is what we check
        failure = (type(exc), str(exc))
    assert failure is not None, "labelling onto a full disk did not fail"
    for handler in logging.getLogger().handlers:  # pytest's capture handlers; the text is already kept
        for record in getattr(handler, "records", ()):
            record.exc_info = None

    def leftover_actors() -> list:
        gc.collect()
        return _alive_actors("TeacherPredictor")

    _wait_for(lambda: not leftover_actors(), 60, "the failed stage's teacher actor to be released")
    return failure


@pytest.fixture
def full_disk_label(ray_cluster, tiny_spec_dict, click_logs, tmp_path, mount_tmpfs):
    """(spec, teacher, disk): 8,000 rows to label onto a 128 KiB tmpfs (the shards need about 1 MiB)."""
    tiny_spec_dict["data"]["path"] = click_logs(days=1, rows=8_000)
    tiny_spec_dict["label"].update(batch_size=1_024, shard_rows=1_000)
    spec = parse_spec(_one_day(tiny_spec_dict))
    return spec, _save_teacher(spec, tmp_path / "teacher.pt"), mount_tmpfs("shards", size="128k")


def test_disk_full_mid_label_writes_no_manifest_and_rerun_completes(full_disk_label):
    from pipeline.stages.label import label_days

    spec, teacher, disk = full_disk_label
    day_dir = disk / f"date={DAY}"
    _, message = _label_onto_full_disk(spec, teacher, disk)
    assert re.search("no space left on device", message, re.IGNORECASE), message[-1000:]
    assert not (day_dir / shards.MANIFEST).exists()

    subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)  # space freed
    labelled = label_days(spec, teacher, str(disk), [DAY])
    assert labelled.relabelled == [DAY.isoformat()]
    manifest = shards.read_manifest(str(day_dir))
    assert manifest.input_rows == manifest.total_rows == 8_000
    on_disk = sorted(str(p) for p in (day_dir / "data").rglob("*.parquet"))
    assert on_disk == sorted(s.path for s in manifest.shards)  # the failed attempt's files are gone
    ids = _event_ids(on_disk)
    assert len(ids) == len(set(ids)) == 8_000


def test_disk_full_mid_label_is_a_user_error_naming_the_shards(full_disk_label):
    spec, teacher, disk = full_disk_label
    kind, message = _label_onto_full_disk(spec, teacher, disk)
    assert issubclass(kind, UserError), kind
    assert re.match(rf"cannot write {disk}/date={DAY}\S*: no space left on device; free space", message), message
