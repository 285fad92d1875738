"""``guard check`` warns about rules that can never decide, with both positions."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.cli import main
from guard.errors import Code
from guard.policy.check import check_paths
from guard.policy.compile import compile_policies
from guard.policy.evaluate import decide_connect, decide_exec
from guard.policy.model import PolicySet
from guard.policy.parse import parse_text
from guard.policy.plan import Verdict

SHADOWED = """\
apiVersion: guard/v1
kind: Policy
metadata: {name: sh}
spec:
  exec:
    rules:
      - {action: deny, paths: [/usr/bin/curl, "/tmp/**"]}
      - {action: allow, paths: [/usr/bin/curl]}
      - {action: deny, paths: ["/tmp/**", /usr/bin/wget]}
      - {action: allow, paths: [/tmp]}
  files:
    rules:
      - {action: deny, access: [write], paths: [/etc/passwd]}
      - {action: audit, access: [read, write], paths: [/etc/passwd]}
      - {action: audit, access: [write], paths: [/etc/passwd]}
  network:
    egress:
      rules:
        - {action: deny, to: ["0.0.0.0/0"], ports: [25], protocol: tcp}
        - {action: allow, to: ["0.0.0.0/0"], ports: [25], protocol: tcp}
        - {action: allow, to: ["10.0.0.0/8"]}
        - {action: allow, to: ["10.0.0.0/8", "192.168.0.0/16"]}
        - {action: allow, to: ["10.0.0.0/8"], ports: [25]}
        - {action: audit, to: ["10.0.0.0/8"]}
"""


def warnings(tmp_path: Path, text: str) -> list[tuple[int, int, str]]:
    policy = tmp_path / "p.yaml"
    policy.write_text(text)
    result = check_paths([str(policy)])
    assert not result.errors
    assert all(d.code == Code.SHADOWED_RULE for d in result.warnings)
    return [(d.location.line, d.location.col, d.message) for d in result.warnings]


def test_each_dead_rule_or_path_is_reported_with_the_deciding_rule(tmp_path: Path) -> None:
    found = warnings(tmp_path, SHADOWED)
    where = str(tmp_path / "p.yaml")
    assert found == [
        (8, 33, f"/usr/bin/curl in sh/exec.rules[1] never decides: sh/exec.rules[0] "
                f"({where}:7:9) names it too and decides it (deny wins a tie with allow)"),
        (9, 32, f"/tmp/** in sh/exec.rules[2] never decides: sh/exec.rules[0] ({where}:7:9) "
                f"names it too and decides it (the same deny, and it comes first)"),
        (15, 50, f"/etc/passwd in sh/files.rules[2] never decides: sh/files.rules[0] "
                 f"({where}:13:9) names it too and decides it (deny wins a tie with audit)"),
        (20, 11, f"sh/egress.rules[1] never decides: every address, port and protocol it names "
                 f"is decided first by sh/egress.rules[0] ({where}:19:11) "
                 f"(deny wins a tie with allow)"),
        (21, 11, f"sh/egress.rules[2] never decides: every address, port and protocol it names "
                 f"is decided first by sh/egress.rules[5] ({where}:24:11) "
                 f"(audit wins a tie with allow)"),
    ]


def test_the_warnings_agree_with_the_evaluator(tmp_path: Path) -> None:
    """What check calls dead is what the compiled plan never decides by."""
    policies, diagnostics = parse_text(SHADOWED, "p.yaml")
    assert not diagnostics
    plan = compile_policies(PolicySet(tuple(policies)))
    curl = decide_exec(plan, "/", "/usr/bin/curl")
    assert curl.verdict is Verdict.DENY and curl.rule is not None
    assert curl.rule.label == "sh/exec.rules[0]"
    smtp = decide_connect(plan, "/", "8.8.8.8", 25, "tcp")
    assert smtp.rule is not None and smtp.rule.label == "sh/egress.rules[0]"
    private = decide_connect(plan, "/", "10.1.1.1", 443, "tcp")
    assert private.rule is not None and private.rule.label == "sh/egress.rules[5]"


def test_live_rules_are_not_reported(tmp_path: Path) -> None:
    """A subtree and its directory, a wider rule under a narrower one, partial overlaps."""
    text = """\
apiVersion: guard/v1
kind: Policy
metadata: {name: live}
spec:
  exec:
    rules:
      - {action: deny, paths: ["/opt/**"]}
      - {action: allow, paths: [/opt/tool, /opt]}
  files:
    rules:
      - {action: deny, access: [write], paths: [/etc/passwd]}
      - {action: audit, access: [read, write], paths: [/etc/passwd]}
  network:
    egress:
      rules:
        - {action: deny, to: ["0.0.0.0/0"], ports: [25]}
        - {action: allow, to: ["0.0.0.0/0"], ports: ["20-30"]}
        - {action: allow, to: ["0.0.0.0/0"], ports: [25], protocol: tcp}
"""
    assert warnings(tmp_path, text) == []


ONE = """\
apiVersion: guard/v1
kind: Policy
metadata: {name: NAME}
spec:
  mode: MODE
  SCOPE
  exec: {rules: [{action: ACTION, paths: [/usr/bin/curl]}]}
"""


def one(name: str, action: str, scope: str = "", mode: str = "enforce") -> str:
    return ONE.replace("NAME", name).replace("ACTION", action).replace("MODE", mode) \
        .replace("SCOPE", scope)


def test_a_policy_always_beside_another_is_shadowed_by_it(tmp_path: Path) -> None:
    """b applies only where a does too: a's deny decides wherever b's allow could."""
    text = one("a", "deny") + "---\n" + one("b", "allow", "scope: {cgroups: [/x]}")
    [(line, col, message)] = warnings(tmp_path, text)
    assert (line, col) == (15, 42)
    assert message.startswith("/usr/bin/curl in b/exec.rules[0] never decides: a/exec.rules[0] (")
    assert message.endswith(":7:18) names it too and decides it (deny wins a tie with allow)")


def test_policies_apart_or_of_other_modes_do_not_shadow_each_other(tmp_path: Path) -> None:
    apart = one("a", "deny", "scope: {cgroups: [/y]}") + "---\n" + \
        one("b", "allow", "scope: {cgroups: [/x]}")
    assert warnings(tmp_path, apart) == []
    # a is in a ruleset without b (/), so b's deny does not make a's allow dead
    wider = one("a", "allow") + "---\n" + one("b", "deny", "scope: {cgroups: [/x]}")
    assert warnings(tmp_path, wider) == []
    modes = one("a", "deny", mode="audit") + "---\n" + one("b", "allow")
    assert warnings(tmp_path, modes) == []
    # both deny: each policy means it, and each decides where the other is absent
    same = one("a", "deny") + "---\n" + one("b", "deny", "scope: {cgroups: [/x]}")
    assert warnings(tmp_path, same) == []


def test_check_prints_warnings_and_still_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(SHADOWED)
    assert main(["check", str(policy)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "guard check: 1 policies in 1 file(s) are valid\n"
    assert len(captured.err.splitlines()) == 5
    assert captured.err.startswith(f"{policy}:8:33: warning: /usr/bin/curl in sh/exec.rules[1]")
