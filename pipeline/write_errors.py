"""Local writes that fail for a reason the user must fix (disk full, read-only, not permitted) as a
`UserError` naming the path and what to do, instead of a traceback from deep inside a stage."""

from __future__ import annotations

import contextlib
import errno
import os

from pipeline.errors import UserError

# Local write failures that are the disk's or the permissions' fault, not the code's, and what to do about them.
_FULL, _DENIED_HERE = "free space on that disk", "fix the directory's permissions"
_WRITE_FIXES = {errno.ENOSPC: _FULL, errno.EDQUOT: _FULL, errno.EROFS: "remount it read-write",
                errno.EACCES: _DENIED_HERE, errno.EPERM: _DENIED_HERE}


@contextlib.contextmanager
def local_write_errors(uri: str):
    """Turns a local write failing for lack of space or permission into a `UserError` naming `uri`."""
    try:
        yield
    except OSError as exc:
        error = write_error(exc, uri)
        if error is None:
            raise
        raise error from exc


def write_error(exc: BaseException, uri: str) -> UserError | None:
    """A `UserError` naming `uri` when `exc`, or an error it wraps (a Ray task's `cause`, a chained
    exception), is a disk-full or permission failure; None for any other error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _WRITE_FIXES:
            return UserError(f"cannot write {uri}: {os.strerror(exc.errno).lower()}; {_WRITE_FIXES[exc.errno]}, "
                             "or write somewhere else (output.root, schedule.registry)")
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None
