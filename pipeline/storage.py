"""One filesystem helper for local paths and `s3://` URIs, with atomic writes.

Atomic: a reader sees either the old file or the complete new one, never a half-written file.
Locally that is write-to-temp then `os.replace`; on S3 a single PUT is already atomic.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import fsspec


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it for `uri`."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return handle.read()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def atomic_write_bytes(uri: str, data: bytes) -> None:
    if is_remote(uri):
        fs, path = filesystem(uri)
        fs.pipe_file(path, data)  # one PUT: atomic on S3
        return
    directory = os.path.dirname(os.path.abspath(uri))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(uri))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, uri)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(uri: str, payload: Any) -> None:
    atomic_write_bytes(uri, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_text(uri: str, text: str) -> None:
    atomic_write_bytes(uri, text.encode())


def remove_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_dir(uri: str) -> list[str]:
    """Base names directly under `uri` (empty if it does not exist)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def list_files(uri: str, suffix: str = ".parquet") -> list[str]:
    """Files under `uri` (recursively) ending in `suffix`, as URIs of the same scheme, sorted.

    Hidden and temporary files (a leading `.` or `_`) are skipped: they are never complete data.
    """
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    prefix = uri[: uri.index("://") + 3] if is_remote(uri) else ""
    found = fs.find(path) if fs.isdir(path) else [path]
    keep = [f for f in found if f.endswith(suffix) and not os.path.basename(f).startswith((".", "_"))]
    return sorted(prefix + f for f in keep)
