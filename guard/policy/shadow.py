"""Rules that can never decide: ``guard check``'s ``shadowed-rule`` warnings.

Within one policy's section, a rule (or one path of it) is dead when another
rule of the same section decides everything it would match, by plan.py's
rules 2 and 3: an equally specific rule with the stronger verdict, or the same
verdict and an earlier place (``allow /usr/bin/curl`` after ``deny
/usr/bin/curl``; the same path twice). Both rules are in every ruleset the
policy is in, so the first one decides there, whatever else the ruleset holds.

- exec: per path pattern (``/x`` and ``/x/**`` are different patterns);
- files: per path pattern, when every access the rule names is decided by
  other rules at that pattern;
- egress: per rule, when each of its lines (network, port range, protocol) is
  covered by an earlier line of another rule at the same network, in the
  kernel's port-table order (more ports or a protocol are more specific).

Across policies nothing is reported: which policies share a ruleset depends
on scopes, and a dead rule of one is often live where the other is absent.
Pure: a PolicySet in, warnings out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from guard.errors import Code, Diagnostic, Location, Severity
from guard.policy.compile import _covers, rule_lines, rule_verdict
from guard.policy.model import Access, ExecRule, FileRule, NetRule, PathPattern, Policy, PolicySet
from guard.policy.plan import Decision

_Key = tuple[str, bool]  # (path, subtree)


def shadowed_rules(policy_set: PolicySet) -> list[Diagnostic]:
    """Every rule or path of a rule in ``policy_set`` that can never decide, as warnings."""
    found: list[Diagnostic] = []
    for policy in policy_set.policies:
        if policy.exec is not None:
            found += _paths(policy, "exec", policy.exec.rules)
        if policy.files is not None:
            found += _paths(policy, "files", policy.files.rules)
        if policy.egress is not None:
            found += _egress(policy, policy.egress.rules)
    return sorted(found)


def _wins(rule: ExecRule | FileRule | NetRule, other: ExecRule | FileRule | NetRule) -> bool:
    """True when ``other`` beats ``rule`` on a tie: stronger verdict, then earlier."""
    return (rule_verdict(other.action), -other.index) > (rule_verdict(rule.action), -rule.index)


def _warning(where: Location, message: str) -> Diagnostic:
    return Diagnostic(where, Code.SHADOWED_RULE, message, Severity.WARNING.value)


def _why(rule: ExecRule | FileRule | NetRule, other: ExecRule | FileRule | NetRule) -> str:
    if rule.action == other.action:
        return f"an earlier {other.action} rule"
    return f"{other.action} wins a tie with {rule.action}"


def _paths(policy: Policy, section: str, rules: Sequence[ExecRule | FileRule]) -> list[Diagnostic]:
    by_key: dict[_Key, list[tuple[ExecRule | FileRule, PathPattern]]] = {}
    for rule in rules:
        for pattern in rule.paths:
            by_key.setdefault((pattern.path, pattern.subtree), []).append((rule, pattern))
    found: list[Diagnostic] = []
    for named in by_key.values():
        for rule, pattern in named:
            winner = _decider(rule, [other for other, _ in named if other is not rule])
            if winner is None:
                continue
            found.append(_warning(
                pattern.location,
                f"{pattern} in {policy.name}/{section}.rules[{rule.index}] never decides: "
                f"{policy.name}/{section}.rules[{winner.index}] ({winner.location}) names it "
                f"too and decides it ({_why(rule, winner)})"))
    return found


def _decider(rule: ExecRule | FileRule, others: Iterable[ExecRule | FileRule]
             ) -> ExecRule | FileRule | None:
    """The other rule that decides every access ``rule`` would at one pattern, or None."""
    accesses: Iterable[Access | None] = rule.access if isinstance(rule, FileRule) else (None,)
    first: ExecRule | FileRule | None = None
    for access in sorted(accesses, key=str):
        winners = [o for o in others if _wins(rule, o)
                   and (access is None or (isinstance(o, FileRule) and access in o.access))]
        if not winners:
            return None
        best = max(winners, key=lambda o: (rule_verdict(o.action), -o.index))
        first = first or best
    return first


def _egress(policy: Policy, rules: Sequence[NetRule]) -> list[Diagnostic]:
    # The rule's index + 1 stands for its id: within one section ids follow the index.
    lines = {rule.index: [line for network in rule.to for line in rule_lines(
        rule, network, Decision(rule_verdict(rule.action), rule.index + 1))]
        for rule in rules}
    networks = {rule.index: [n for n in rule.to for _ in (rule.ports or [None])]
                for rule in rules}
    found: list[Diagnostic] = []
    for rule in rules:
        deciders: list[NetRule] = []
        for line, network in zip(lines[rule.index], networks[rule.index], strict=True):
            decider = next((other for other in rules if other is not rule and any(
                n == network and earlier.key[:5] < line.key[:5] and _covers(earlier.line, line.line)
                for earlier, n in zip(lines[other.index], networks[other.index], strict=True))),
                None)
            if decider is None:
                break
            deciders.append(decider)
        else:
            if deciders:
                winner = deciders[0]
                found.append(_warning(
                    rule.location,
                    f"{policy.name}/egress.rules[{rule.index}] never decides: every address, "
                    f"port and protocol it names is decided first by "
                    f"{policy.name}/egress.rules[{winner.index}] ({winner.location})"
                    + (f" ({_why(rule, winner)})" if len(set(map(id, deciders))) == 1 else
                       " and others")))
    return found
