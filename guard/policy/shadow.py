"""Rules that can never decide: ``guard check``'s ``shadowed-rule`` warnings.

A rule (or one path of it) is dead when another rule decides everything it
would match, wherever it applies, by plan.py's rules 2 and 3: an equally
specific rule with the stronger verdict, or the same verdict and the lower
rule id (earlier in the list; for two policies, the one whose name sorts
first). ``allow /usr/bin/curl`` after ``deny /usr/bin/curl``; one path twice.

Which rules can shadow a policy's rule: those of its own section, and those of
the same section of every other policy of the same mode that is in *every*
ruleset the policy is in (the compiled plan says which; without a plan, only
the policy's own rules count), when their verdict is stronger. Then the
deciding rule is beside the dead one wherever the dead one could decide.

- exec: per path pattern (``/x`` and ``/x/**`` are different patterns);
- files: per path pattern, when every access the rule names is decided by
  other rules at that pattern;
- egress: per rule, when each of its lines (network, port range, protocol) is
  covered by an earlier line of another rule at the same network, in the
  kernel's port-table order (more ports or a protocol are more specific).

Pure: a PolicySet (and its plan) in, warnings out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from guard.errors import Code, Diagnostic, Location, Severity
from guard.policy.compile import _covers, _Line, rule_ids, rule_lines, rule_table, rule_verdict
from guard.policy.model import (
    Access,
    ExecRule,
    FileRule,
    IPNetwork,
    NetRule,
    PathPattern,
    Policy,
    PolicySet,
)
from guard.policy.plan import Decision, Plan

_Key = tuple[str, bool]  # (path, subtree)
AnyRule = ExecRule | FileRule | NetRule


@dataclass(frozen=True)
class _Rule:
    """A rule with what ranks it against others: its policy, section and rule id."""

    policy: str
    section: str
    rule: AnyRule
    id: int

    @property
    def label(self) -> str:
        return f"{self.policy}/{self.section}.rules[{self.rule.index}]"

    @property
    def rank(self) -> tuple[int, int]:
        """plan.py rule 3 as a sort key: the stronger verdict, then the lower id."""
        return int(rule_verdict(self.rule.action)), -self.id

    def beaten_by(self, other: _Rule) -> bool:
        """Whether ``other`` wins a tie with this rule and is worth a warning: within a
        policy always; from another policy only with a stronger verdict (two policies
        that both deny a path both mean it, and each is live without the other)."""
        if other.id == self.id or other.rank <= self.rank:
            return False
        return other.policy == self.policy or other.rank[0] > self.rank[0]


def shadowed_rules(policy_set: PolicySet, plan: Plan | None = None) -> list[Diagnostic]:
    """Every rule or path of a rule in ``policy_set`` that can never decide, as warnings."""
    ids = rule_ids(rule_table(policy_set))
    peers = _peers(policy_set, plan)
    found: list[Diagnostic] = []
    for policy in policy_set.policies:
        for section in ("exec", "files", "egress"):
            own = _rules(policy, section, ids)
            near = [r for peer in peers[policy.name] for r in _rules(peer, section, ids)]
            if not own or not near:
                continue
            if section == "egress":
                found += _egress(own, near)
            else:
                found += _paths(own, near)
    return sorted(found)


def _rules(policy: Policy, section: str, ids: Mapping[tuple[str, str, int], int]) -> list[_Rule]:
    part = policy.exec if section == "exec" else policy.files if section == "files" \
        else policy.egress
    rules: Sequence[AnyRule] = part.rules if part is not None else ()
    return [_Rule(policy.name, section, r, ids[(policy.name, section, r.index)]) for r in rules]


def _peers(policy_set: PolicySet, plan: Plan | None) -> dict[str, list[Policy]]:
    """Per policy: itself, and the policies of its mode present in every ruleset it is in."""
    peers = {p.name: [p] for p in policy_set.policies}
    if plan is None:
        return peers
    for policy in policy_set.policies:
        sets = [set(r.policies) for r in plan.rulesets if policy.name in r.policies]
        if not sets:
            continue
        always = set.intersection(*sets)
        peers[policy.name] += [p for p in policy_set.policies if p.name in always
                               and p.name != policy.name and p.mode is policy.mode]
    return peers


def _warning(where: Location, message: str) -> Diagnostic:
    return Diagnostic(where, Code.SHADOWED_RULE, message, Severity.WARNING.value)


def _why(dead: _Rule, winner: _Rule) -> str:
    if dead.rule.action == winner.rule.action:
        return f"the same {winner.rule.action}, and it comes first"
    return f"{winner.rule.action} wins a tie with {dead.rule.action}"


def _paths(own: Sequence[_Rule], near: Sequence[_Rule]) -> list[Diagnostic]:
    by_key: dict[_Key, list[_Rule]] = {}
    for other in near:
        paths = other.rule.paths if isinstance(other.rule, ExecRule | FileRule) else ()
        for pattern in paths:
            by_key.setdefault((pattern.path, pattern.subtree), []).append(other)
    found: list[Diagnostic] = []
    for dead in own:
        assert isinstance(dead.rule, ExecRule | FileRule)
        for pattern in dead.rule.paths:
            winner = _decider(dead, by_key[(pattern.path, pattern.subtree)])
            if winner is not None:
                found.append(_path_warning(dead, pattern, winner))
    return found


def _path_warning(dead: _Rule, pattern: PathPattern, winner: _Rule) -> Diagnostic:
    return _warning(pattern.location,
                    f"{pattern} in {dead.label} never decides: {winner.label} "
                    f"({winner.rule.location}) names it too and decides it "
                    f"({_why(dead, winner)})")


def _decider(dead: _Rule, others: Iterable[_Rule]) -> _Rule | None:
    """The other rule that decides every access ``dead`` would at one pattern, or None."""
    accesses: Iterable[Access | None] = \
        sorted(dead.rule.access, key=str) if isinstance(dead.rule, FileRule) else (None,)
    first: _Rule | None = None
    for access in accesses:
        winners = [o for o in others if dead.beaten_by(o) and (
            access is None or (isinstance(o.rule, FileRule) and access in o.rule.access))]
        if not winners:
            return None
        first = first or max(winners, key=lambda o: o.rank)
    return first


def _egress(own: Sequence[_Rule], near: Sequence[_Rule]) -> list[Diagnostic]:
    lines = {r.id: _lines(r) for r in near}
    found: list[Diagnostic] = []
    for dead in own:
        deciders: list[_Rule] = []
        for line, network in _lines(dead):
            decider = next((other for other in near if dead.beaten_by(other) and any(
                n == network and earlier.key[:5] < line.key[:5]
                and _covers(earlier.line, line.line) for earlier, n in lines[other.id])), None)
            if decider is None:
                break
            deciders.append(decider)
        else:
            if deciders:
                winner = deciders[0]
                alone = all(d.id == winner.id for d in deciders)
                found.append(_warning(
                    dead.rule.location,
                    f"{dead.label} never decides: every address, port and protocol it names "
                    f"is decided first by {winner.label} ({winner.rule.location})"
                    + (f" ({_why(dead, winner)})" if alone else " and others")))
    return found


def _lines(rule: _Rule) -> list[tuple[_Line, IPNetwork]]:
    """The rule's port lines (compile.rule_lines, in the kernel's order) with their network."""
    assert isinstance(rule.rule, NetRule)
    decision = Decision(rule_verdict(rule.rule.action), rule.id)
    return [(line, network) for network in rule.rule.to
            for line in rule_lines(rule.rule, network, decision)]
