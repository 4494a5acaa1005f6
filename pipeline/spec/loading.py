"""Reading a job spec: YAML (plain data only), `key.path=value` overrides, and errors that say how to fix them."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.errors import SpecError
from pipeline.spec.job import JobSpec


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Reads a YAML job spec, applies `key.path=value` overrides, and validates it.

    Raises:
        SpecError: the file is missing or malformed, or a field is invalid.
    """
    raw = _read_yaml(Path(path))
    for override in overrides or []:
        apply_override(raw, override)
    return parse_spec(raw, source=str(path))


def parse_spec(raw: Any, source: str = "<spec>") -> JobSpec:
    """Validates a raw spec (a mapping of sections) into a `JobSpec`; `source` names it in errors.

    Raises:
        SpecError: `raw` is not a mapping, or a field is invalid.
    """
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping of sections, got {type(raw).__name__}")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(f"{source}: invalid job spec\n" + _describe(exc, raw)) from None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} not found; pass the path of a YAML job spec (see jobs/)")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        raise SpecError(f"{path}: YAML tag refused at line {mark.line + 1}, column {mark.column + 1} ({exc.problem}): "
                        "a spec is plain data; code enters only through model: custom with "
                        "factory: 'package.module:function'") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{path}: YAML syntax error{where}: {problem}") from None


def apply_override(raw: dict, override: str) -> None:
    """Sets the field at `KEY.PATH` of the raw spec to `VALUE` (read as YAML), creating sections as needed.

    Raises:
        SpecError: `override` is not `KEY.PATH=VALUE`, the spec is not a mapping, a key on the path
            is not a section, or the value is not valid YAML.
    """
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"override {override!r}: expected KEY.PATH=VALUE, e.g. train.epochs=1")
    if not isinstance(raw, dict):
        raise SpecError("overrides need a spec that is a YAML mapping")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"override {override!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        raise SpecError(f"override {override!r}: the value is not valid YAML") from None


def _describe(exc: ValidationError, raw: dict) -> str:
    return "\n".join(_describe_one(err, raw) for err in exc.errors())


def _describe_one(err: dict, raw: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    if loc[:1] == ["teacher"] and isinstance(raw.get("teacher"), dict) and loc[1:2] == ["0"]:
        loc = ["teacher"] + loc[2:]  # one teacher written as a mapping: no list index in its paths
    if not loc:  # a rule across sections: its message names the fields
        return f"  - {err['msg'].removeprefix('Value error, ')}"
    path = ".".join(loc)
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], allowed, n=1)
        suggestion = f"did you mean {hint[0]!r}? " if hint else ""
        return f"  - {path}: unknown key; {suggestion}allowed keys: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"  - {path}: required field is missing; add it to the spec"
    message = err["msg"].removeprefix("Value error, ")
    got = "" if err["type"].startswith("value_error") else f" (got {err.get('input')!r})"
    return f"  - {path}: {message}{got}"


def _allowed_keys(loc: list[str]) -> list[str]:
    """Field names of the section at `loc`, for 'did you mean' hints."""
    model: type[BaseModel] = JobSpec
    for part in (p for p in loc if not p.isdigit()):  # list indices (an ensemble's teachers) select no section
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        candidates = typing.get_args(annotation) or (annotation,)  # `X | None` sections too
        found = [a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)]
        if not found:
            return []
        model = found[0]
    return list(model.model_fields)
