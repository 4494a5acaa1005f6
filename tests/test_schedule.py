"""Schedule rules with a fake clock: due dates, bounded catch-up in order, no overlapping cycles."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline import storage
from pipeline.schedule import CycleLock, LockHeld, data_date, due_dates, fire_times

UTC = dt.timezone.utc
NIGHTLY = "30 2 * * *"


def at(day: int, hour: int = 12, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, day, hour, minute, tzinfo=UTC)


def test_fire_times_follow_the_cron_in_its_time_zone():
    fires = fire_times(NIGHTLY, "Europe/Berlin", at(1, 0), at(3, 12))
    assert [f.strftime("%m-%d %H:%M %Z") for f in fires] == ["11-01 02:30 CET", "11-02 02:30 CET", "11-03 02:30 CET"]
    assert data_date(fires[0]) == dt.date(2026, 10, 31)  # a fire processes yesterday's partition


def test_nothing_due_before_tonight():
    assert due_dates(NIGHTLY, "UTC", dt.date(2026, 11, 27), at(28, 1), max_catch_up=3) == ([], [])


def test_one_due_date_after_tonights_fire():
    assert due_dates(NIGHTLY, "UTC", dt.date(2026, 11, 27), at(29, 3), max_catch_up=3) == (
        [dt.date(2026, 11, 28)], [])


def test_catch_up_runs_missed_days_in_order():
    due, skipped = due_dates(NIGHTLY, "UTC", dt.date(2026, 11, 24), at(28, 3), max_catch_up=5)
    assert due == [dt.date(2026, 11, d) for d in (25, 26, 27)] and skipped == []


def test_catch_up_is_bounded():
    due, skipped = due_dates(NIGHTLY, "UTC", dt.date(2026, 11, 10), at(28, 3), max_catch_up=2)
    assert due == [dt.date(2026, 11, 26), dt.date(2026, 11, 27)]
    assert skipped[0] == dt.date(2026, 11, 11) and skipped[-1] == dt.date(2026, 11, 25)


class FakeClock:
    def __init__(self, now: dt.datetime):
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def test_a_second_cycle_cannot_start_while_one_runs(tmp_path):
    clock = FakeClock(at(28, 3))
    first = CycleLock(str(tmp_path / "lock"), dt.timedelta(hours=1), clock)
    second = CycleLock(str(tmp_path / "lock"), dt.timedelta(hours=1), clock)
    second.owner = "other-host:1"
    first.acquire()
    with pytest.raises(LockHeld, match="already running"):
        second.acquire()
    first.release()
    second.acquire()  # free again


def test_a_crashed_holder_loses_the_lock_after_its_ttl(tmp_path):
    clock = FakeClock(at(28, 3))
    crashed = CycleLock(str(tmp_path / "lock"), dt.timedelta(hours=1), clock)
    crashed.acquire()  # and never releases
    waiting = CycleLock(str(tmp_path / "lock"), dt.timedelta(hours=1), clock)
    waiting.owner = "other-host:2"
    clock.now = at(28, 3, 59)
    with pytest.raises(LockHeld):
        waiting.acquire()
    clock.now = at(28, 4, 1)
    waiting.acquire()  # expired: taken over


def test_renewing_keeps_a_long_cycle_locked(tmp_path):
    clock = FakeClock(at(28, 3))
    holder = CycleLock(str(tmp_path / "lock"), dt.timedelta(hours=1), clock)
    other = CycleLock(str(tmp_path / "lock"), dt.timedelta(hours=1), clock)
    other.owner = "x:3"
    with holder:
        clock.now = at(28, 3, 50)
        holder.renew()
        clock.now = at(28, 4, 30)
        with pytest.raises(LockHeld):
            other.acquire()
    other.acquire()


def test_scheduler_catches_up_in_order_without_overlap(tmp_path, tiny_spec_dict):
    from pipeline import nightly
    from pipeline.spec import parse_spec

    tiny_spec_dict["schedule"] = {"registry": str(tmp_path / "reg"), "max_catch_up": 2}
    spec = parse_spec(tiny_spec_dict)
    clock = FakeClock(at(20, 3))
    ran, seen_locked = [], []

    def run_one(day):
        lock = CycleLock(storage.join(spec.nightly_dir, "LOCK"), dt.timedelta(hours=1), clock)
        lock.owner = "intruder:9"
        with pytest.raises(LockHeld):  # a second scheduler cannot start a cycle meanwhile
            lock.acquire()
        seen_locked.append(day)
        ran.append(day)
        storage.atomic_write_json(nightly.cycle_path(spec, day), {"date": day.isoformat()})

    first = nightly.run_scheduler(spec, run_one, clock=clock, once=True)
    assert first == [dt.date(2026, 11, 19)]  # nothing done before: only last night
    clock.now = at(24, 3)  # down for three nights
    assert nightly.run_scheduler(spec, run_one, clock=clock, once=True) == [dt.date(2026, 11, 22), dt.date(2026, 11, 23)]
    assert nightly.run_scheduler(spec, run_one, clock=clock, once=True) == []  # caught up: nothing twice
    assert seen_locked == ran


def test_scheduler_sleeps_until_the_next_fire(tmp_path, tiny_spec_dict):
    from pipeline import nightly
    from pipeline.spec import parse_spec

    tiny_spec_dict["schedule"] = {"registry": str(tmp_path / "reg")}
    spec = parse_spec(tiny_spec_dict)
    clock = FakeClock(at(20, 1))
    storage.atomic_write_json(nightly.cycle_path(spec, dt.date(2026, 11, 19)), {})
    slept = []

    class Stop(Exception):
        pass

    def sleep(seconds):
        slept.append(seconds)
        raise Stop

    with pytest.raises(Stop):
        nightly.run_scheduler(spec, lambda day: None, clock=clock, sleep=sleep)
    assert slept == [90 * 60]  # 01:00 -> 02:30


def test_dry_run_lists_what_would_run(tmp_path, tiny_spec_dict, capsys):
    import yaml

    from pipeline.cli import main

    tiny_spec_dict["schedule"] = {"registry": str(tmp_path / "reg"), "window_days": 2}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict))
    assert main(["schedule", str(path), "--dry-run", "--from", "2026-11-10", "--to", "2026-11-11"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["2026-11-10T02:30:00+00:00  evaluate 2026-11-09  train 2026-11-07..2026-11-08  would run",
                     "2026-11-11T02:30:00+00:00  evaluate 2026-11-10  train 2026-11-08..2026-11-09  would run"]
    assert main(["schedule", str(path), "--dry-run"]) == 2  # --from/--to are required for a dry run


def test_registry_commands(tmp_path, tiny_spec_dict, capsys):
    import yaml

    from pipeline import registry
    from pipeline.cli import main

    root = str(tmp_path / "reg")
    tiny_spec_dict["schedule"] = {"registry": root}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict))
    import hashlib

    parity = {"passed": True, "variants": {"onnx": {"passed": True, "file": "onnx/model.onnx",
                                                    "sha256": hashlib.sha256(b"graph").hexdigest()}}}
    for version in ("2026-11-01-a", "2026-11-02-a"):
        registry.publish(root, "tiny", version, {"model.pt": b"w", "onnx/model.onnx": b"graph"},
                         {"metrics": {"auc": 0.7}, "parity": parity})
    assert main(["registry", str(path), "promote", "2026-11-01-a"]) == 0
    assert main(["registry", str(path), "promote", "2026-11-02-a"]) == 0
    capsys.readouterr()
    assert main(["registry", str(path), "list"]) == 0
    assert capsys.readouterr().out.splitlines() == ["  2026-11-01-a", "* 2026-11-02-a"]
    assert main(["registry", str(path), "rollback"]) == 0
    assert registry.current(root, "tiny") == "2026-11-01-a"
    assert main(["registry", str(path), "show", "nope"]) == 2
    assert main(["registry", str(path), "show", "2026-11-01-a"]) == 0
    assert '"auc": 0.7' in capsys.readouterr().out
