"""Name the policy set that is applied: a git commit, or a hash of the content.

Operators review policies as pull requests, so the first question about a
running guard is "which commit is it enforcing?". When the policy directory is
inside a git work tree the revision is ``HEAD``'s commit, marked dirty when the
files guard read differ from it; otherwise it is a hash of the files' names and
bytes, which still changes exactly when the policy set does.

``rule_changes`` says what a new set changes, rule by rule, for the line the
daemon logs on every apply: a rule is the same rule when it says the same
thing in the same policy (its position and line do not matter), so moving a
rule or adding a comment is no change, and editing one is one removed and one
added.

git is asked with ``--no-optional-locks``: the daemon's ``git status`` must
never take ``.git/index.lock`` while the operator runs ``git checkout``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guard.errors import Location
from guard.policy.model import ExecRule, FileRule, NetRule, Policy, PolicySet


@dataclass(frozen=True)
class Revision:
    kind: str  # "git" | "content"
    id: str  # commit hash, or sha256 of the content
    dirty: bool = False
    content: str = ""  # sha256 of the content, always set

    def __str__(self) -> str:
        if self.kind == "git":
            return f"git:{self.id[:12]}" + ("+dirty" if self.dirty else "")
        return f"sha256:{self.id[:16]}"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "dirty": self.dirty, "content": self.content,
                "name": str(self)}


def content_hash(files: Sequence[str | Path]) -> str:
    digest = hashlib.sha256()
    for name in sorted(str(f) for f in files):
        try:
            data = Path(name).read_bytes()
        except OSError:
            data = b"\0missing"
        digest.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return digest.hexdigest()


def _git(directory: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", "-c", "core.fsmonitor=false", "-C", str(directory),
             *args],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def revision_of(directory: Path, files: Sequence[str | Path]) -> Revision:
    content = content_hash(files)
    commit = _git(directory, "rev-parse", "--verify", "HEAD")
    if commit:
        status = _git(directory, "status", "--porcelain", "--untracked-files=all", "--", ".")
        return Revision("git", commit, dirty=bool(status), content=content)
    return Revision("content", content, content=content)


# --- what a new set changes -------------------------------------------------------------


@dataclass(frozen=True)
class RuleChanges:
    """Rules (by label, ``policy/section.rules[i]`` or ``policy/section.default``)
    in the new set and not the old (``added``), and the other way round."""

    added: tuple[str, ...]
    removed: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)

    def summary(self, names: int = 3) -> str:
        """``+2 -1 rules (added: a, b; removed: c)``, at most ``names`` labels of each."""
        if not self:
            return "no rule added or removed"

        def few(labels: tuple[str, ...]) -> str:
            shown = ", ".join(labels[:names])
            return shown + (f", ... {len(labels) - names} more" if len(labels) > names else "")

        parts = [f"{what}: {few(labels)}" for what, labels in
                 (("added", self.added), ("removed", self.removed)) if labels]
        return f"+{len(self.added)} -{len(self.removed)} rules ({'; '.join(parts)})"


SectionRule = ExecRule | FileRule | NetRule


@dataclass(frozen=True)
class SectionItem:
    """A rule, or a section's default (``rule`` None), of one policy, with its label."""

    policy: Policy
    section: str  # exec | files | egress
    label: str  # POLICY/SECTION.rules[I] or POLICY/SECTION.default
    rule: SectionRule | None
    default: str  # the section's default (allow | deny) for a default item, else ""
    location: Location


def section_items(policy_set: PolicySet | None) -> Iterator[SectionItem]:
    """Every rule and section default of a policy set, policy by policy."""
    if policy_set is None:
        return
    for policy in policy_set.policies:
        for name in ("exec", "files", "egress"):
            section = getattr(policy, name)
            if section is None:
                continue
            default = getattr(section, "default", None)
            if default is not None:
                yield SectionItem(policy, name, f"{policy.name}/{name}.default", None,
                                  str(default), section.location)
            for rule in section.rules:
                yield SectionItem(policy, name, f"{policy.name}/{name}.rules[{rule.index}]",
                                  rule, "", rule.location)


def _rule_meanings(policy_set: PolicySet | None) -> Iterator[tuple[object, str]]:
    """(what the rule means, its label) for every rule and section default."""
    for item in section_items(policy_set):
        # mode and scope change what every rule of the policy does
        policy = item.policy
        context = (policy.name, policy.mode, policy.scope)
        if item.rule is None:
            yield (context, item.section, "default", item.default), item.label
        else:
            yield ((context, item.section, dataclasses.replace(item.rule, index=0)),
                   item.label)


def rule_changes(old: PolicySet | None, new: PolicySet | None) -> RuleChanges:
    before = Counter(meaning for meaning, _ in _rule_meanings(old))
    after = Counter(meaning for meaning, _ in _rule_meanings(new))
    added: list[str] = []
    removed: list[str] = []
    for meaning, label in _rule_meanings(new):
        if before[meaning] > 0:
            before[meaning] -= 1
        else:
            added.append(label)
    for meaning, label in _rule_meanings(old):
        if after[meaning] > 0:
            after[meaning] -= 1
        else:
            removed.append(label)
    return RuleChanges(tuple(added), tuple(removed))
