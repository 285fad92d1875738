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


def carry_hits(old: PolicySet | None, new: PolicySet, hits: Mapping[str, int]
               ) -> dict[str, int]:
    """The counts of ``hits`` (labels of ``old``'s rules) that hold for ``new``."""
    before, after = _contents(old), _contents(new)
    where = {content: label for label, content in after.items()}
    carried: dict[str, int] = {}
    for label, count in hits.items():
        content = before.get(label)
        target = where.get(content) if content is not None else None
        if target is not None:
            carried[target] = carried.get(target, 0) + count
    return carried


__all__ = ["carry_hits"]
