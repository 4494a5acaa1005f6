"""One filesystem helper for local paths and `s3://` URIs, with atomic writes.

Atomic: a reader sees either the old file or the complete new one, never a half-written file.
Locally that is write-to-temp then `os.replace`; on S3 a single PUT is already atomic. A local write
that fails for a reason the user must fix (disk full, read-only or not permitted) raises a `UserError`
naming the path, and leaves neither the destination half-written nor the temporary file behind.

S3 goes through s3fs, configured in one place (`runtime.configure_storage`, from the spec's `storage` section).
The settings live in environment variables, not module globals, because Ray workers are other
processes: `worker_env()` is what a Ray job hands them. Credentials are never settings here: they
come from the standard AWS environment (`AWS_ACCESS_KEY_ID`, a profile, an IAM role), so they
appear in no spec, manifest, Ray task argument or message.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any

import fsspec
import pyarrow.fs as pafs
from botocore import exceptions as boto

from pipeline.errors import DataError, UserError
from pipeline.write_errors import local_write_errors, write_error  # noqa: F401 (storage.write_error too)

# Spec field -> environment variable that carries it to every process (driver and Ray workers).
SETTINGS_ENV = {"endpoint_url": "DISTILL_S3_ENDPOINT_URL", "region": "DISTILL_S3_REGION", "profile": "AWS_PROFILE"}
TEMPORARY_PREFIX = ".tmp-"  # an atomic write's file before its rename; never complete data
# A wrong endpoint must fail in seconds, not hang: short connect timeout, few retries (AWS "standard" mode).
_BOTO_CONFIG = {"connect_timeout": 5, "retries": {"max_attempts": 3, "mode": "standard"}}
# Error codes S3 answers when the credentials are missing, wrong or not allowed.
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId",
           "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


def worker_env() -> dict[str, str]:
    """The S3 settings as env vars for Ray's `runtime_env` (non-secret by construction)."""
    return {var: os.environ[var] for var in SETTINGS_ENV.values() if os.environ.get(var)}


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it for `uri`."""
    fs, path = fsspec.core.url_to_fs(uri, **(_s3_options() if is_s3(uri) else {}))
    return fs, path


def _s3_options() -> dict:
    """s3fs arguments from the settings; botocore finds the credentials itself."""
    client = {"endpoint_url": os.environ.get(SETTINGS_ENV["endpoint_url"]),
              "region_name": os.environ.get(SETTINGS_ENV["region"])}
    return {
        "client_kwargs": {k: v for k, v in client.items() if v},
        "profile": os.environ.get(SETTINGS_ENV["profile"]) or None,
        "config_kwargs": _BOTO_CONFIG,
        # Ray workers write to the same prefixes: a cached listing here would go stale.
        "use_listings_cache": False,
    }


def arrow_filesystem(uri: str):
    """A pyarrow filesystem for Ray Data and Ray Train, or None for a local path (they resolve it).

    pyarrow's own S3 ignores `DISTILL_S3_ENDPOINT_URL` and friends, so S3 is the same s3fs wrapped
    for pyarrow; it pickles its settings (never credentials) to the Ray workers.
    """
    if not is_remote(uri):
        return None
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem(uri)[0]))


def arrow_paths(uris: list[str]) -> tuple[list[str], Any]:
    """`uris` (all on one filesystem) as (paths inside it, `arrow_filesystem`) for Ray Data and Ray Train."""
    return [filesystem(u)[1] for u in uris], arrow_filesystem(uris[0])


@contextlib.contextmanager
def s3_errors(uri: str):
    """Turns S3 failures into a `DataError` that names the URI and what to fix.

    Messages are built here, never copied from botocore or the server, so no credential or
    request detail can leak into them.
    """
    if not is_s3(uri):
        yield
        return
    try:
        yield
    except DataError:
        raise
    except Exception as exc:
        message = _explain(exc, uri)
        if message is None:
            raise
        raise DataError(message) from exc


def _explain(exc: BaseException, uri: str) -> str | None:
    code = _error_code(exc)
    bucket = _bucket(uri)
    if code == "NoSuchBucket":
        return _no_bucket(bucket, uri)
    if code in _DENIED or isinstance(exc, PermissionError):
        return (f"access denied to {uri} (S3 error {code or 'AccessDenied'}); check the AWS credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or storage.profile, or the IAM role) "
                f"and that they may read and write bucket {bucket!r}")
    if isinstance(exc, boto.NoCredentialsError):
        return (f"no AWS credentials found for {uri}; export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or set AWS_PROFILE (or storage.profile), or run where an IAM role applies")
    if isinstance(exc, boto.ProfileNotFound):
        return (f"AWS profile {os.environ.get(SETTINGS_ENV['profile'])!r} not found (for {uri}); "
                "fix storage.profile or AWS_PROFILE, or add the profile to ~/.aws/config")
    if isinstance(exc, boto.ConnectionError):  # refused, timed out, TLS, proxy
        endpoint = os.environ.get(SETTINGS_ENV["endpoint_url"])
        where = f"the S3 endpoint {endpoint}" if endpoint else "AWS S3 (no storage.endpoint_url set)"
        return (f"cannot reach {where} for {uri}; check storage.endpoint_url (or DISTILL_S3_ENDPOINT_URL), "
                "the network, and that the server is up")
    return None


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore `ClientError` anywhere in the exception's chain."""
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            return str(code) if code else None
        exc = exc.__cause__ or exc.__context__
    return None


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[1].split("/", 1)[0]


def _no_bucket(bucket: str, uri: str) -> str:
    endpoint = os.environ.get(SETTINGS_ENV["endpoint_url"])
    where = f" at {endpoint}" if endpoint else ""
    return (f"S3 bucket {bucket!r}{where} does not exist (for {uri}); check the URI and storage.endpoint_url, "
            "or create the bucket (the pipeline never creates buckets)")


def _require_bucket(fs, uri: str) -> None:
    """Raises `DataError` when the bucket of `uri` is missing: the usual cause of 'not found' on S3."""
    try:
        fs.call_s3("head_bucket", Bucket=_bucket(uri))
    except FileNotFoundError:
        raise DataError(_no_bucket(_bucket(uri), uri)) from None


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    """True when `uri` exists; on S3 a missing bucket is a `DataError`, not False."""
    fs, path = filesystem(uri)
    with s3_errors(uri):
        if fs.exists(path):
            return True
        if is_s3(uri):
            _require_bucket(fs, uri)  # s3fs says False for a missing bucket too: tell them apart
        return False


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with s3_errors(uri), fs.open(path, "rb") as handle:
        return handle.read()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def atomic_write_bytes(uri: str, data: bytes) -> None:
    """Writes `data` to `uri` atomically; a disk-full or permission failure is a `UserError` naming `uri`."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        with s3_errors(uri):
            fs.pipe_file(path, data)  # one PUT: atomic on S3
        return
    with local_write_errors(uri):
        directory = os.path.dirname(os.path.abspath(uri))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMPORARY_PREFIX, suffix=os.path.basename(uri))
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())  # disk full shows here at the latest, before the rename
            os.replace(tmp, uri)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # never leave a partial temp file next to the destination
            raise


def remove_temporary_files(uri: str) -> list[str]:
    """Deletes the temporary files `atomic_write_bytes` left under `uri` (recursively) when its process was
    killed between writing and renaming; returns their paths. Only for a directory's lock holder: a live
    writer's temporary file would go too. Local only: an S3 write is one PUT and leaves none."""
    if is_remote(uri) or not os.path.isdir(uri):
        return []
    removed = []
    for directory, _, files in os.walk(uri):
        for name in files:
            if name.startswith(TEMPORARY_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
                    removed.append(os.path.join(directory, name))
    return removed


def create_exclusive(uri: str, data: bytes) -> bool:
    """Writes `data` to `uri` only if nothing is there; False if something is. Local: O_CREAT | O_EXCL (then
    the bytes, fsynced). S3: one PUT with If-None-Match: * (AWS S3 since 2024, MinIO, moto); a store that ignores
    the condition makes this a plain write, so two writers at the same instant could both think they won."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        with s3_errors(uri):
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:  # s3fs's name for 412 PreconditionFailed on If-None-Match
                return False
        return True
    with local_write_errors(uri):
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        try:
            fd = os.open(uri, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True


def check_writable(uri: str, setting: str = "output.root") -> None:
    """Fails fast, before any work, when `uri` (created if missing) cannot take a new file.

    Writes and removes a small probe file, so a read-only mount, missing permissions, a path under a
    regular file or a full disk are reported now, naming `uri` and the spec field to change.
    """
    probe = join(uri, f".write-probe-{os.getpid()}")
    if is_remote(uri):
        fs, path = filesystem(probe)
        with s3_errors(uri):
            fs.pipe_file(path, b"probe")
            fs.rm(path)
        return
    try:
        os.makedirs(uri, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"probe")
            handle.flush()
            os.fsync(handle.fileno())
        os.unlink(probe)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise UserError(f"output directory {uri} is not writable: {reason}; fix its permissions or set "
                        f"{setting} to a writable location") from exc


def atomic_write_json(uri: str, payload: Any) -> None:
    """Writes strict JSON: an undefined number (the AUC of a slice without clicks is NaN) is written as null,
    because NaN and Infinity are not JSON and strict parsers (browsers, jq, Java) refuse them."""
    # Keys stay in the order they were made: a report rebuilt from metrics.json lists models as the run did.
    text = json.dumps(_strict_json(payload), indent=2, default=str, allow_nan=False)
    atomic_write_bytes(uri, (text + "\n").encode())


def _strict_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


def atomic_write_text(uri: str, text: str) -> None:
    atomic_write_bytes(uri, text.encode())


def remove_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    if exists(uri):
        with s3_errors(uri):
            fs.rm(path, recursive=True)


def list_dir(uri: str) -> list[str]:
    """Base names directly under `uri` (empty if it does not exist)."""
    fs, path = filesystem(uri)
    if not exists(uri):
        return []
    with s3_errors(uri):
        return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def list_files(uri: str, suffix: str | tuple[str, ...] = ".parquet") -> list[str]:
    """Files under `uri` (recursively) ending in `suffix`, as URIs of the same scheme, sorted.

    Hidden and temporary files (a leading `.` or `_`) are skipped: they are never complete data.
    """
    fs, path = filesystem(uri)
    if not exists(uri):
        return []
    prefix = uri[: uri.index("://") + 3] if is_remote(uri) else ""
    with s3_errors(uri):
        found = fs.find(path) if fs.isdir(path) else [path]
    keep = [f for f in found if f.endswith(suffix) and not os.path.basename(f).startswith((".", "_"))]
    return sorted(prefix + f for f in keep)


def file_version(uri: str) -> dict:
    """What identifies a file's content without reading it: name, size, and modification time (local) or
    ETag (S3)."""
    fs, path = filesystem(uri)
    with s3_errors(uri):
        info = fs.info(path)
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return {"name": uri.rsplit("/", 1)[-1], "size": info["size"], "version": str(version)}


def version(uri: str) -> str:
    """`file_version` as one string (a cache key)."""
    info = file_version(uri)
    return f"{info['size']}:{info['version']}"
