"""Run a job spec on a Ray cluster through the Ray Jobs API (what `ray job submit` does), and follow it.

`distill submit` validates and resolves the spec here, copies the project's code (no data, runs or
environments) into a temporary directory with the resolved spec as `job-spec.yaml`, and uploads that
directory as the job's `working_dir`. The entrypoint `python -m pipeline run job-spec.yaml` runs that
uploaded code, so the cluster's image needs the project's dependencies but not this package.

Address: `--address`, else `RAY_API_SERVER_ADDRESS`, else `RAY_ADDRESS`, else http://127.0.0.1:8265.
Token (clusters with token authentication): `RAY_AUTH_TOKEN`, else the file named by
`RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`: Ray's own order. It is sent as an
`Authorization: Bearer` header and never printed; `RAY_AUTH_MODE=disabled` sends none.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

import pipeline
from pipeline.errors import UserError
from pipeline.spec import JobSpec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SPEC_FILE = "job-spec.yaml"
ENTRYPOINT = f"python -m pipeline run {SPEC_FILE}"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Not code: never uploaded. Root-only names, since `pipeline/data/` is a package.
ROOT_EXCLUDES = frozenset({".venv", "venv", ".git", "data", "runs", "build", "dist", ".pytest_cache",
                           ".hypothesis", ".mypy_cache", ".ruff_cache", SPEC_FILE})
EXCLUDES = frozenset({"__pycache__", ".DS_Store"})
# Credentials, at any depth: never uploaded, whatever a project holds. Names matched with fnmatch.
SECRETS = (".env", ".env.*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "id_rsa*",
           "id_dsa*", "id_ecdsa*", "id_ed25519*", ".netrc", ".pypirc", ".npmrc", ".git-credentials", "credentials",
           "credentials.*", "*credentials*.json", "service-account*.json", "*.kdbx", ".htpasswd")
SECRET_DIRS = frozenset({".aws", ".ssh", ".gnupg", ".kube", ".docker", ".azure", ".config"})
IGNORE_FILE = ".distillignore"  # more patterns, one per line (fnmatch, against the path or the name; # comments)
MiB = 2**20
# Job logs are a file, not a terminal: Ray Data's redrawn progress bars would be most of them.
JOB_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


class ClusterError(UserError):
    """The cluster cannot be reached, refused the request, or failed it."""


class ClusterAuthError(ClusterError):
    """The cluster wants a token we do not have, or refused the one we sent."""


class JobNotFound(ClusterError):
    """The cluster has no job with that id."""


@dataclasses.dataclass(frozen=True)
class Token:
    value: str = dataclasses.field(repr=False)
    source: str  # where it came from, for messages: the token itself is never printed


def resolve_address(address: str | None) -> tuple[str, str]:
    """The Jobs API URL and where it came from (`--address`, an env variable, or the default)."""
    candidates = ((address, "--address"), (os.environ.get("RAY_API_SERVER_ADDRESS"), "RAY_API_SERVER_ADDRESS"),
                  (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS"), (DEFAULT_ADDRESS, "the default"))
    value, source = next((v.strip().rstrip("/"), s) for v, s in candidates if v and v.strip())
    return (value if "://" in value else f"http://{value}"), source


def find_token() -> Token | None:
    """The cluster token, looked up where Ray looks; None when there is none or auth is disabled."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            return Token(Path(path).expanduser().read_text().strip(), f"RAY_AUTH_TOKEN_PATH={path}")
        except OSError as exc:
            raise ClusterAuthError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({exc.strerror}); fix the "
                                   "path or unset it") from None
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and (value := default.read_text().strip()):
        return Token(value, str(default))
    return None


def connect(address: str | None = None, timeout_s: float = 10.0):
    """A `JobSubmissionClient` for the cluster, after a bounded check that it answers and accepts us.

    Raises:
        ClusterError: no answer within `timeout_s`, not a Ray dashboard, or the token is missing or wrong.
    """
    import requests  # lazy, with Ray's client below: only the cluster commands need them
    from ray.job_submission import JobSubmissionClient

    url, source = resolve_address(address)
    if not url.startswith(("http://", "https://")):
        raise ClusterError(f"{url} (from {source}) is not an http(s) URL; the Jobs API is served by the cluster's "
                           "dashboard, e.g. http://HOST:8265")
    token = find_token()
    headers = {"Authorization": f"Bearer {token.value}"} if token else {}
    where = f"the Ray dashboard at {url} (from {source})"
    try:  # The SDK has no timeouts: one bounded request first, so a dead address never hangs.
        reply = requests.get(f"{url}/api/version", headers=headers, timeout=timeout_s)
    except requests.exceptions.Timeout:
        raise ClusterError(f"{where} did not answer within {timeout_s:g}s; check the address and that the "
                           "cluster is up (--timeout waits longer)") from None
    except requests.exceptions.SSLError as exc:
        raise ClusterError(f"TLS handshake with {where} failed: {exc.__class__.__name__}") from None
    except requests.exceptions.RequestException:
        raise ClusterError(f"cannot connect to {where}: connection refused or host unreachable. Pass "
                           f"--address http://HOST:8265 or set RAY_ADDRESS (the Jobs API is served by the "
                           "dashboard, port 8265 by default, not the GCS port 6379)") from None
    _check_reply(reply, where, token)
    with _without_env("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"), _cluster_call(url):
        return JobSubmissionClient(url, headers=headers)  # Ray lets env vars override `url`: hide them


def _check_reply(reply, where: str, token: Token | None) -> None:
    if reply.status_code == 401:
        raise ClusterAuthError(
            f"{where} requires token authentication and no token was found; set RAY_AUTH_TOKEN, or "
            "RAY_AUTH_TOKEN_PATH to a file holding it, or write it to ~/.ray/auth_token (on the head "
            "node `ray get-auth-token` prints it)")
    if reply.status_code == 403:
        raise ClusterAuthError(f"{where} refused the token from {token.source if token else '?'}: it is not "
                               "this cluster's token; set RAY_AUTH_TOKEN to the right one")
    try:
        reply.json()["ray_version"]
    except (ValueError, KeyError, TypeError):
        raise ClusterError(f"{where} answered HTTP {reply.status_code} but is not a Ray dashboard; check the "
                           "host and port (the dashboard's, 8265 by default)") from None


@contextlib.contextmanager
def _without_env(*names: str):
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _cluster_call(url: str, job_id: str | None = None):
    """Turns the SDK's errors (RuntimeError with the HTTP status, ConnectionError) into user errors."""
    from ray.exceptions import AuthenticationError  # lazy: importing Ray takes seconds

    try:
        yield
    except AuthenticationError:
        raise ClusterAuthError(f"{url} refused our token (missing or wrong); see RAY_AUTH_TOKEN") from None
    except (RuntimeError, ConnectionError, OSError) as exc:
        text = str(exc)
        if job_id and "status code 404" in text:
            raise JobNotFound(f"no job {job_id!r} on {url}; `distill jobs` lists the cluster's jobs") from None
        raise ClusterError(f"{url}: {text}") from None


def stage_working_dir(spec: JobSpec, dest: Path, source: str = "", root: Path | None = None) -> Path:
    """Copies the project's code to `dest` and writes the resolved spec there as `job-spec.yaml`: never data,
    runs, environments, `.git`, credentials (SECRETS, SECRET_DIRS) or what `.distillignore` names.

    `root`: the project to ship (default: the checkout this package runs from)."""
    package = Path(pipeline.__file__).resolve().parent
    root = root or package.parent
    if (root / "pyproject.toml").is_file():  # a checkout: ship it minus data, runs and environments
        shutil.copytree(root, dest, ignore=_ignore_for(root))
    else:  # an installed package: ship the package alone
        shutil.copytree(package, dest / package.name, ignore=_ignore_for(root))
    (dest / SPEC_FILE).write_text(resolved_spec_yaml(spec, source))
    return dest


def _ignore_for(root: Path):
    patterns = _ignore_patterns(root / IGNORE_FILE)

    def ignore(directory: str, names: list[str]) -> set[str]:
        here = Path(directory)
        skipped = {n for n in names if n in EXCLUDES or n.endswith((".pyc", ".egg-info")) or n in SECRET_DIRS
                   or any(fnmatch.fnmatch(n, p) for p in SECRETS)}
        skipped |= {n for n in names if _ignored(here / n, root, patterns)}
        return skipped | (ROOT_EXCLUDES & set(names) if here == root else set())

    return ignore


def _ignore_patterns(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line.rstrip("/") for line in lines if line and not line.startswith("#")]


def _ignored(path: Path, root: Path, patterns: list[str]) -> bool:
    relative = path.relative_to(root).as_posix()
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(path.name, p) for p in patterns)


def check_upload(staged: Path, max_upload_mb: float | None = None) -> tuple[int, int]:
    """(files, bytes) of the staged working_dir; raises UserError above `max_upload_mb`, or above Ray's own
    limit on a working_dir package (its gRPC message size, 512 MiB: counted uncompressed here, so this errs
    on the safe side), naming the largest files and `.distillignore`."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    sizes = {p: p.stat().st_size for p in staged.rglob("*") if p.is_file()}
    total = sum(sizes.values())
    limit = min(GCS_STORAGE_MAX_SIZE, max_upload_mb * MiB) if max_upload_mb else GCS_STORAGE_MAX_SIZE
    if total > limit:
        largest = sorted(sizes, key=sizes.get, reverse=True)[:3]
        named = ", ".join(f"{p.relative_to(staged)} ({sizes[p] / MiB:.1f} MB)" for p in largest)
        why = "--max-upload-mb" if max_upload_mb and max_upload_mb * MiB < GCS_STORAGE_MAX_SIZE else "Ray's limit"
        raise UserError(f"the upload would be {total / MiB:.1f} MB, above {limit / MiB:.0f} MB ({why}); the largest "
                        f"files: {named}. Name what the job does not need in {IGNORE_FILE} (one pattern a line), "
                        "or keep data on shared storage or s3://")
    return len(sizes), total


def resolved_spec_yaml(spec: JobSpec, source: str = "") -> str:
    """The spec as the job will run it; `ray.address: auto` joins the cluster the job runs on."""
    raw = spec.model_dump(mode="json")
    raw["ray"]["address"] = "auto"
    header = f"# Resolved by `distill submit` from {source or 'a spec'}; the job runs: {ENTRYPOINT}\n"
    return header + yaml.safe_dump(raw, sort_keys=False)


def submit_warnings(spec: JobSpec) -> list[str]:
    """What means something else on a cluster: relative paths (inside the job's temporary working directory)
    and the `ray` section (the job joins the cluster it was submitted to)."""
    paths = {"data.path": spec.data.path, "output.root": spec.output.root, "teacher.checkpoint": spec.teacher[0].checkpoint}
    warnings = [f"{field} {value!r} is relative: on the cluster it resolves inside the job's temporary working "
                "directory; use an absolute path on shared storage or an s3:// URI"
                for field, value in paths.items() if value and "://" not in value and not Path(value).is_absolute()]
    for field, value in (("ray.address", spec.ray.address), ("ray.num_cpus", spec.ray.num_cpus)):
        if value is not None:
            warnings.append(f"{field} {value!r} is ignored: the job joins the cluster it is submitted to")
    return warnings


def submit(client, spec: JobSpec, source: str = "", command: str = "run", max_upload_mb: float | None = None) -> str:
    """Uploads the staged project and starts `distill <command> job-spec.yaml` (e.g. "run", or
    "nightly job-spec.yaml --date D" given as "nightly --date D"); returns the submission id."""
    job_id = f"distill-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    metadata = {"distill_spec": spec.name, "distill_run_dir": spec.run_dir, "distill_spec_hash": spec.fingerprint()}
    with tempfile.TemporaryDirectory(prefix="distill-submit-") as tmp:
        working_dir = stage_working_dir(spec, Path(tmp) / "job", source)
        files, size = check_upload(working_dir, max_upload_mb)
        print(f"uploading the working_dir: {files} files, {size / MiB:.1f} MB (no data, runs, environments or "
              f"credentials; more exclusions in {IGNORE_FILE})", flush=True)
        with _cluster_call(client.get_address()):
            verb, _, extra = command.partition(" ")
            entrypoint = f"python -m pipeline {verb} {SPEC_FILE}" + (f" {extra}" if extra else "")
            return client.submit_job(entrypoint=entrypoint, submission_id=job_id, metadata=metadata,
                                     runtime_env={"working_dir": str(working_dir), "env_vars": JOB_ENV})


def job_info(client, job_id: str):
    """The job's `JobDetails` (status, message, times, metadata); `JobNotFound` for an unknown id."""
    with _cluster_call(client.get_address(), job_id):
        return client.get_job_info(job_id)


def job_logs(client, job_id: str) -> str:
    with _cluster_call(client.get_address(), job_id):
        return client.get_job_logs(job_id)


def list_jobs(client) -> list:
    with _cluster_call(client.get_address()):
        return sorted(client.list_jobs(), key=lambda job: job.start_time or 0)


def stop(client, job_id: str) -> bool:
    """Asks the cluster to stop the job; False when it had already ended."""
    job_info(client, job_id)  # a clear JobNotFound first
    with _cluster_call(client.get_address(), job_id):
        return client.stop_job(job_id)


def follow(client, job_id: str, out=None, poll_s: float = 1.0):
    """Prints the job's logs as they are written until it ends; returns its final `JobDetails`."""
    job_info(client, job_id)
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:  # noqa: BLE001 - the stream is a convenience; the status below is the truth
        print(f"(log stream interrupted: {exc.__class__.__name__}; waiting for the job to end)", file=sys.stderr)
    while (info := job_info(client, job_id)).status not in TERMINAL:
        time.sleep(poll_s)
    return info
