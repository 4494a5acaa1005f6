"""Schedule rules with a fake clock: due dates, bounded catch-up in order, no overlapping cycles."""

from __future__ import annotations

import datetime as dt

import pytest

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
