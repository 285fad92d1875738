"""What a policy change changes: policies, rules, map entries, recorded operations.

``diff`` compares two compiled policy sets (``guard diff OLD NEW``):

- policies added and removed, and those whose mode or scope changed;
- rules added, removed and changed, by label (``POLICY/SECTION.rules[I]``): a rule
  is the same when it says the same thing in the same policy (guard.policy.revision,
  the daemon's own rule of what a reload changes), so moving a rule or editing a
  comment changes nothing, and a label in both sets that says something else
  is a changed rule;
- the map entries that change, per scope cgroup: the plans' exec, files and
  egress entries (each line of a prefix's port table) and defaults, keyed by
  what they match (path pattern and access; network and ports) rather than by
  the ids a plan hands out, valued by verdict and deciding rule;
- with a recording, the operations whose verdict changes, grouped by the rule
  that decides in NEW (guard.policy.replay.compare_plans).

Scopes whose entries change the same way are shown together.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from guard.policy.model import FileRule, NetRule, Policy, PolicySet
from guard.policy.plan import Decision, Plan
from guard.policy.replay import EFFECTS, Outcome, render_groups, render_notes
from guard.policy.revision import SectionRule, rule_changes, section_items
from guard.policy.text import pattern_text, port_text, verdict_word

FAIL_ON = ("any", "verdict", "blocked")


# --- rules -------------------------------------------------------------------------------


def _rule_texts(policy_set: PolicySet) -> dict[str, tuple[str, str]]:
    """label -> (what the rule says, FILE:LINE:COL)."""
    return {item.label: (f"{item.section} default {item.default}" if item.rule is None
                         else _rule_text(item.rule), str(item.location))
            for item in section_items(policy_set)}


def _rule_text(rule: SectionRule) -> str:
    if isinstance(rule, NetRule):
        text = f"{rule.action} to {', '.join(str(n) for n in rule.to)}"
        if rule.ports:
            text += f" ports {', '.join(str(p) for p in rule.ports)}"
        return text + ("" if rule.protocol == "any" else f" {rule.protocol}")
    paths = ", ".join(str(p) for p in rule.paths)
    if isinstance(rule, FileRule):
        return f"{rule.action} {','.join(sorted(str(a) for a in rule.access))} {paths}"
    return f"{rule.action} exec {paths}"


@dataclass(frozen=True)
class RuleDiff:
    change: str  # added | removed | changed
    label: str
    before: str  # what it says ("" when added)
    after: str
    location: str  # in NEW, or in OLD when removed


def rule_diffs(old: PolicySet, new: PolicySet) -> list[RuleDiff]:
    changes = rule_changes(old, new)
    before, after = _rule_texts(old), _rule_texts(new)
    out: list[RuleDiff] = []
    for label in changes.added:
        if label in changes.removed:
            out.append(RuleDiff("changed", label, before[label][0], after[label][0],
                                after[label][1]))
        else:
            out.append(RuleDiff("added", label, "", after[label][0], after[label][1]))
    out += [RuleDiff("removed", label, before[label][0], "", before[label][1])
            for label in changes.removed if label not in changes.added]
    order = {"removed": 0, "changed": 1, "added": 2}
    return sorted(out, key=lambda d: (d.label.split("/")[0], order[d.change], d.label))


def policy_diffs(old: PolicySet, new: PolicySet) -> list[str]:
    """One line per policy added, removed, or with another mode or scope."""
    before = {p.name: p for p in old.policies}
    after = {p.name: p for p in new.policies}
    out = [f"policy {n} added ({after[n].location.file})" for n in sorted(after.keys() - before)]
    out += [f"policy {n} removed" for n in sorted(before.keys() - after)]
    for name in sorted(before.keys() & after):
        a, b = before[name], after[name]
        if a.mode != b.mode:
            out.append(f"policy {name}: mode {a.mode} -> {b.mode}")
        if a.scope != b.scope:
            out.append(f"policy {name}: scope {_scope(a)} -> {_scope(b)}")
    return out


def _scope(policy: Policy) -> str:
    if policy.scope.whole_host:
        return "the whole host"
    return ", ".join([*policy.scope.cgroups, *policy.scope.units])


# --- map entries ---------------------------------------------------------------------------

EntryKey = tuple[str, str]  # (section, what it matches)


def _decision(plan: Plan, decision: Decision | None) -> str:
    if decision is None:
        return ""
    rule = plan.rule(decision.rule)
    return f"{verdict_word(decision.verdict)} ({rule.label if rule else 'no rule'})"


def scope_entries(plan: Plan) -> dict[str, dict[EntryKey, str]]:
    """Per scope cgroup, every entry of its ruleset as (section, match) -> decision text."""
    tables = {t.id: t for t in plan.port_tables}
    by_ruleset: dict[int, dict[EntryKey, str]] = {r.id: {} for r in plan.rulesets}
    for d in plan.defaults:
        if d.exec is not None:
            by_ruleset[d.ruleset][("exec", "default")] = _decision(plan, d.exec)
        if d.egress is not None:
            by_ruleset[d.ruleset][("egress", "default")] = _decision(plan, d.egress)
    for e in plan.exec:
        by_ruleset[e.ruleset][("exec", pattern_text(e.path, e.subtree))] = _decision(
            plan, e.decision)
    for f in plan.files:
        for access, decision in (("read", f.read), ("write", f.write)):
            if decision is not None:
                by_ruleset[f.ruleset][(f"files {access}", pattern_text(f.path, f.subtree))] = (
                    _decision(plan, decision))
    for n in plan.net:
        # one entry per line of the prefix's port table; the first line of a match decides
        for line in tables[n.table].lines:
            by_ruleset[n.ruleset].setdefault((f"egress to {n.network}", port_text(line)),
                                             _decision(plan, line.decision))
    return {s.cgroup: by_ruleset[s.ruleset] for s in plan.scopes}


@dataclass(frozen=True)
class EntryDiff:
    section: str
    match: str
    before: str  # "" when added
    after: str  # "" when removed


@dataclass(frozen=True)
class ScopeDiff:
    scopes: tuple[str, ...]  # scope cgroups whose entries change exactly so
    status: str  # added | removed | changed
    entries: tuple[EntryDiff, ...]


def entry_diffs(old: Plan, new: Plan) -> list[ScopeDiff]:
    before, after = scope_entries(old), scope_entries(new)
    grouped: dict[tuple[str, tuple[EntryDiff, ...]], list[str]] = {}
    for scope in sorted(before.keys() | after.keys()):
        a, b = before.get(scope), after.get(scope)
        status = "added" if a is None else "removed" if b is None else "changed"
        a, b = a or {}, b or {}
        changes = tuple(EntryDiff(key[0], key[1], a.get(key, ""), b.get(key, ""))
                        for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key))
        if changes or status != "changed":
            grouped.setdefault((status, changes), []).append(scope)
    return [ScopeDiff(tuple(scopes), status, changes)
            for (status, changes), scopes in grouped.items()]


# --- the whole -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Diff:
    old: str  # names, as given
    new: str
    policies: tuple[str, ...]
    rules: tuple[RuleDiff, ...]
    entries: tuple[ScopeDiff, ...]
    events: Outcome | None

    @property
    def entry_count(self) -> int:
        return sum(len(s.entries) * len(s.scopes) for s in self.entries)

    def changed(self) -> bool:
        return bool(self.policies or self.rules or self.entries or (
            self.events is not None and self.events.count()))

    def failed(self, fail_on: str = "any") -> bool:
        """The CI gate: any difference; or recorded operations whose verdict changes; or
        recorded operations newly blocked."""
        if fail_on == "any":
            return self.changed()
        if self.events is None:
            return False
        return self.events.failed("blocked" if fail_on == "blocked" else "any")

    def summary(self) -> str:
        counts = Counter(d.change for d in self.rules)
        parts = [f"{counts['added']} rule(s) added, {counts['removed']} removed, "
                 f"{counts['changed']} changed",
                 f"{self.entry_count} map entr{'y' if self.entry_count == 1 else 'ies'} "
                 f"change in {sum(len(s.scopes) for s in self.entries)} scope(s)"]
        if self.events is not None:
            parts.append(f"recorded operations: {self.events.summary()}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {
            "old": self.old, "new": self.new, "changed": self.changed(),
            "policies": list(self.policies),
            "rules": [d.__dict__ for d in self.rules],
            "entries": [{"scopes": list(s.scopes), "status": s.status,
                         "entries": [e.__dict__ for e in s.entries]} for s in self.entries],
            "events": self.events.as_dict() if self.events is not None else None,
        }


def diff(old_name: str, old_set: PolicySet, old_plan: Plan, new_name: str, new_set: PolicySet,
         new_plan: Plan, events: Outcome | None = None) -> Diff:
    return Diff(old_name, new_name, tuple(policy_diffs(old_set, new_set)),
                tuple(rule_diffs(old_set, new_set)), tuple(entry_diffs(old_plan, new_plan)),
                events)


# --- reports -----------------------------------------------------------------------------------

_SIGN = {"added": "+", "removed": "-", "changed": "~"}


def render_text(d: Diff) -> str:
    out = [f"guard diff {d.old} {d.new}: {d.summary()}"]
    if d.policies:
        out.append("policies:")
        out += [f"  {line}" for line in d.policies]
    if d.rules:
        out.append("rules:")
        for r in d.rules:
            what = r.after or r.before if r.change != "changed" else (
                f"{r.before}  ->  {r.after}" if r.before != r.after
                else f"{r.after} (its policy's mode or scope changed)")
            out.append(f"  {_SIGN[r.change]} {r.label} ({r.location}): {what}")
    if d.entries:
        out.append("map entries:")
        for s in d.entries:
            out.append(f"  scope {', '.join(s.scopes)}"
                       + ("" if s.status == "changed" else f" ({s.status})") + ":")
            for e in s.entries:
                sign = "+" if not e.before else "-" if not e.after else "~"
                value = (e.after or e.before) if sign != "~" else f"{e.before}  ->  {e.after}"
                out.append(f"    {sign} {e.section} {e.match}: {value}")
    if d.events is not None:
        if d.events.changes:
            out.append("recorded operations that change verdict, by the rule deciding in "
                       f"{d.new}:")
            out += render_groups(d.events)
        out += render_notes(d.events)
    if not d.changed():
        out.append("no difference")
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "-"


def render_markdown(d: Diff) -> str:
    """A pull-request comment."""
    out = [f"### guard diff `{d.old}` → `{d.new}`", "", f"**{_md(d.summary())}**", ""]
    if d.events is not None and d.events.count():
        counts = ", ".join(f"{d.events.count(e)} {e}" for e in EFFECTS)
        flag = "⚠️ " if d.events.count("blocked") else ""
        out += [f"{flag}Recorded operations changing verdict: {counts}.", ""]
    if d.policies:
        out += ["#### Policies", ""] + [f"- {_md(line)}" for line in d.policies] + [""]
    if d.rules:
        out += ["#### Rules", "", "| | rule | before | after | where |", "|---|---|---|---|---|"]
        out += [f"| {_SIGN[r.change]} | `{_md(r.label)}` | {_md(r.before)} | {_md(r.after)} | "
                f"`{_md(r.location)}` |" for r in d.rules]
        out.append("")
    if d.entries:
        out += ["#### Map entries", ""]
        for s in d.entries:
            status = "" if s.status == "changed" else f" ({s.status})"
            out += [f"<details><summary>scope {_md(', '.join(s.scopes))}{status}: "
                    f"{len(s.entries)} entr{'y' if len(s.entries) == 1 else 'ies'}</summary>",
                    "", "| entry | before | after |", "|---|---|---|"]
            out += [f"| {_md(e.section)} `{_md(e.match)}` | {_md(e.before)} | {_md(e.after)} |"
                    for e in s.entries]
            out += ["", "</details>", ""]
    if d.events is not None and d.events.changes:
        out += ["#### Recorded operations that change verdict", "",
                f"| rule in `{_md(d.new)}` | count | change | operation | was |",
                "|---|---|---|---|---|"]
        for g in d.events.groups():
            for change, count in g.changes:
                op = change.op
                out.append(
                    f"| `{_md(g.rule or 'no rule')}` | {count} | {change.effect}: "
                    f"{verdict_word(change.before.verdict)} → "
                    f"{verdict_word(change.after.verdict)} | {op.op} `{_md(op.target)}` "
                    f"from `{_md(op.cgroup)}` | {_md(change.before.rule or 'no rule')} |")
        out.append("")
    if d.events is not None:
        out += [f"> {_md(note)}" for note in render_notes(d.events)]
    if not d.changed():
        out.append("No difference.")
    return "\n".join(out).rstrip("\n") + "\n"


def render_json(d: Diff) -> str:
    return json.dumps(d.as_dict(), indent=2) + "\n"
