"""Errors the command line maps to exit codes: bad input is the user's to fix (2), the rest is ours (1)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, tied to the case it concerns (None: the dataset as a whole)."""

    case: str | None
    message: str
    # what a problem without a case concerns: "dataset" (dataset.json, the layout), or "" for an
    # argument, the workdir or a workdir file, whose message says what it is about (no prefix)
    scope: str = "dataset"

    def __str__(self) -> str:
        subject = self.case or self.scope
        return f"{subject}: {self.message}" if subject else self.message


class SegPipeError(Exception):
    """A failure that is reported as one readable line (exit code 1)."""

    exit_code = 1


class BadInputError(SegPipeError):
    """The user's data or arguments are wrong; nothing was written (exit code 2)."""

    exit_code = 2

    def __init__(self, problems: list[Problem] | str, case: str | None = None):
        if isinstance(problems, str):  # one message: about `case`, or (None) an argument or a file, not the dataset
            problems = [Problem(case, problems, scope="")]
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
