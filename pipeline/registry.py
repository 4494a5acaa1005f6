"""Model registry on a local path or `s3://`: immutable versions plus an atomically replaced CURRENT.

Layout:
    <root>/<model>/versions/<id>/model.pt, spec.json, metrics.json, lineage.json, parity.json, MODEL_CARD.md,
                                 onnx/ (model.onnx, signature.json), torchscript/, ..., _COMPLETE
    <root>/<model>/CURRENT          the champion's version id (one small file, replaced atomically)
    <root>/<model>/HISTORY.json     every promotion and rollback, newest last

A version is visible only once `_COMPLETE` is written (last); CURRENT is switched only after that,
so a crash at any point leaves the old champion in place. CURRENT moves (promotion or rollback) only to a
version whose exports passed parity and whose files are still the ones checked (`parity.json` holds each
file's sha256). No Ray.
"""

from __future__ import annotations

import datetime as dt
import hashlib

from pipeline import storage
from pipeline.errors import UserError

COMPLETE = "_COMPLETE"
PARITY = "parity.json"  # {"passed", "variants": {variant: {"passed", "file", "sha256", ...}}}
CARD = "MODEL_CARD.md"


class RegistryError(UserError):
    """A registry operation the user asked for cannot be done (unknown version, nothing to roll back)."""


def _model_dir(root: str, model: str) -> str:
    return storage.join(root, model)


def version_dir(root: str, model: str, version: str) -> str:
    return storage.join(root, model, "versions", version)


def publish(root: str, model: str, version: str, files: dict[str, bytes], record: dict) -> str:
    """Writes a version (files first, `record` as metrics/lineage JSON, `_COMPLETE` last); idempotent."""
    directory = version_dir(root, model, version)
    if is_complete(root, model, version):
        return directory
    for name, data in files.items():
        storage.atomic_write_bytes(storage.join(directory, name), data)
    for name, payload in record.items():
        storage.atomic_write_json(storage.join(directory, f"{name}.json"), payload)
    storage.atomic_write_text(storage.join(directory, COMPLETE), _now() + "\n")
    return directory


def is_complete(root: str, model: str, version: str) -> bool:
    return storage.exists(storage.join(version_dir(root, model, version), COMPLETE))


def list_versions(root: str, model: str) -> list[str]:
    """Complete versions, oldest first (ids sort by date)."""
    names = storage.list_dir(storage.join(_model_dir(root, model), "versions"))
    return [v for v in names if is_complete(root, model, v)]


def current(root: str, model: str) -> str | None:
    path = storage.join(_model_dir(root, model), "CURRENT")
    return storage.read_bytes(path).decode().strip() if storage.exists(path) else None


def history(root: str, model: str) -> list[dict]:
    path = storage.join(_model_dir(root, model), "HISTORY.json")
    return storage.read_json(path) if storage.exists(path) else []


def promote(root: str, model: str, version: str, reason: str) -> None:
    """Makes `version` the champion: one atomic replace of CURRENT (a single PUT on S3)."""
    if not is_complete(root, model, version):
        known = ", ".join(list_versions(root, model)) or "none"
        raise RegistryError(f"version {version!r} of {model!r} is not in the registry at {root}; known: {known}")
    _require_parity(root, model, version)
    previous = current(root, model)
    if previous == version:
        return
    _append_history(root, model, {"action": "promote", "version": version, "previous": previous, "reason": reason})
    storage.atomic_write_text(storage.join(_model_dir(root, model), "CURRENT"), version + "\n")


def rollback(root: str, model: str, reason: str = "manual rollback") -> str:
    """Restores the champion that preceded the current one; returns its version id."""
    now = current(root, model)
    # The champion before `now` is the one its promotion replaced (rollbacks are not promotions).
    earlier = [e["previous"] for e in reversed(history(root, model))
               if e["action"] == "promote" and e["version"] == now and e["previous"]]
    if not earlier:
        raise RegistryError(f"{model!r} has no earlier champion to roll back to (CURRENT is {now!r})")
    target = earlier[0]
    _require_parity(root, model, target)
    _append_history(root, model, {"action": "rollback", "version": target, "previous": now, "reason": reason})
    storage.atomic_write_text(storage.join(_model_dir(root, model), "CURRENT"), target + "\n")
    return target


def export_problems(root: str, model: str, version: str) -> list[str]:
    """Why `version` may not serve: no parity record, a variant that failed parity, or a file that is missing
    or no longer the one checked (its sha256 differs). Empty when it may."""
    directory = version_dir(root, model, version)
    path = storage.join(directory, PARITY)
    if not storage.exists(path):
        return [f"it has no {PARITY} (no parity-checked export; versions published before exports have none)"]
    problems = []
    for variant, check in storage.read_json(path).get("variants", {}).items():
        file = storage.join(directory, check["file"])
        if not check.get("passed"):
            problems.append(f"its {variant} export failed parity ({check.get('error') or 'see ' + PARITY})")
        elif not storage.exists(file):
            problems.append(f"its {variant} file {check['file']} is missing")
        elif hashlib.sha256(storage.read_bytes(file)).hexdigest() != check["sha256"]:
            problems.append(f"its {variant} file {check['file']} is not the one parity checked (sha256 differs: "
                            "changed or corrupted after publishing)")
    return problems


def _require_parity(root: str, model: str, version: str) -> None:
    problems = export_problems(root, model, version)
    if problems:
        raise RegistryError(f"version {version!r} of {model!r} cannot become CURRENT: {'; '.join(problems)}")


def card(root: str, model: str, version: str) -> str | None:
    """The version's MODEL_CARD.md, or None when it has none."""
    path = storage.join(version_dir(root, model, version), CARD)
    return storage.read_bytes(path).decode() if storage.exists(path) else None


def show(root: str, model: str, version: str) -> dict:
    if not is_complete(root, model, version):
        raise RegistryError(f"version {version!r} of {model!r} is not in the registry at {root}")
    directory = version_dir(root, model, version)
    details = {"version": version, "path": directory, "current": current(root, model) == version}
    for name in storage.list_dir(directory):
        if name.endswith(".json"):
            details[name.removesuffix(".json")] = storage.read_json(storage.join(directory, name))
    return details


def _append_history(root: str, model: str, entry: dict) -> None:
    # History is written before CURRENT: a crash in between leaves a note, never a wrong champion. The rerun
    # that finishes the move replaces that note rather than adding a second one, so HISTORY stays one chain.
    entries = history(root, model)
    if entries and _move(entries[-1]) == _move(entry):
        entries = entries[:-1]
    entries = entries + [entry | {"at": _now()}]
    storage.atomic_write_json(storage.join(_model_dir(root, model), "HISTORY.json"), entries)


def _move(entry: dict) -> tuple:
    return entry.get("action"), entry.get("version"), entry.get("previous")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
