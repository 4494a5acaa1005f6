"""When nightly cycles run: due dates from the spec's cron (croniter), bounded catch-up, and a lock
that a crashed holder cannot keep forever. Pure logic with an injectable clock; no Ray.

A fire at time F processes the click log of the day before F's local date (last night's partition).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import zoneinfo

from croniter import croniter

from pipeline import storage
from pipeline.errors import UserError


def fire_times(cron: str, timezone: str, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """Fire times in (start, end], as aware datetimes in `timezone`."""
    tz = zoneinfo.ZoneInfo(timezone)
    times, it = [], croniter(cron, start.astimezone(tz))
    while (fire := it.get_next(dt.datetime)) <= end.astimezone(tz):
        times.append(fire)
    return times


def data_date(fire: dt.datetime) -> dt.date:
    """The day whose partition a fire processes: yesterday, in the schedule's own time zone."""
    return fire.date() - dt.timedelta(days=1)


def due_dates(cron: str, timezone: str, last_done: dt.date | None, now: dt.datetime,
              max_catch_up: int) -> tuple[list[dt.date], list[dt.date]]:
    """Dates to run now, oldest first, and the missed dates skipped beyond `max_catch_up`.

    After downtime every fire since the last finished date is due, in order, but at most the newest
    `max_catch_up` of them: a week-long outage should not queue a week of cycles.
    """
    since = (dt.datetime.combine(last_done + dt.timedelta(days=1), dt.time(), tzinfo=now.tzinfo)
             if last_done else now - dt.timedelta(days=1))
    dates = sorted({data_date(f) for f in fire_times(cron, timezone, since, now)})
    dates = [d for d in dates if last_done is None or d > last_done]
    return dates[-max_catch_up:] if max_catch_up else [], dates[:-max_catch_up] if max_catch_up else dates


class LockHeld(UserError):
    """Another cycle is running."""


class CycleLock:
    """A lock file with an expiry: held while a cycle runs, taken over once the holder stops renewing.

    A crashed holder stops renewing, so after `ttl` the next scheduler takes over instead of waiting forever.
    """

    def __init__(self, path: str, ttl: dt.timedelta, clock=lambda: dt.datetime.now(dt.timezone.utc)):
        self.path, self.ttl, self.clock = path, ttl, clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}"

    def acquire(self) -> None:
        held = self._read()
        if held and held["owner"] != self.owner and dt.datetime.fromisoformat(held["expires"]) > self.clock():
            raise LockHeld(f"a cycle is already running ({held['owner']}, lock {self.path} until {held['expires']}); "
                           "it will not be started twice")
        self.renew()

    def renew(self) -> None:
        expires = (self.clock() + self.ttl).isoformat()
        storage.atomic_write_text(self.path, json.dumps({"owner": self.owner, "expires": expires}))

    def release(self) -> None:
        held = self._read()
        if held and held["owner"] == self.owner:
            storage.remove_tree(self.path)

    def _read(self) -> dict | None:
        return json.loads(storage.read_bytes(self.path)) if storage.exists(self.path) else None

    def __enter__(self) -> CycleLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
