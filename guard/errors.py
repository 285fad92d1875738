"""Positions, diagnostics, their codes and exit codes: what every stage and command reports with.

Every error guard reports about a policy points at the offending value as
``FILE:LINE:COL`` (1-based), so an operator can jump straight to it, and has a
stable code from ``Code``, the one registry of them. Every command exits with
one of ``ExitCode``'s values. Both are defined here once; docs/policy.md
("Diagnostic codes") explains each code for users, and tests/unit/test_codes.py
proves that every code guard can report is registered and documented.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class ExitCode(IntEnum):
    """What every ``guard`` command exits with."""

    OK = 0
    INVALID = 1  # invalid policy input (or a failed ``guard test`` case)
    USAGE = 2  # the command line itself is wrong
    RUNTIME = 3  # the machine or the daemon failed the request
    CHANGED = 4  # guard replay / guard diff: recorded operations (or the policies) change


class Severity(StrEnum):
    ERROR = "error"  # the policy set is not accepted
    WARNING = "warning"  # reported; the policy set is still accepted


class Stage(StrEnum):
    """Where a code is found first (a later stage may report it too)."""

    CHECK = "check"  # reading and validating files: guard check, and every command that loads
    COMPILE = "compile"  # compiling a valid set: guard compile, guard explain, the daemon
    RUN = "run"  # the daemon loading or reloading its policy directory


class Code(StrEnum):
    """Every diagnostic code: stable, for tools and tests to match on.

    A member is the code's text (``Code.BAD_UNIT == "bad-unit"``) and carries
    where it is found, its severity and a one-line meaning.
    """

    stage: Stage
    meaning: str
    severity: Severity

    def __new__(cls, value: str, stage: Stage, meaning: str,
                severity: Severity = Severity.ERROR) -> Code:
        member = str.__new__(cls, value)
        member._value_ = value
        member.stage = stage
        member.meaning = meaning
        member.severity = severity
        return member

    # files and text
    PATH_NOT_FOUND = ("path-not-found", Stage.CHECK,
                      "a path named on the command line does not exist")
    READ_ERROR = ("read-error", Stage.CHECK,
                  "a file or directory cannot be read (permissions, broken symlink, not a file)")
    FILE_TOO_LARGE = "file-too-large", Stage.CHECK, "a policy file is larger than the size limit"
    BAD_ENCODING = "bad-encoding", Stage.CHECK, "the file is not UTF-8 text"
    BAD_CHARACTER = ("bad-character", Stage.CHECK,
                     "a character YAML does not allow (control characters)")
    EMPTY_FILE = "empty-file", Stage.CHECK, "the file holds no document", Severity.WARNING
    EMPTY_DOCUMENT = ("empty-document", Stage.CHECK,
                      "a document between --- separators is empty", Severity.WARNING)
    TOO_MANY_ERRORS = ("too-many-errors", Stage.CHECK,
                       "more problems in one file than are listed; the rest are counted")
    # YAML
    YAML_SYNTAX = "yaml-syntax", Stage.CHECK, "the text is not valid YAML"
    YAML_TOO_DEEP = "yaml-too-deep", Stage.CHECK, "nesting deeper than the nesting limit"
    YAML_TAG = "yaml-tag", Stage.CHECK, "an explicit YAML tag (!!python/..., !!set, !custom)"
    YAML_ANCHOR = "yaml-anchor", Stage.CHECK, "a YAML anchor (&name)"
    YAML_ALIAS = "yaml-alias", Stage.CHECK, "a YAML alias (*name)"
    YAML_MERGE_KEY = "yaml-merge-key", Stage.CHECK, "a YAML merge key (<<)"
    DUPLICATE_KEY = "duplicate-key", Stage.CHECK, "a key appears twice in one mapping"
    # structure
    BAD_KEY = "bad-key", Stage.CHECK, "a mapping key that is a list or mapping"
    UNKNOWN_KEY = "unknown-key", Stage.CHECK, "a key the format does not have"
    MISSING_KEY = "missing-key", Stage.CHECK, "a required key is absent"
    WRONG_TYPE = ("wrong-type", Stage.CHECK,
                  "a value of the wrong type (or empty where a value is needed)")
    EMPTY_LIST = "empty-list", Stage.CHECK, "an empty list where at least one item is needed"
    # values
    BAD_API_VERSION = "bad-api-version", Stage.CHECK, "apiVersion is not guard/v1"
    BAD_KIND = "bad-kind", Stage.CHECK, "kind is not Policy (or PolicyTest)"
    BAD_NAME = "bad-name", Stage.CHECK, "metadata.name is not a DNS label"
    DUPLICATE_NAME = "duplicate-name", Stage.CHECK, "two policies have the same name"
    BAD_VALUE = ("bad-value", Stage.CHECK,
                 "not one of the valid choices (mode, default, action, access, protocol)")
    RELATIVE_PATH = "relative-path", Stage.CHECK, "a path that does not start with /"
    UNNORMALIZED_PATH = ("unnormalized-path", Stage.CHECK,
                         "a path with ., .., //, or a trailing /")
    UNSUPPORTED_GLOB = "unsupported-glob", Stage.CHECK, "a pattern other than a trailing /**"
    BAD_PATH = "bad-path", Stage.CHECK, "an empty, overlong or NUL-containing path"
    BAD_CGROUP = ("bad-cgroup", Stage.CHECK,
                  "a cgroup path written with the cgroup2 mount point in front")
    EMPTY_SCOPE = "empty-scope", Stage.CHECK, "a scope with neither cgroups nor units"
    BAD_UNIT = ("bad-unit", Stage.CHECK,
                "not a systemd unit name of a type that runs processes")
    BAD_NETWORK = "bad-network", Stage.CHECK, "not an IP address or network, or host bits set"
    BAD_PORT = "bad-port", Stage.CHECK, "not a port (1..65535) or a FIRST-LAST range"
    SHADOWED_RULE = ("shadowed-rule", Stage.CHECK,
                     "a rule, or a path of it, that can never decide: an equal rule of the same "
                     "section decides first", Severity.WARNING)
    # compiling a valid policy set
    SCOPE_CGROUP = ("scope-cgroup", Stage.COMPILE,
                    "a scope cgroup or the host cgroup is not a usable cgroup path")
    SCOPE_UNIT = ("scope-unit", Stage.COMPILE,
                  "a scope unit cannot be resolved to a cgroup")
    PORT_TABLE_LIMIT = ("port-table-limit", Stage.COMPILE,
                        "a port table needs more lines than the kernel scans")
    # the daemon
    INTERNAL_ERROR = ("internal-error", Stage.RUN,
                      "reading the policies failed unexpectedly (a bug in guard)")


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

    ``code`` is one of ``Code`` (stable: tests and tooling match on it);
    ``message`` is for people. Ordering is by location, so a sorted list reads
    top to bottom per file.
    """

    location: Location
    code: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.location}: {self.severity}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        """The fields ``--json`` outputs carry (stable: docs/policy.md)."""
        where = self.location
        return {"file": where.file, "line": where.line, "col": where.col,
                "severity": self.severity, "code": str(self.code), "message": self.message}


class PolicyError(Exception):
    """Raised when a policy set cannot be accepted; carries every diagnostic."""

    def __init__(self, diagnostics: list[Diagnostic] | tuple[Diagnostic, ...]) -> None:
        self.diagnostics: tuple[Diagnostic, ...] = tuple(sorted(diagnostics))
        super().__init__("\n".join(str(d) for d in self.diagnostics))
