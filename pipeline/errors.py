"""User-facing errors: the CLI prints their message (no traceback) and exits 2 (1 for a weak teacher)."""


class UserError(Exception):
    """Something the user must fix: the message says what, where, and how."""


class SpecError(UserError):
    """The job spec is malformed or invalid."""


class DataError(UserError):
    """The click logs or shards are missing, malformed, or inconsistent with the spec."""


class WeakTeacher(Exception):
    """The teacher does not beat the hard-label student on validation by `distill.min_teacher_lift`: the run
    stops before labelling (exit 1; not a mistake in the spec, a verdict on the data and the teacher)."""
