"""``guard explain`` decides a path as the kernel does: by the identity of the file it leads to.

A tmp tree of symlinks stands in for /bin/sh -> dash and /usr/bin/python3 ->
python3.11; guard.kernel.identity resolves the question with apply's own key
resolution, and the pure evaluator decides from those values.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.cli import main
from guard.kernel.identity import plan_paths, resolve_question
from guard.policy.compile import compile_policies
from guard.policy.evaluate import ResolvedPath, decide_exec, decide_open
from guard.policy.model import PolicySet
from guard.policy.parse import parse_text
from guard.policy.plan import Plan, Verdict


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """usr/bin/{dash,python3.11,curl}, bin -> usr/bin, sh -> dash, python3 -> python3.11,
    a hard link, and a directory symlink into a denied subtree."""
    bin_dir = tmp_path / "usr" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("dash", "python3.11", "curl"):
        (bin_dir / name).write_text("#!/bin/true\n")
    (bin_dir / "sh").symlink_to("dash")
    (bin_dir / "python3").symlink_to("python3.11")
    (bin_dir / "curl-hard").hardlink_to(bin_dir / "curl")
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "jail" / "inner").mkdir(parents=True)
    (tmp_path / "jail" / "inner" / "tool").write_text("x")
    (tmp_path / "door").symlink_to("jail/inner")
    return tmp_path


def policy_text(root: Path) -> str:
    return f"""\
apiVersion: guard/v1
kind: Policy
metadata: {{name: p}}
spec:
  exec:
    default: allow
    rules:
      - {{action: deny, paths: [{root}/usr/bin/dash, {root}/usr/bin/curl]}}
      - {{action: deny, paths: ["{root}/jail/**"]}}
  files:
    rules:
      - {{action: audit, access: [read], paths: [{root}/usr/bin/python3]}}
---
apiVersion: guard/v1
kind: Policy
metadata: {{name: q}}
spec:
  scope: {{cgroups: [/batch]}}
  exec:
    default: deny
    rules:
      - {{action: allow, paths: [{root}/usr/bin/python3]}}
"""


def plan_for(root: Path) -> Plan:
    policies, diagnostics = parse_text(policy_text(root), "p.yaml")
    assert not diagnostics
    return compile_policies(PolicySet(tuple(sorted(policies, key=lambda p: p.name))))


def resolved(plan: Plan, path: Path | str) -> ResolvedPath:
    return resolve_question(plan_paths(plan), str(path))


def test_a_symlink_to_a_denied_file_is_denied(tree: Path) -> None:
    plan = plan_for(tree)
    asked = tree / "bin" / "sh"
    by_text = decide_exec(plan, "/", str(asked))
    assert by_text.verdict is Verdict.ALLOW  # the string alone: the default
    by_identity = decide_exec(plan, "/", str(asked), resolved(plan, asked))
    assert by_identity.verdict is Verdict.DENY
    assert by_identity.matched == f"{tree}/usr/bin/dash"
    assert f"{asked} resolves to {tree}/usr/bin/dash" in "\n".join(by_identity.notes)


def test_an_allowlisted_symlink_allows_its_target(tree: Path) -> None:
    """The allowlist names python3 (a symlink); the kernel sees python3.11 as that file."""
    plan = plan_for(tree)
    target = tree / "usr" / "bin" / "python3.11"
    assert decide_exec(plan, "/batch", str(target)).verdict is Verdict.DENY
    answer = decide_exec(plan, "/batch", str(target), resolved(plan, target))
    assert answer.verdict is Verdict.ALLOW
    assert answer.rule is not None and answer.rule.label == "q/exec.rules[0]"
    assert any("names the same file" in note for note in answer.notes)


def test_a_hard_link_is_the_same_file(tree: Path) -> None:
    plan = plan_for(tree)
    link = tree / "usr" / "bin" / "curl-hard"
    assert decide_exec(plan, "/", str(link), resolved(plan, link)).verdict is Verdict.DENY


def test_a_directory_symlink_leads_into_a_denied_subtree(tree: Path) -> None:
    plan = plan_for(tree)
    asked = tree / "door" / "tool"
    assert decide_exec(plan, "/", str(asked)).verdict is Verdict.ALLOW
    answer = decide_exec(plan, "/", str(asked), resolved(plan, asked))
    assert answer.verdict is Verdict.DENY
    assert answer.matched == f"{tree}/jail/**"


def test_open_is_resolved_too(tree: Path) -> None:
    plan = plan_for(tree)
    asked = tree / "bin" / "python3.11"
    answer = decide_open(plan, "/", str(asked), "read", resolved(plan, asked))
    assert answer.verdict is Verdict.AUDIT


def test_a_missing_file_is_decided_by_its_text_and_says_so(tree: Path) -> None:
    plan = plan_for(tree)
    missing = tree / "jail" / "not-there"
    facts = resolved(plan, missing)
    assert facts == ResolvedPath(None)
    answer = decide_exec(plan, "/", str(missing), facts)
    assert answer.verdict is Verdict.DENY  # /jail/** by the text
    assert any("does not exist here" in note for note in answer.notes)


def test_explain_command_resolves_unless_as_written(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tree / "p.yaml"
    policy.write_text(policy_text(tree))
    asked = str(tree / "bin" / "sh")
    assert main(["explain", "--policies", str(policy), "exec", asked]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"deny: exec {asked} from /")
    assert f"note: {asked} resolves to {tree}/usr/bin/dash" in out
    assert main(["explain", "--policies", str(policy), "--as-written", "exec", asked]) == 0
    assert capsys.readouterr().out.startswith(f"allow: exec {asked} from /")
