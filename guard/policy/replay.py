"""Recorded operations decided again: under another policy set, or under two of them.

``decide`` asks the evaluator (guard.policy.evaluate, the kernel's decision rule
over a compiled plan) about one recorded operation, exactly as the hook that
recorded it decides:

- exec: the exec walk, the ruleset's exec default included;
- map (a PROT_EXEC mapping, hooks mmap_file and file_mprotect): the same walk,
  but only an entry decides, never the default (bpf/exec.bpf.c): a mapping the
  default would refuse is allowed;
- open: each access recorded (read, write) on its own, the strongest verdict
  decides, as the kernel reports the open;
- connect: longest prefix, first matching port line, IPv4-mapped as IPv4.

``replay`` compares each operation's new verdict with the recorded one
(``guard replay``); ``compare`` compares the verdicts of two plans (``guard diff
--events``). A change is one of three effects: ``blocked`` (not blocked before,
blocked now), ``allowed`` (blocked before, not now) and ``reported`` (allowed
both times, but reported differently: audit, would-deny, or not at all).
Changes are grouped by the rule that decides now, with counts (folded repeats
counted), so a reviewer sees which rule of the change does what.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from guard.policy.evaluate import decide_connect, decide_exec, decide_open
from guard.policy.plan import Plan, RuleRef, Verdict
from guard.policy.recording import Problem, Recorded, Recording
from guard.policy.text import verdict_word

EFFECTS = ("blocked", "allowed", "reported")
FAIL_ON = ("any", "blocked")  # --fail-on: any change, or only a newly blocked operation
SAMPLES = 20  # distinct operations listed per group in the text report


@dataclass(frozen=True)
class Decided:
    """A verdict and the rule that gave it (its label and FILE:LINE:COL; "" for none)."""

    verdict: Verdict
    rule: str = ""
    location: str = ""

    @property
    def text(self) -> str:
        return f"{verdict_word(self.verdict)} ({self.rule or 'no rule'})"


def _decided(verdict: Verdict, rule: RuleRef | None) -> Decided:
    if rule is None:
        return Decided(verdict)
    return Decided(verdict, rule.label, str(rule.location))


def decide(plan: Plan, op: Recorded) -> Decided:
    """The verdict ``plan`` gives the recorded operation; ValueError when it cannot
    be asked (an address or path the evaluator refuses)."""
    if op.op in ("exec", "map"):
        answer = decide_exec(plan, op.cgroup, op.path)
        if op.op == "map" and answer.entry is None:
            return Decided(Verdict.ALLOW)  # mappings are refused by entries only
        return _decided(answer.verdict, answer.rule)
    if op.op == "open":
        answers = [decide_open(plan, op.cgroup, op.path, access) for access in op.access]
        strongest = max(answers, key=lambda a: a.verdict)  # the first of equals
        return _decided(strongest.verdict, strongest.rule)
    if op.op == "connect":
        answer = decide_connect(plan, op.cgroup, op.addr, op.port, op.proto)
        return _decided(answer.verdict, answer.rule)
    raise ValueError(f"unknown operation {op.op!r}")


def recorded(op: Recorded) -> Decided:
    """What the kernel said when the operation was recorded."""
    return Decided(op.verdict, op.rule)


def effect(before: Verdict, after: Verdict) -> str:
    if after.blocks and not before.blocks:
        return "blocked"
    if before.blocks and not after.blocks:
        return "allowed"
    return "reported"


@dataclass(frozen=True)
class Change:
    """One recorded operation whose verdict changes."""

    op: Recorded
    before: Decided
    after: Decided

    @property
    def effect(self) -> str:
        return effect(self.before.verdict, self.after.verdict)

    def key(self) -> tuple[object, ...]:
        return (self.op.key(), self.before, self.after)

    def as_dict(self, count: int) -> dict[str, object]:
        return {"op": self.op.op, "cgroup": self.op.cgroup, "target": self.op.target,
                "where": self.op.where, "count": count, "effect": self.effect,
                "before": verdict_word(self.before.verdict), "before_rule": self.before.rule,
                "after": verdict_word(self.after.verdict), "after_rule": self.after.rule,
                "after_location": self.after.location}


@dataclass(frozen=True)
class Group:
    """The changes one rule makes: distinct operations, each with how often it occurred."""

    rule: str  # the rule deciding after; "" for none
    location: str
    changes: tuple[tuple[Change, int], ...]  # (first occurrence, operations)

    @property
    def count(self) -> int:
        return sum(n for _, n in self.changes)


@dataclass(frozen=True)
class Outcome:
    """What deciding a recording again found."""

    operations: int  # decided, folded repeats counted
    changes: tuple[Change, ...]
    unreplayable: tuple[Problem, ...]  # operations the evaluator could not be asked about
    recording: Recording

    def count(self, which: str | None = None) -> int:
        return sum(c.op.count for c in self.changes if which is None or c.effect == which)

    def failed(self, fail_on: str = "any") -> bool:
        """Whether a CI gate fails: on any change, or on a newly blocked operation only."""
        return self.count("blocked" if fail_on == "blocked" else None) > 0

    def groups(self) -> list[Group]:
        first: dict[tuple[str, str], dict[tuple[object, ...], Change]] = {}
        counts: dict[tuple[object, ...], int] = {}
        for change in self.changes:
            rule = (change.after.rule, change.after.location)
            key = change.key()
            first.setdefault(rule, {}).setdefault(key, change)
            counts[key] = counts.get(key, 0) + change.op.count
        groups = [Group(rule, location, tuple((c, counts[k]) for k, c in ops.items()))
                  for (rule, location), ops in first.items()]
        return sorted(groups, key=lambda g: (-g.count, g.rule))

    def summary(self) -> str:
        counts = ", ".join(f"{self.count(e)} {_EFFECT_WORDS[e]}" for e in EFFECTS)
        return f"{self.count()} of {self.operations} change verdict ({counts})"

    def as_dict(self) -> dict[str, object]:
        return {
            "operations": self.operations, "changed": self.count(),
            "by_effect": {e: self.count(e) for e in EFFECTS},
            "groups": [{"rule": g.rule, "location": g.location, "count": g.count,
                        "changes": [c.as_dict(n) for c, n in g.changes]}
                       for g in self.groups()],
            "unreplayable": [str(p) for p in self.unreplayable],
            "recording": {"files": list(self.recording.files), "lines": self.recording.lines,
                          "skipped": self.recording.skipped, "lost": self.recording.lost,
                          "problems": [str(p) for p in self.recording.problems]},
        }


_EFFECT_WORDS = {"blocked": "now blocked", "allowed": "now allowed",
                 "reported": "reported differently"}

Decider = Callable[[Recorded], Decided]


def compare(recording: Recording, before: Decider, after: Decider) -> Outcome:
    """Each operation decided twice; the ones whose verdict differs. ``after`` is asked
    once per distinct operation (a recording repeats itself), ``before`` per line."""
    changes: list[Change] = []
    unreplayable: list[Problem] = []
    operations = 0
    decided: dict[tuple[object, ...], Decided | ValueError] = {}
    for op in recording.operations:
        key = op.key()
        if key not in decided:
            try:
                decided[key] = after(op)
            except ValueError as error:
                decided[key] = error
        try:
            new = decided[key]
            if isinstance(new, ValueError):
                raise new
            old = before(op)
        except ValueError as error:
            unreplayable.append(Problem(op.file, op.line, f"cannot decide {op.op} "
                                        f"{op.target}: {error}"))
            continue
        operations += op.count
        if old.verdict != new.verdict:
            changes.append(Change(op, old, new))
    return Outcome(operations, tuple(changes), tuple(unreplayable), recording)


def replay(plan: Plan, recording: Recording) -> Outcome:
    """``guard replay``: the recorded verdicts against ``plan``'s."""
    return compare(recording, recorded, lambda op: decide(plan, op))


def compare_plans(old: Plan, new: Plan, recording: Recording) -> Outcome:
    """``guard diff --events``: ``old``'s verdicts against ``new``'s."""
    cache: dict[tuple[object, ...], Decided] = {}

    def before(op: Recorded) -> Decided:
        if op.key() not in cache:
            cache[op.key()] = decide(old, op)
        return cache[op.key()]

    return compare(recording, before, lambda op: decide(new, op))


# --- reports ----------------------------------------------------------------------


def _change_line(change: Change, count: int) -> str:
    return (f"    {count:>5}x {_EFFECT_WORDS[change.effect]:<20} "
            f"{verdict_word(change.before.verdict)} -> {verdict_word(change.after.verdict)}: "
            f"{change.op.op} {change.op.target} from {change.op.cgroup} "
            f"(was {change.before.rule or 'no rule'}; {change.op.where})")


def render_groups(outcome: Outcome, samples: int = SAMPLES) -> list[str]:
    out: list[str] = []
    for group in outcome.groups():
        where = f" ({group.location})" if group.location else ""
        out.append(f"  {group.rule or 'no rule (allowed)'}{where}: {group.count} operation(s)")
        out += [_change_line(c, n) for c, n in group.changes[:samples]]
        if len(group.changes) > samples:
            out.append(f"    ... {len(group.changes) - samples} more distinct operation(s)")
    return out


def render_notes(outcome: Outcome) -> list[str]:
    """What the recording could not say: lost events, undecided and unreplayable ones."""
    rec = outcome.recording
    out: list[str] = []
    if rec.lost:
        out.append(f"note: the recording reports {rec.lost} lost event(s): those operations "
                   f"are not in it")
    undecided = sum(op.count for op in rec.operations if op.undecided)
    if undecided:
        out.append(f"note: {undecided} operation(s) were undecided in the kernel (a bounded "
                   f"walk did not finish); their recorded verdict is the mode's")
    out += [f"note: {p.file}:{p.line}: {p.message}" for p in outcome.unreplayable]
    return out


def render_replay(outcome: Outcome, policies: Iterable[str]) -> str:
    rec = outcome.recording
    out = [f"guard replay: {len(rec.operations)} recorded line(s) of "
           f"{', '.join(rec.files)} decided under {', '.join(policies)}: {outcome.summary()}"]
    out += render_groups(outcome)
    out += render_notes(outcome)
    return "\n".join(out) + "\n"
