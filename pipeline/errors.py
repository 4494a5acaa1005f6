"""User-facing errors: the CLI prints their message (no traceback) and exits 2."""


class UserError(Exception):
    """Something the user must fix: the message says what, where, and how."""


class SpecError(UserError):
    """The job spec is malformed or invalid."""


class DataError(UserError):
    """The click logs or shards are missing, malformed, or inconsistent with the spec."""
