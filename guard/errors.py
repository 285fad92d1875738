"""Positions, diagnostics and exit codes: what every stage and command reports with.

Every error guard reports about a policy points at the offending value as
``FILE:LINE:COL`` (1-based), so an operator can jump straight to it. Every
command exits with one of ``ExitCode``'s values, defined here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    """What every ``guard`` command exits with."""

    OK = 0
    INVALID = 1  # invalid policy input (or a failed ``guard test`` case)
    USAGE = 2  # the command line itself is wrong
    RUNTIME = 3  # the machine or the daemon failed the request


@dataclass(frozen=True, order=True)
class Location:
    """A 1-based position in a policy file."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One problem found in the input.

    ``code`` is stable (tests and tooling match on it); ``message`` is for people.
    Ordering is by location, so a sorted list reads top to bottom per file.
    """

    location: Location
    code: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.location}: {self.severity}: {self.message}"


class PolicyError(Exception):
    """Raised when a policy set cannot be accepted; carries every diagnostic."""

    def __init__(self, diagnostics: list[Diagnostic] | tuple[Diagnostic, ...]) -> None:
        self.diagnostics: tuple[Diagnostic, ...] = tuple(sorted(diagnostics))
        super().__init__("\n".join(str(d) for d in self.diagnostics))
