"""What ``guard check`` judges: a policy set read, validated and compiled as ``guard run`` would.

A green check means the daemon accepts the set: after the parser's checks the
set is compiled with the same host cgroup default as ``guard run`` (``/``) and
its units resolved by systemd's naming convention (or ``--unit-cgroup``), so
every compile-time check (port-table limit, scope paths) runs too. On top,
warnings that only a reviewer needs (rules that can never decide,
guard.policy.shadow). Values in, values out; the command prints them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from guard.errors import Diagnostic, PolicyError
from guard.policy.compile import compile_policies
from guard.policy.model import PolicySet
from guard.policy.plan import Plan
from guard.policy.policytest import PolicyTest, load_tests, tests_of
from guard.policy.shadow import shadowed_rules

JSON_VERSION = 1  # bumped when a field of ``to_json`` changes meaning or goes away


@dataclass(frozen=True)
class CheckResult:
    """The diagnostics of a policy set, and its plan when it has no error."""

    diagnostics: tuple[Diagnostic, ...]  # sorted; errors and warnings
    files: tuple[str, ...]
    policy_set: PolicySet | None
    plan: Plan | None  # None as soon as any diagnostic is an error
    tests: tuple[PolicyTest, ...] = ()  # the valid test documents

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "error")

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity != "error")

    def to_json(self) -> str:
        """Stable fields for tools: see docs/policy.md ("guard check --json")."""
        policies = [p.name for p in self.policy_set.policies] if self.policy_set else []
        return json.dumps({
            "version": JSON_VERSION,
            "valid": not self.errors,
            "files": list(self.files),
            "policies": policies,
            "tests": sum(len(t.cases) for t in self.tests),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "diagnostics": [d.to_dict() for d in self.diagnostics],
        }, indent=2) + "\n"


def check_paths(paths: Sequence[str], *, stdin: bytes | None = None, host_cgroup: str = "/",
                unit_cgroups: Mapping[str, str] | None = None) -> CheckResult:
    """Parse, validate and compile the policies under ``paths`` (``-``: ``stdin``), and
    validate the test documents there."""
    loaded = load_tests(paths, stdin=stdin)
    diagnostics = list(loaded.diagnostics)
    plan = None
    if loaded.policy_set is not None:
        try:
            plan = compile_policies(loaded.policy_set, host_cgroup=host_cgroup,
                                    unit_cgroups=dict(unit_cgroups or {}))
        except PolicyError as error:
            diagnostics += error.diagnostics
        diagnostics += shadowed_rules(loaded.policy_set, plan)
    return CheckResult(tuple(sorted(diagnostics)), loaded.files, loaded.policy_set, plan,
                       tests_of(loaded))
