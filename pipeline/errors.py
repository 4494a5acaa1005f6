"""User-facing errors: the CLI prints their message (no traceback) and exits 2 (1 for a weak teacher)."""

from __future__ import annotations


class UserError(Exception):
    """Something the user must fix: the message says what, where, and how."""


class SpecError(UserError):
    """The job spec is malformed or invalid."""


class DataError(UserError):
    """The click logs or shards are missing, malformed, or inconsistent with the spec."""

    @classmethod
    def of_all(cls, problems: list[str]) -> DataError:
        """One error listing every problem (each once); `.problems` keeps them for a caller that adds more."""
        problems = list(dict.fromkeys(problems))
        listed = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
        error = cls(problems[0] if len(problems) == 1 else f"{len(problems)} problems with the click logs:\n{listed}")
        error.problems = problems
        return error

    @property
    def each(self) -> list[str]:
        """The problems this error lists (itself, if it lists none)."""
        return getattr(self, "problems", [str(self)])


class WeakTeacher(Exception):
    """The teacher does not beat the hard-label student on validation by `distill.min_teacher_lift`: the run
    stops before labelling (exit 1; not a mistake in the spec, a verdict on the data and the teacher)."""


class ParityError(Exception):
    """An exported model does not compute what was evaluated (its logits differ from the eager model's beyond
    the format's tolerance): nothing is published from it (exit 1; a fault of the export, not of the spec)."""


class ExportError(UserError):
    """The model cannot be exported to the format asked for (an op the exporter does not know)."""
