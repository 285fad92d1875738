"""``guard diff OLD NEW``: directories and git revisions of a policy directory compared
by rules, map entries and recorded operations."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from recordings import connect_event, exec_event, write

from guard.cli import main
from guard.errors import ExitCode

REPO = Path(__file__).resolve().parents[2]

WEB = """\
apiVersion: guard/v1
kind: Policy
metadata: {name: web}
spec:
  mode: enforce
  scope: {units: [nginx.service]}
  exec:
    default: allow
    rules:
      - {action: deny, paths: [/usr/bin/curl, /usr/bin/wget]}
      - {action: deny, paths: ["/tmp/**"]}
  network:
    egress:
      default: allow
      rules:
        - {action: deny, to: [0.0.0.0/0], ports: [25], protocol: tcp}
"""


def edited(text: str) -> str:
    """curl leaves the deny list, a rule for python3 comes, SMTP submission is denied too."""
    return (text.replace("[/usr/bin/curl, /usr/bin/wget]", "[/usr/bin/wget]")
            .replace("ports: [25]", "ports: [25, 587]")
            .replace('      - {action: deny, paths: ["/tmp/**"]}\n',
                     '      - {action: deny, paths: ["/tmp/**"]}\n'
                     "      - {action: deny, paths: [/usr/bin/python3]}\n"))


def tree(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "web.yaml").write_text(text)
    return root


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


def test_rules_and_map_entries_of_two_directories(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    old, new = tree(tmp_path / "old", WEB), tree(tmp_path / "new", edited(WEB))
    assert main(["diff", str(old), str(new)]) == ExitCode.CHANGED
    out = capsys.readouterr().out
    assert "1 rule(s) added, 0 removed, 2 changed" in out
    assert (f"  + web/exec.rules[2] ({new}/web.yaml:12:9): deny exec /usr/bin/python3"
            in out)
    assert (f"  ~ web/exec.rules[0] ({new}/web.yaml:10:9): deny exec /usr/bin/curl, "
            "/usr/bin/wget  ->  deny exec /usr/bin/wget") in out
    assert "  scope /system.slice/nginx.service:" in out
    assert "    - exec /usr/bin/curl: deny (web/exec.rules[0])" in out
    assert "    + exec /usr/bin/python3: deny (web/exec.rules[2])" in out
    assert "    + egress to 0.0.0.0/0 tcp port 587: deny (web/egress.rules[0])" in out
    # the same set twice: nothing, and exit 0; a moved rule is no change
    assert main(["diff", str(old), str(old)]) == ExitCode.OK
    assert "no difference" in capsys.readouterr().out


def test_a_moved_rule_changes_only_the_labels_of_entries(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    swapped = WEB.replace(
        '      - {action: deny, paths: [/usr/bin/curl, /usr/bin/wget]}\n'
        '      - {action: deny, paths: ["/tmp/**"]}\n',
        '      - {action: deny, paths: ["/tmp/**"]}\n'
        '      - {action: deny, paths: [/usr/bin/curl, /usr/bin/wget]}\n')
    main(["diff", str(tree(tmp_path / "a", WEB)), str(tree(tmp_path / "b", swapped))])
    out = capsys.readouterr().out
    assert "0 rule(s) added, 0 removed, 0 changed" in out
    assert ("~ exec /usr/bin/curl: deny (web/exec.rules[0])  ->  deny (web/exec.rules[1])"
            in out)


def test_git_revisions_of_the_policy_directory(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    git(tmp_path, "init", "-q")
    policies = tree(tmp_path / "policies", WEB)
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "one")
    (policies / "web.yaml").write_text(edited(WEB))
    git(tmp_path, "commit", "-qam", "two")
    (policies / "web.yaml").write_text(WEB.replace("default: allow", "default: dney", 1))
    git(tmp_path, "commit", "-qam", "three")
    monkeypatch.chdir(tmp_path)
    assert main(["diff", "HEAD~2", "HEAD~1", "--format", "markdown"]) == ExitCode.CHANGED
    out = capsys.readouterr().out
    assert out.startswith("### guard diff `HEAD~2` → `HEAD~1`\n")
    assert ("| + | `web/exec.rules[2]` | - | deny exec /usr/bin/python3 | "
            "`HEAD~1:policies/web.yaml:12:9` |") in out
    assert "<details><summary>scope /system.slice/nginx.service: 3 entries</summary>" in out
    assert "guard-diff-" not in out  # temporary directories are named as the revision
    # a revision holding an invalid policy: its errors, named REV:PATH, and exit 1
    assert main(["diff", "HEAD~1", "HEAD"]) == ExitCode.INVALID
    err = capsys.readouterr().err
    assert "HEAD:policies/web.yaml:8:14: error:" in err and "guard-diff-" not in err
    # a revision and the work tree's directory; from another directory with --policies
    assert main(["diff", "HEAD~2", "policies"]) == ExitCode.INVALID
    capsys.readouterr()
    monkeypatch.chdir(REPO)
    assert main(["diff", "--policies", str(policies), "HEAD~2", "HEAD~2"]) == ExitCode.OK
    assert main(["diff", "--policies", str(policies), "no-such-rev", "HEAD"]) == ExitCode.USAGE
    assert "neither a path nor a git revision" in capsys.readouterr().err


def test_recorded_operations_that_change_verdict(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    old, new = tree(tmp_path / "old", WEB), tree(tmp_path / "new", edited(WEB))
    rec = write(tmp_path / "rec.jsonl", [
        exec_event("/usr/bin/curl", action="deny", rule="web/exec.rules[0]", count=2),
        exec_event("/usr/bin/python3", action="audit", count=5),
        connect_event("192.0.2.1", 587, action="audit"),
        connect_event("192.0.2.1", 443, action="audit"),
    ])
    assert main(["diff", str(old), str(new), "--events", str(rec), "--format", "json"]) == (
        ExitCode.CHANGED)
    body = json.loads(capsys.readouterr().out)
    assert body["events"]["by_effect"] == {"blocked": 6, "allowed": 2, "reported": 0}
    rules = {g["rule"]: g["count"] for g in body["events"]["groups"]}
    assert rules == {"web/exec.rules[2]": 5, "web/exec.default": 2, "web/egress.rules[0]": 1}
    # a gate on newly blocked operations only
    assert main(["diff", str(old), str(new), "--events", str(rec), "--fail-on",
                 "blocked"]) == ExitCode.CHANGED
    # back from new to old: curl is blocked again; without curl, only python3 is let run
    assert main(["diff", str(new), str(old), "--events", str(rec), "--fail-on",
                 "blocked"]) == ExitCode.CHANGED
    rec2 = write(tmp_path / "rec2.jsonl", [exec_event("/usr/bin/python3", action="deny",
                                                      rule="web/exec.rules[2]")])
    assert main(["diff", str(new), str(old), "--events", str(rec2), "--fail-on",
                 "blocked"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "now allowed" in out and "web/exec.default" in out
    assert main(["diff", str(old), str(new), "--fail-on", "blocked"]) == ExitCode.USAGE


def test_the_example_policies_against_themselves(tmp_path: Path) -> None:
    copy = tmp_path / "policies"
    shutil.copytree(REPO / "policies", copy)
    assert main(["diff", str(REPO / "policies"), str(copy)]) == ExitCode.OK
