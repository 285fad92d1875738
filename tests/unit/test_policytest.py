"""``guard test``: PolicyTest documents beside the policies, read with positions, run offline.

The shipped examples' tests run here, so CI (which runs pytest) runs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guard.cli import main
from guard.policy.load import load_policies
from guard.policy.parse import load_policy_paths
from guard.policy.plan import Verdict
from guard.policy.policytest import Expect, load_tests
from guard.policy.policytest import tests_of as documents_of
from guard.policy.text import verdict_word

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"

POLICY = """\
apiVersion: guard/v1
kind: Policy
metadata: {name: web}
spec:
  scope: {units: [nginx.service]}
  exec:
    rules:
      - {action: deny, paths: [/usr/bin/curl]}
"""
TEST = """\
apiVersion: guard/v1
kind: PolicyTest
metadata: {name: web-test}
spec:
  cases:
    - name: curl denied
      actor: {unit: nginx.service}
      exec: /usr/bin/curl
      expect: deny
      rule: web/exec.rules[0]
    - name: wrong verdict
      actor: {cgroup: /system.slice/nginx.service}
      exec: /usr/bin/curl
      expect: allow
    - name: wrong rule
      actor: {unit: nginx.service}
      exec: /usr/bin/curl
      expect: deny
      rule: web/exec.default
"""


def tree(tmp_path: Path, test: str = TEST) -> Path:
    (tmp_path / "web.yaml").write_text(POLICY)
    (tmp_path / "web.test.yaml").write_text(test)
    return tmp_path


def test_the_shipped_examples_pass_their_tests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", str(POLICIES)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.endswith(" failed\n")
    # every example policy has a test document naming it
    loaded = load_tests([str(POLICIES)])
    assert loaded.policy_set is not None
    tested = {t.name for t in documents_of(loaded)}
    assert tested == {p.name for p in loaded.policy_set.policies}
    assert all(len(t.cases) >= 3 for t in documents_of(loaded))


def test_failures_are_reported_and_exit_1(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", str(tree(tmp_path))]) == 1
    out = capsys.readouterr().out.splitlines()
    where = tmp_path / "web.test.yaml"
    assert out == [
        f"ok   web-test: curl denied ({where}:6:7)",
        f"FAIL web-test: wrong verdict ({where}:11:7)",
        "     exec /usr/bin/curl from cgroup /system.slice/nginx.service: expected allow, got deny",
        f"     decided by web/exec.rules[0] ({tmp_path / 'web.yaml'}:8:9)",
        f"FAIL web-test: wrong rule ({where}:15:7)",
        "     exec /usr/bin/curl from unit nginx.service: expected web/exec.default to decide, "
        "got web/exec.rules[0]",
        f"     decided by web/exec.rules[0] ({tmp_path / 'web.yaml'}:8:9)",
        "guard test: 1 passed, 2 failed",
    ]


def test_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", "--json", str(tree(tmp_path))]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["version"], report["passed"], report["failed"]) == (1, 1, 2)
    first = report["cases"][0]
    assert first == {
        "test": "web-test", "case": "curl denied", "file": str(tmp_path / "web.test.yaml"),
        "line": 6, "col": 7, "operation": "exec /usr/bin/curl from unit nginx.service",
        "expect": "deny", "expect_rule": "web/exec.rules[0]", "verdict": "deny",
        "rule": "web/exec.rules[0]", "passed": True, "problem": None,
    }
    assert report["diagnostics"] == []


BAD_TEST = """\
apiVersion: guard/v1
kind: PolicyTest
metadata: {name: bad}
spec:
  cases:
    - actor: {unit: nginx}
      exec: usr/bin/curl
      expect: denied
    - open: {path: /etc/shadow}
      expect: audit
    - connect: {to: example.com, port: 70000}
      expect: deny
      rule: web/exec.rule[0]
    - exec: /bin/true
      open: {path: /etc/shadow, access: read}
      expect: allow
    - expect: allow
      colour: blue
"""


def test_bad_tests_get_positioned_errors(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tree(tmp_path, BAD_TEST) / "web.test.yaml"
    assert main(["test", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    got = [line.split(": error: ")[0].removeprefix(f"{path}:") for line in err[:-1]]
    assert got == ["6:21", "7:13", "8:15", "9:13", "11:21", "11:40", "13:13", "15:7", "17:7",
                   "18:7"]
    assert err[-1] == "guard test: 10 error(s): no case was run"
    assert main(["check", str(tmp_path)]) == 1  # check validates tests too
    capsys.readouterr()


def test_enforcement_and_compile_ignore_test_documents(tmp_path: Path) -> None:
    """The daemon's loader skips PolicyTest documents, even broken ones."""
    tree(tmp_path, BAD_TEST)
    loaded = load_policy_paths([str(tmp_path)])
    assert loaded.errors == () and loaded.tests == ()
    assert loaded.policy_set is not None
    assert [p.name for p in loaded.policy_set.policies] == ["web"]
    daemon = load_policies(str(tmp_path), "/", unit_lookup=lambda units: {})
    assert not isinstance(daemon, tuple)
    assert [p.name for p in daemon.policy_set.policies] == ["web"]


def test_test_names_are_unique_among_tests_only(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(POLICY)
    same = TEST.replace("web-test", "web")  # a test may share its policy's name
    (tmp_path / "a.test.yaml").write_text(same)
    assert not load_tests([str(tmp_path)]).errors
    (tmp_path / "b.test.yaml").write_text(same)
    [error] = load_tests([str(tmp_path)]).errors
    assert error.code == "duplicate-name" and "duplicate test name 'web'" in error.message


def test_stdin_and_no_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "web.yaml").write_text(POLICY)
    assert main(["test", str(tmp_path)]) == 0
    assert "no test case found" in capsys.readouterr().out

    class Stdin:
        buffer = __import__("io").BytesIO(TEST.encode())

    monkeypatch.setattr("sys.stdin", Stdin())
    assert main(["test", str(tmp_path), "-"]) == 1
    assert "FAIL web-test: wrong verdict (<stdin>:11:7)" in capsys.readouterr().out


def test_expected_verdicts_are_the_words_explain_prints() -> None:
    assert [e.value for e in Expect] == [verdict_word(v) for v in Verdict]
