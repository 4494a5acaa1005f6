"""A lock on a run or nightly directory: one `distill run`, `nightly` or submitted job at a time per directory.

`<dir>/_LOCK` holds who has it (user, host, pid, command, start time and an expiry the holder renews). It is
created with an exclusive create (`storage.create_exclusive`: O_EXCL locally, a conditional PUT on S3), so of
two processes started together exactly one gets it; the other stops with exit 2, naming the holder. A lock
whose holder is gone is taken over with a warning: a dead pid on this host, or, from another host (which
cannot see the pid), an expiry the holder stopped renewing. Released on every exit path, crashes aside (which
the staleness rule covers). Pure: no Ray.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import socket
import sys
import threading

from pipeline import storage
from pipeline.errors import UserError

log = logging.getLogger(__name__)
LOCK_FILE = "_LOCK"
TTL = dt.timedelta(minutes=30)  # a holder renews every TTL / 3: one that stops for longer is presumed gone


class DirectoryLocked(UserError):
    """Another process runs on this directory."""


class RunLock:
    """`with RunLock(directory):` holds `<directory>/_LOCK` for the block."""

    def __init__(self, directory: str, ttl: dt.timedelta = TTL, clock=None):
        self.path, self.ttl = storage.join(directory, LOCK_FILE), ttl
        self.clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
        self.me = {"user": getpass.getuser(), "host": socket.gethostname(), "pid": os.getpid(),
                   "command": " ".join(sys.argv)[:300]}
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.took_over = False  # from a dead or expired holder (which may have left temporary files)

    def _record(self, started: str) -> bytes:
        expires = (self.clock() + self.ttl).isoformat(timespec="seconds")
        return json.dumps(self.me | {"started": started, "expires": expires}).encode()

    def acquire(self) -> None:
        self.started = self.clock().isoformat(timespec="seconds")
        if storage.create_exclusive(self.path, self._record(self.started)):
            return self._start_renewing()
        held = self.holder()
        reason = stale_reason(held, self.clock()) if held else "it vanished"
        if reason is None:
            raise DirectoryLocked(f"{os.path.dirname(self.path) or '.'} is in use by {describe(held)} (lock "
                                  f"{self.path}); wait for it to finish, or give this run another "
                                  "output.run_name. If that process is gone, its lock expires at "
                                  f"{held['expires']}")
        log.warning("taking over the lock %s from %s: %s", self.path, describe(held), reason)
        storage.remove_tree(self.path)
        if not storage.create_exclusive(self.path, self._record(self.started)):  # someone else took it first
            raise DirectoryLocked(f"{self.path} was taken over by {describe(self.holder() or {})} first")
        self.took_over = True
        # A holder that died without releasing may have died mid-write: its temporary files are orphans now.
        removed = storage.remove_temporary_files(os.path.dirname(self.path))
        if removed:
            log.warning("removed %d temporary file(s) the dead holder left: %s", len(removed), ", ".join(removed[:5]))
        self._start_renewing()

    def holder(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.path))
        except (FileNotFoundError, json.JSONDecodeError, UserError):
            return None

    def release(self) -> None:
        self._stop.set()
        if self._renewer:
            self._renewer.join(timeout=5)
        held = self.holder()
        if held and (held.get("host"), held.get("pid")) == (self.me["host"], self.me["pid"]):
            storage.remove_tree(self.path)

    def _start_renewing(self) -> None:
        def renew() -> None:
            while not self._stop.wait(self.ttl.total_seconds() / 3):
                storage.atomic_write_bytes(self.path, self._record(self.started))

        self._renewer = threading.Thread(target=renew, name="run-lock-renewer", daemon=True)
        self._renewer.start()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def stale_reason(held: dict, now: dt.datetime) -> str | None:
    """Why the holder is gone (its pid is dead on this host, or it stopped renewing), or None if it may be alive."""
    if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", 0))):
        return f"process {held.get('pid')} is no longer running on this host"
    expires = held.get("expires")
    if expires and dt.datetime.fromisoformat(expires) < now:
        return f"it expired at {expires} without being renewed"
    return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def describe(held: dict) -> str:
    return (f"{held.get('user', '?')}@{held.get('host', '?')} pid {held.get('pid', '?')} since "
            f"{held.get('started', '?')} ({held.get('command', '')!r})")
