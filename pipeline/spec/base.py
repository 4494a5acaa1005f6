"""The base of every spec section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base for spec sections: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
