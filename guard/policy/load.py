"""A policy directory read, validated and compiled: what the daemon applies.

One function of values (``load_policies``): the directory's files in, a
``PolicyLoad`` (the policy set, its plan, the files, the revision, warnings) or
every positioned diagnostic out. Used by ``guard run`` at start and at every
reload, so both judge a directory the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from guard.errors import Diagnostic, PolicyError
from guard.policy.compile import compile_policies
from guard.policy.model import PolicySet
from guard.policy.parse import load_policy_paths
from guard.policy.plan import Plan
from guard.policy.revision import Revision, revision_of


@dataclass(frozen=True)
class PolicyLoad:
    """A compiled policy directory, ready to apply."""

    policy_set: PolicySet
    plan: Plan
    files: tuple[str, ...]
    revision: Revision
    warnings: tuple[Diagnostic, ...]


UnitLookup = Callable[[list[str]], Mapping[str, str]]  # systemd units -> cgroup paths


def load_policies(directory: str, host_cgroup: str, *, unit_lookup: UnitLookup,
                  ) -> PolicyLoad | tuple[Diagnostic, ...]:
    """Parse and compile ``directory``; the diagnostics when it cannot be used.
    ``unit_lookup`` resolves the units the policies name (the daemon asks systemd)."""
    result = load_policy_paths([directory])
    if result.errors or result.policy_set is None:
        return result.diagnostics or ()
    units = sorted({u for p in result.policy_set.policies for u in p.scope.units})
    try:
        plan = compile_policies(result.policy_set, host_cgroup=host_cgroup,
                                unit_cgroups=dict(unit_lookup(units)) if units else {})
    except PolicyError as error:
        return error.diagnostics
    warnings = tuple(d for d in result.diagnostics if d.severity != "error")
    return PolicyLoad(result.policy_set, plan, tuple(result.files),
                      revision_of(Path(directory), result.files), warnings)
