"""Errors the command line maps to exit codes: bad input is the user's to fix (2), the rest is ours (1)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, tied to the case it concerns (None: the dataset as a whole)."""

    case: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.case}: {self.message}" if self.case else f"dataset: {self.message}"


class SegPipeError(Exception):
    """A failure that is reported as one readable line (exit code 1)."""

    exit_code = 1


class BadInputError(SegPipeError):
    """The user's data or arguments are wrong; nothing was written (exit code 2)."""

    exit_code = 2

    def __init__(self, problems: list[Problem] | str, case: str | None = None):
        if isinstance(problems, str):
            problems = [Problem(case, problems)]
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
