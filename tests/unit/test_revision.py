"""The applied policy set is named by its git commit, or by a content hash."""

from __future__ import annotations

import subprocess
from pathlib import Path

from guard.policy.model import PolicySet
from guard.policy.parse import parse_text
from guard.policy.revision import content_hash, revision_of, rule_changes


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    ).stdout.strip()


def test_content_hash_changes_exactly_with_content(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("one")
    first = content_hash([a])
    assert content_hash([a]) == first
    a.write_text("two")
    assert content_hash([a]) != first


def test_outside_git_the_revision_is_the_content(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("one")
    rev = revision_of(tmp_path, [a])
    assert rev.kind == "content"
    assert rev.id == content_hash([a])
    assert str(rev).startswith("sha256:")


def test_in_git_the_revision_is_the_commit_and_dirtiness(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    a = tmp_path / "a.yaml"
    a.write_text("one")
    git(tmp_path, "add", "a.yaml")
    git(tmp_path, "commit", "-qm", "first")
    head = git(tmp_path, "rev-parse", "HEAD")
    rev = revision_of(tmp_path, [a])
    assert (rev.kind, rev.id, rev.dirty) == ("git", head, False)
    a.write_text("two")
    assert revision_of(tmp_path, [a]).dirty
    assert str(revision_of(tmp_path, [a])).endswith("+dirty")


# --- what a new set changes, rule by rule -----------------------------------------------

POLICY = """\
apiVersion: guard/v1
kind: Policy
metadata:
  name: {name}
spec:
  mode: {mode}
  network:
    egress:
      default: allow
      rules:
{rules}
"""


def policy_set(*policies: tuple[str, str, list[str]]) -> PolicySet:
    found = []
    for name, mode, rules in policies:
        text = POLICY.format(name=name, mode=mode,
                             rules="\n".join(f"        - {rule}" for rule in rules))
        parsed, diagnostics = parse_text(text, f"{name}.yaml")
        assert not [d for d in diagnostics if d.severity == "error"], diagnostics
        found.extend(parsed)
    return PolicySet(tuple(sorted(found, key=lambda p: p.name)))


DENY_25 = "{action: deny, to: [0.0.0.0/0], ports: [25]}"
DENY_465 = "{action: deny, to: [0.0.0.0/0], ports: [465]}"
ALLOW_10 = "{action: allow, to: [10.0.0.0/8]}"


def test_rule_changes_name_added_and_removed_rules() -> None:
    old = policy_set(("mail", "enforce", [DENY_25, DENY_465]))
    new = policy_set(("mail", "enforce", [DENY_25, ALLOW_10]))
    changes = rule_changes(old, new)
    assert changes.added == ("mail/egress.rules[1]",)
    assert changes.removed == ("mail/egress.rules[1]",)
    assert changes.summary() == ("+1 -1 rules (added: mail/egress.rules[1]; "
                                 "removed: mail/egress.rules[1])")


def test_moving_a_rule_is_no_change_and_the_same_set_is_none() -> None:
    old = policy_set(("mail", "enforce", [DENY_25, DENY_465]))
    assert not rule_changes(old, old)
    assert not rule_changes(old, policy_set(("mail", "enforce", [DENY_465, DENY_25])))
    assert rule_changes(old, old).summary() == "no rule added or removed"


def test_a_mode_change_changes_every_rule_of_the_policy() -> None:
    old = policy_set(("mail", "enforce", [DENY_25]), ("web", "enforce", [ALLOW_10]))
    new = policy_set(("mail", "audit", [DENY_25]), ("web", "enforce", [ALLOW_10]))
    changes = rule_changes(old, new)
    assert changes.added == changes.removed == ("mail/egress.default", "mail/egress.rules[0]")


def test_first_set_and_removed_policies() -> None:
    new = policy_set(("mail", "enforce", [DENY_25, DENY_465]))
    assert rule_changes(None, new).added == ("mail/egress.default", "mail/egress.rules[0]",
                                             "mail/egress.rules[1]")
    gone = rule_changes(new, PolicySet(()))
    assert len(gone.removed) == 3 and not gone.added
    assert gone.summary(names=1) == "+0 -3 rules (removed: mail/egress.default, ... 2 more)"
