"""A quiet console for `distill run` and `distill nightly`: our own lines on the terminal, Ray's in files.

Ray, Ray Data and Ray Train print hundreds of KB per run (progress bars, execution plans, the token-auth notice,
C++ core-worker lines) straight to the process's stderr, some of it from C++, which no Python logging setting
reaches. So for the length of a run, file descriptor 2 itself points at `<run_dir>/logs/stderr.log`; our
warnings and errors still reach the terminal through a handler on the original stderr, and our own `print`s
(stage lines, the gate, the final table) go to stdout as before. Workers' output stays in Ray's session logs
(`log_to_driver` off, see `runtime.ray_session`). `--verbose` keeps everything on the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

from pipeline import storage

LOG_DIR = "logs"
_quiet = False


def is_quiet() -> bool:
    """Whether a quiet console is in effect (then Ray is started without forwarding worker output)."""
    return _quiet


@contextlib.contextmanager
def quiet_console(run_dir: str, verbose: bool = False):
    """Sends everything written to stderr (Ray's logs and progress bars, C++ lines, INFO logs) to
    `<run_dir>/logs/stderr.log` for the block, keeping WARNING and above of Python logging on the terminal.
    A remote run_dir gets the file copied there at the end."""
    global _quiet
    if verbose or _quiet:
        yield
        return
    path, copy_to = _log_file(run_dir)
    sys.stderr.flush()
    terminal = os.dup(2)
    terminal_stream = os.fdopen(os.dup(terminal), "w", buffering=1)
    warnings_here = logging.StreamHandler(terminal_stream)
    warnings_here.setLevel(logging.WARNING)
    warnings_here.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    with open(path, "ab", buffering=0) as log_file:
        os.dup2(log_file.fileno(), 2)
        logging.getLogger().addHandler(warnings_here)
        _quiet = True
        try:
            yield path
        finally:
            _quiet = False
            logging.getLogger().removeHandler(warnings_here)
            sys.stderr.flush()
            os.dup2(terminal, 2)
            os.close(terminal)
            terminal_stream.close()
            if copy_to:
                _copy_log(path, copy_to)


def _log_file(run_dir: str) -> tuple[str, str | None]:
    """(local log file, where to copy it at the end or None). A remote run_dir, or one that cannot be
    written (the run itself then stops with the writability check's message), logs to a temporary folder."""
    if not storage.is_remote(run_dir):
        try:
            os.makedirs(os.path.join(run_dir, LOG_DIR), exist_ok=True)
            return os.path.join(run_dir, LOG_DIR, "stderr.log"), None
        except OSError:
            return os.path.join(tempfile.mkdtemp(prefix="distill-logs-"), "stderr.log"), None
    return os.path.join(tempfile.mkdtemp(prefix="distill-logs-"), "stderr.log"), storage.join(run_dir, LOG_DIR,
                                                                                                "stderr.log")


def _copy_log(path: str, uri: str) -> None:
    try:
        with open(path, "rb") as handle:
            storage.atomic_write_bytes(uri, handle.read())
    except Exception as exc:  # the logs must never mask the run's own outcome
        logging.getLogger(__name__).warning("could not copy the run's log to %s: %s (it is at %s)", uri, exc, path)
