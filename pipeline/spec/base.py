"""The base of every spec section."""

from __future__ import annotations

import zoneinfo

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base for spec sections: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def time_zone(name: str) -> str:
    """`name` when it is an IANA time zone (a spec's `timezone` fields), else a ValueError saying what to use."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'") from None
    return name
