"""A soak of nights: nightly cycles on a drifting synthetic log, fired by the scheduler on a fake clock, a seeded
third of them killed (SIGKILL) at a random point and rerun, with the invariants checked after every cycle,
crashed or not:

- CURRENT always names a complete version whose exports passed parity, and HISTORY is one chain ending at it;
- the version CURRENT names is the one its cycle's record evaluated (a rerun never ships a stale artifact);
- every day is labelled exactly once for its teacher: its manifest, once written, never changes, and its
  shards hold each input row once (ids unique, labelled + quarantined = the partition's rows);
- after a finished cycle: no orphaned temporary file, no run lock, retention honoured.

Marked `soak`, outside `make test` (30 nights pass 10 minutes on 2 cores): `make soak` runs all of them,
`.ci/run` a bounded run (DISTILL_SOAK_NIGHTS). DISTILL_SOAK_SEED picks the crashing nights and the faults.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import nightly, registry, shards, storage
from pipeline.spec import parse_spec
from tests.conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.e2e, pytest.mark.soak]

NIGHTS = int(os.environ.get("DISTILL_SOAK_NIGHTS", "30"))
SEED = int(os.environ.get("DISTILL_SOAK_SEED", "2026"))
FIRST_DAY = dt.date(2026, 11, 4)  # evaluated by the first night; the window before it is its training data
CYCLE_TIMEOUT_S = 900  # a cycle that has not ended by then hangs: the soak fails naming it


class FakeClock:
    def __init__(self, now: dt.datetime):
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def soak_spec(tmp: Path) -> dict:
    """jobs/nightly.yaml, tiny per day and with short retention, so that 30 nights exercise it."""
    raw = yaml.safe_load((ROOT / "jobs" / "nightly.yaml").read_text())
    raw["data"]["path"] = str(tmp / "clicks")
    raw["data"]["synthetic"].update(rows_per_day=1500, users=200, items=600, categories=8, seq_len=4, drift=0.1)
    raw["features"]["sequence"]["length"] = 4
    raw["teacher"].update(embedding_dim=4, hash_buckets=1000, hidden=[16], cross_layers=1)
    raw["student"].update(hash_buckets=500, hidden=[8])
    raw["label"].update(batch_size=1024, shard_rows=1000)
    raw["train"].update(batch_size=256, cpus_per_worker=0.5)
    raw["schedule"].update(registry=str(tmp / "registry"), window_days=2, keep_versions=3, keep_shard_days=4)
    raw["output"]["root"] = str(tmp / "runs")
    raw["export"] = {"formats": ["onnx"], "serving_batches": [1], "serving_runs": 10}
    raw["tracking"] = {"enabled": False}
    return raw


def test_nights_killed_at_random_points_keep_every_invariant(ray_cluster, tmp_path):
    raw = soak_spec(tmp_path)
    spec_path = tmp_path / "soak.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec = parse_spec(raw)
    rng = random.Random(SEED)
    crashing = set(rng.sample(range(NIGHTS), max(1, NIGHTS // 3)))
    runner = CycleRunner(spec_path, ray_cluster.get_runtime_context().gcs_address, tmp_path / "logs")
    seen: dict[str, bytes] = {}  # each day's manifest bytes, as first seen
    for night in range(NIGHTS):
        day = FIRST_DAY + dt.timedelta(days=night)
        clock = FakeClock(dt.datetime.combine(day + dt.timedelta(days=1), dt.time(3, 0), tzinfo=dt.timezone.utc))
        runner.fault = rng.randrange(2**32) if night in crashing else None
        assert nightly.run_scheduler(spec, runner, clock=clock, once=True) == [day]
        if runner.crashed:
            check_invariants(spec, day, seen, finished=False)
            runner.fault = None  # the next fire of the scheduler runs the night again, unless it had finished
            finished = storage.exists(nightly.cycle_path(spec, day))  # killed after writing its record
            rerun = nightly.run_scheduler(spec, runner, clock=clock, once=True)
            assert rerun == ([] if finished else [day]), runner.last_log()
        assert storage.exists(nightly.cycle_path(spec, day)), f"night {day} did not finish: {runner.last_log()}"
        check_invariants(spec, day, seen, finished=True)
    print(runner.summary())
    assert runner.kills >= max(1, NIGHTS // 3) // 2, f"too few faults fired to call this a soak: {runner.summary()}"


def test_a_night_killed_after_publishing_is_finished_not_trained_again(ray_cluster, tmp_path):
    """The one kill whose rerun could ship the wrong model: the version is published (immutable), the
    promotion not done. The rerun must promote what the killed run evaluated, not train and score another."""
    raw = soak_spec(tmp_path)
    raw["schedule"]["gate"]["max_regression"] = 1.0  # every challenger passes: the kill point is reached
    spec_path = tmp_path / "soak.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    spec = parse_spec(raw)
    runner = CycleRunner(spec_path, ray_cluster.get_runtime_context().gcs_address, tmp_path / "logs")
    first, second = FIRST_DAY, FIRST_DAY + dt.timedelta(days=1)
    runner(first)
    runner.kill_on = "registry.promote"
    runner(second)
    assert runner.crashed, runner.last_log()
    root, model = spec.schedule.registry, spec.registry_model_name
    published = [v for v in registry.list_versions(root, model) if v.startswith(second.isoformat())]
    assert len(published) == 1 and registry.current(root, model) != published[0]
    evaluated = storage.read_json(storage.join(registry.version_dir(root, model, published[0]), "metrics.json"))
    runner.kill_on = None
    runner(second)
    assert "was published by a run that did not finish; finishing that run" in runner.log.read_text()
    record = storage.read_json(nightly.cycle_path(spec, second))
    assert record["finished_after_a_kill"] and record["decision"] == "promoted"
    assert registry.current(root, model) == published[0] == record["champion_after"]
    assert record["challenger"] == evaluated
    check_invariants(spec, second, {}, finished=True)


class CycleRunner:
    """The scheduler's `run_one`: one cycle in a subprocess (tests/soak_cycle.py) joined to this session's Ray,
    with the fault `self.fault` armed, if any."""

    def __init__(self, spec_path: Path, ray_address: str, log_dir: Path):
        self.spec_path, self.ray_address, self.log_dir = spec_path, ray_address, log_dir
        log_dir.mkdir()
        self.fault: int | None = None
        self.kill_on: str | None = None
        self.crashed = False
        self.kills, self.runs, self.faults, self.clean_seconds = 0, 0, [], []

    def __call__(self, day: dt.date) -> None:
        self.runs += 1
        self.log = self.log_dir / f"{self.runs:03d}-{day}.log"
        command = [sys.executable, str(ROOT / "tests" / "soak_cycle.py"), str(self.spec_path), day.isoformat()]
        if self.fault is not None:  # a timer fires within a clean night's time, or it would rarely crash
            command += ["--fault", str(self.fault), "--within", str(statistics.median(self.clean_seconds or [20.0]))]
        if self.kill_on:
            command += ["--kill-on", self.kill_on]
        env = os.environ | {"RAY_ADDRESS": self.ray_address}
        started = dt.datetime.now()
        with open(self.log, "w") as out:
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=CYCLE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail(f"the cycle for {day} hung for {CYCLE_TIMEOUT_S}s: {self.last_log()}")
        self.crashed = code == -9
        fault = self.log.read_text().splitlines()[0] if self.log.stat().st_size else "fault: ?"
        if self.fault is not None:
            self.faults.append(f"{day} {fault.removeprefix('fault: ')}: {'killed' if self.crashed else 'did not fire'}")
        self.kills += self.crashed
        assert code in (0, -9), f"the cycle for {day} failed with exit code {code}: {self.last_log()}"
        if code == 0 and self.fault is None and not self.kill_on:
            self.clean_seconds.append((dt.datetime.now() - started).total_seconds())

    def last_log(self) -> str:
        return f"{self.log}:\n" + "\n".join(self.log.read_text().splitlines()[-30:])

    def summary(self) -> str:
        return f"{self.runs} cycle runs, {self.kills} killed:\n  " + "\n  ".join(self.faults)


def check_invariants(spec, day: dt.date, seen: dict[str, bytes], finished: bool) -> None:
    _check_registry(spec)
    _check_labelled_once(spec, seen, window=_window(spec, day) if finished else [])
    if finished:
        _check_record(spec, day)
        _check_no_leftovers(spec)
        _check_retention(spec, day)


def _check_registry(spec) -> None:
    root, model = spec.schedule.registry, spec.registry_model_name
    current, history = registry.current(root, model), registry.history(root, model)
    if current is None:
        assert not registry.list_versions(root, model) or not history
        return
    assert registry.is_complete(root, model, current), f"CURRENT names {current}, which is not a complete version"
    assert registry.export_problems(root, model, current) == []
    for before, after in zip(history, history[1:]):
        assert after["previous"] == before["version"], f"HISTORY breaks between {before} and {after}"
    # History is written before CURRENT: a kill in between leaves its last entry one step ahead.
    assert current in (history[-1]["version"], history[-1]["previous"]), (current, history[-1])


def _window(spec, day: dt.date) -> list[str]:
    days = spec.schedule.window_days
    return [(day - dt.timedelta(days=k)).isoformat() for k in range(1, days + 1)]


def _check_labelled_once(spec, seen: dict[str, bytes], window: list[str]) -> None:
    shard_root = storage.join(spec.nightly_dir, "shards")
    teacher = shards.file_sha256(storage.join(spec.nightly_dir, "teacher.pt")) if window else None
    for name in storage.list_dir(shard_root):
        day_dir = storage.join(shard_root, name)
        manifest = shards.read_manifest(day_dir)
        if manifest is None:
            assert name[5:] not in window, f"{name} of the finished night's window has no manifest"
            continue
        raw = storage.read_bytes(storage.join(day_dir, shards.MANIFEST))
        assert seen.setdefault(name, raw) == raw, f"{name} was labelled again: its manifest changed"
        if teacher:
            assert manifest.teacher.checkpoint_sha256 == teacher, f"{name} was labelled by another teacher"
        ids = [pq.read_table(_in(day_dir, s.path), columns=[spec.features.id]).column(0) for s in manifest.shards]
        labelled = [v for column in ids for v in column.to_pylist()]
        assert len(labelled) == manifest.total_rows == sum(s.rows for s in manifest.shards)
        assert len(set(labelled)) == len(labelled), f"{name}: an id was labelled twice"
        partition = storage.join(spec.data.path, name)
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in storage.list_files(partition))
        assert manifest.total_rows + manifest.quarantined_rows == rows, f"{name}: rows lost"


def _in(day_dir: str, path: str) -> str:
    return path if os.path.isabs(path) or "://" in path else storage.join(day_dir, path)


def _check_record(spec, day: dt.date) -> None:
    """The night's record agrees with the registry: what it says it promoted is what CURRENT serves."""
    root, model = spec.schedule.registry, spec.registry_model_name
    record = storage.read_json(nightly.cycle_path(spec, day))
    current = registry.current(root, model)
    assert record["champion_after"] == current, (record["champion_after"], current)
    if record["decision"] == "promoted":
        served = storage.read_json(storage.join(registry.version_dir(root, model, current), "metrics.json"))
        assert served["auc"] == record["challenger"]["auc"], "CURRENT is not the model the night evaluated"


def _check_no_leftovers(spec) -> None:
    for root in (spec.nightly_dir, spec.schedule.registry):
        for directory, _, files in os.walk(root):
            left = [f for f in files if f.startswith(".tmp-") or f == "_LOCK"]
            assert not left, f"left behind in {directory}: {left}"


def _check_retention(spec, day: dt.date) -> None:
    root, model = spec.schedule.registry, spec.registry_model_name
    versions = registry.list_versions(root, model)
    allowed = spec.schedule.keep_versions + (registry.current(root, model) not in versions[-spec.schedule.keep_versions:])
    assert len(versions) <= allowed, f"{len(versions)} versions kept, keep_versions {spec.schedule.keep_versions}"
    oldest = day - dt.timedelta(days=spec.schedule.keep_shard_days)
    days = [n for n in storage.list_dir(storage.join(spec.nightly_dir, "shards")) if n.startswith("date=")]
    assert all(dt.date.fromisoformat(n[5:]) >= oldest for n in days), f"shard days older than {oldest}: {days}"
