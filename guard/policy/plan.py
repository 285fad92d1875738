"""The plan: what the compiler makes of a policy set, before any kernel is involved.

A plan is the complete, merged decision data the kernel programs read, in the
shape of their maps (bpf/guard.h), but still keyed by paths and cgroup paths:
guard.kernel.resolve turns those into inode and cgroup ids on the machine at hand, and
guard.kernel.apply writes them. guard.policy.evaluate answers questions from a plan alone, so
what ``guard explain`` says is what the kernel does.

How policies combine (the rule is written once, here; docs/semantics.md says it
for users):

1. Scope. Each distinct scope path (a policy's cgroups, its units' cgroups, and
   the host root for whole-host policies) gets the *ruleset* made of every
   policy whose scope is that path or one of its ancestors. A process is judged
   by the ruleset of the deepest scope path that contains its cgroup; a process
   under no scope path is not judged at all.
2. Within a ruleset, the most specific rule wins:
   exec/files: an exact path beats any subtree; a deeper subtree beats a
   shallower one; any rule beats the default.
   egress: a longer prefix wins; at equal prefix, a rule with ports beats one
   without, then a rule with a protocol beats one without; any rule beats the
   default.
3. Ties between equally specific rules (from one policy or several) go to the
   strongest verdict: DENY > AUDIT > ALLOW (then the lowest rule id). So a tie
   between allow and deny is deny. Among defaults, the strongest wins too.
4. A rule's verdict comes from its action: allow -> ALLOW, audit -> AUDIT,
   deny -> DENY. ``default: deny`` is a deny at the lowest specificity;
   ``default: allow`` is ALLOW there.
5. Mode: an audit-mode policy never changes what is blocked. Rules 2-4 are
   applied twice per ruleset: E, over its enforce-mode policies alone (nothing
   matching and no default: ALLOW, no rule); T, over all its policies as if
   every one were enforced. The decision is
     E                            when E is DENY;
     WOULD_DENY with T's rule     else when T is DENY (enforcing the audit-mode
                                  policies would block it);
     E when E is AUDIT, else T when T is AUDIT;
     ALLOW with E's rule (T's when E has none) otherwise.
   Without audit-mode policies T = E, so the decision is simply E; with only
   audit-mode policies it is T, its denials reported as WOULD_DENY. (Why not
   one merge with deny -> WOULD_DENY: then a more specific rule of a trial
   policy, even an allow, would override an enforcing deny, so a dry run could
   open what enforcement closes.) The compiler resolves E and T at every entry
   and in every port table, so the kernel still makes one most-specific lookup.
   Only AUDIT, WOULD_DENY and DENY produce events.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any

from guard.errors import Location
from guard.policy.model import IPNetwork

PORT_MAX = 65535  # a port line from 0 to PORT_MAX matches any port


def parent_dirs(path: str) -> list[str]:
    """Parent directories of an absolute path, nearest first, ending with ``/``: the
    order in which the kernel looks for a subtree entry above a path (rule 2)."""
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


class Verdict(IntEnum):
    """Ordered by strength: the stronger verdict wins a tie. Values are the kernel's.

    WOULD_DENY is never a rule's own verdict: rule 5 above makes it.
    """

    ALLOW = 0
    AUDIT = 1  # allowed, reported
    WOULD_DENY = 2  # a deny in an audit-mode policy: allowed, reported
    DENY = 3

    @property
    def blocks(self) -> bool:
        return self is Verdict.DENY

    @property
    def reported(self) -> bool:
        return self is not Verdict.ALLOW


class Proto(IntEnum):
    """IP protocol numbers as the kernel sees them; ANY matches every protocol."""

    ANY = 0
    TCP = 6
    UDP = 17


@dataclass(frozen=True, order=True)
class RuleRef:
    """Where a decision came from. ``index`` is -1 for a section's default."""

    id: int  # dense, 1-based; 0 means "no rule"
    policy: str
    section: str  # "exec" | "files" | "egress"
    index: int
    location: Location = field(compare=False)

    @property
    def label(self) -> str:
        what = "default" if self.index < 0 else f"rules[{self.index}]"
        return f"{self.policy}/{self.section}.{what}"


@dataclass(frozen=True, order=True)
class Decision:
    verdict: Verdict
    rule: int  # RuleRef.id


@dataclass(frozen=True, order=True)
class Ruleset:
    id: int  # dense, 0-based
    policies: tuple[str, ...]  # names, sorted


@dataclass(frozen=True, order=True)
class ScopeEntry:
    cgroup: str  # cgroup v2 path relative to the cgroup2 mount, "/" for the root
    ruleset: int


@dataclass(frozen=True, order=True)
class RulesetDefaults:
    ruleset: int
    exec: Decision | None  # None: no policy of the ruleset has an exec section
    egress: Decision | None


@dataclass(frozen=True, order=True)
class ExecEntry:
    ruleset: int
    path: str
    subtree: bool
    decision: Decision


@dataclass(frozen=True, order=True)
class FileEntry:
    """One path's decisions per access; None where no rule there names that access."""

    ruleset: int
    path: str
    subtree: bool
    read: Decision | None
    write: Decision | None


@dataclass(frozen=True, order=True)
class PortMatch:
    """One line of a port table; ``first``..``last`` inclusive, 0..PORT_MAX for any port."""

    proto: Proto
    first: int
    last: int
    decision: Decision


@dataclass(frozen=True, order=True)
class PortTable:
    """Scanned in order by the kernel; the first line that matches decides.

    The compiler makes each table complete: it already holds the lines inherited
    from shorter prefixes and the ruleset's default, so one LPM lookup plus one
    bounded scan decides any connection.
    """

    id: int
    lines: tuple[PortMatch, ...]


@dataclass(frozen=True, order=True)
class NetEntry:
    ruleset: int
    network: str  # normalized CIDR text, IPv4 or IPv6
    table: int

    @property
    def ip_network(self) -> IPNetwork:
        import ipaddress

        return ipaddress.ip_network(self.network)


@dataclass(frozen=True)
class Plan:
    """Everything the kernel needs, deterministic for a given policy set."""

    rules: tuple[RuleRef, ...]
    rulesets: tuple[Ruleset, ...]
    scopes: tuple[ScopeEntry, ...]
    defaults: tuple[RulesetDefaults, ...]
    exec: tuple[ExecEntry, ...]
    files: tuple[FileEntry, ...]
    net: tuple[NetEntry, ...]
    port_tables: tuple[PortTable, ...]

    def rule(self, rule_id: int) -> RuleRef | None:
        if 1 <= rule_id <= len(self.rules):
            return self.rules[rule_id - 1]
        return None

    def to_json(self) -> str:
        """Byte-identical for equal plans: keys sorted, no floats, no sets."""
        return json.dumps(_plain(asdict(self)), indent=2, sort_keys=True) + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, IntEnum):
        return value.name
    return value
