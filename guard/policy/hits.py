"""Rule hit counts across a reload: keyed by what a rule says, not where it sits.

``guard status`` shows how many reported decisions each rule made, by its label
(``web/egress.rules[0]``). A label names a position; after a reload the rule at
that position may say something else (port 9997 where it said 9999). The counts
are therefore carried by content: a rule whose action, paths, access, networks,
ports and protocol are unchanged keeps its count, under its new label if it
moved; a rule that changed, or is gone, starts from zero (its old count is
dropped). A section default (``.default``) is carried while the section's
default is the same. Pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from guard.policy.model import PolicySet


def _contents(policy_set: PolicySet | None) -> dict[str, tuple[str, str, object]]:
    """label -> (policy, section, what the rule says, without its position)."""
    found: dict[str, tuple[str, str, object]] = {}
    for policy in policy_set.policies if policy_set is not None else ():
        for name in ("exec", "files", "egress"):
            section = getattr(policy, name)
            if section is None:
                continue
            # rules compare without their locations; their index is the position
            for rule in section.rules:
                found[f"{policy.name}/{name}.rules[{rule.index}]"] = (
                    policy.name, name, dataclasses.replace(rule, index=0))
            default = getattr(section, "default", None)
            if default is not None:
                found[f"{policy.name}/{name}.default"] = (policy.name, name, ("default", default))
    return found


def relabel(old: PolicySet | None, new: PolicySet) -> dict[str, str]:
    """old label -> new label, for every rule of ``old`` that ``new`` still has
    (same policy, section and content); a rule missing here changed or is gone."""
    before, after = _contents(old), _contents(new)
    where = {content: label for label, content in after.items()}
    return {label: where[content] for label, content in before.items() if content in where}


def carry_hits(old: PolicySet | None, new: PolicySet, hits: Mapping[str, int]
               ) -> dict[str, int]:
    """The counts of ``hits`` (labels of ``old``'s rules) that hold for ``new``."""
    moves = relabel(old, new)
    carried: dict[str, int] = {}
    for label, count in hits.items():
        target = moves.get(label)
        if target is not None:
            carried[target] = carried.get(target, 0) + count
    return carried


EventKey = tuple[str, str, str, str]  # (policy, rule label, action, kind)


def carry_event_counts(old: PolicySet | None, new: PolicySet,
                       counts: Mapping[EventKey, int]) -> dict[EventKey, int]:
    """Per-(policy, rule, action, kind) counts carried as ``carry_hits`` does; the
    counts of events without a rule (lost events) are kept."""
    moves = relabel(old, new)
    carried: dict[EventKey, int] = {}
    for (policy, rule, action, kind), count in counts.items():
        target = rule if not rule else moves.get(rule)
        if target is not None:
            key = (policy, target, action, kind)
            carried[key] = carried.get(key, 0) + count
    return carried


__all__ = ["EventKey", "carry_event_counts", "carry_hits", "relabel"]
