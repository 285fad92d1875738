"""``guard check`` runs every compile-time check, reads ``-`` from standard input,
and prints its diagnostics as JSON with ``--json``: a green check means ``guard run``
accepts the set."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from guard.cli import main
from guard.policy.check import check_paths

PORTS = ", ".join(str(p) for p in range(1, 41, 2))  # 20 ports: 21 lines with the default
TOO_MANY_PORTS = f"""\
apiVersion: guard/v1
kind: Policy
metadata: {{name: many-ports}}
spec:
  network:
    egress:
      rules:
        - action: deny
          to: ["0.0.0.0/0"]
          ports: [{PORTS}]
"""
VALID = """\
apiVersion: guard/v1
kind: Policy
metadata: {name: ok}
spec:
  exec:
    rules:
      - {action: deny, paths: [/usr/bin/curl]}
"""


class Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def run(argv: list[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, stdin: str | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", Stdin(stdin.encode()))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_port_table_overflow_fails_check_at_the_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "ports.yaml"
    policy.write_text(TOO_MANY_PORTS)
    code, out, err = run(["check", str(policy)], capsys, monkeypatch)
    assert code == 1 and out == ""
    first = err.splitlines()[0]
    assert first.startswith(f"{policy}:8:11: error: the port table for 0.0.0.0/0 ")
    assert "needs 21 lines" in first


def test_check_uses_the_host_cgroup_and_unit_mapping_as_compile_does(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(VALID.replace("spec:\n", "spec:\n  scope: {units: [web.service]}\n"))
    assert not check_paths([str(policy)]).errors
    bad = check_paths([str(policy)], host_cgroup="/a/../b")
    assert [d.code for d in bad.errors] == ["scope-cgroup"]
    mapped = check_paths([str(policy)], unit_cgroups={"web.service": "/custom.slice/web"})
    assert mapped.plan is not None
    assert [s.cgroup for s in mapped.plan.scopes] == ["/custom.slice/web"]


def test_stdin_is_read_for_dash(capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run(["check", "-"], capsys, monkeypatch, stdin=VALID)
    assert (code, err) == (0, "")
    assert out == "guard check: 1 policies in 1 file(s) are valid\n"
    code, out, err = run(["check", "-"], capsys, monkeypatch, stdin=TOO_MANY_PORTS)
    assert code == 1
    assert err.startswith("<stdin>:8:11: error: ")


def test_stdin_with_bad_bytes_is_positioned(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", Stdin(b"apiVersion: \xff\n"))
    assert main(["check", "-"]) == 1
    assert capsys.readouterr().err.startswith("<stdin>:1:13: error: not UTF-8 text")


def parsed(out: str) -> dict[str, Any]:
    value = json.loads(out)
    assert isinstance(value, dict)
    return value


def test_json_has_stable_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ok.yaml").write_text(VALID)
    code, out, err = run(["check", "--json", str(tmp_path), "-"], capsys, monkeypatch,
                         stdin=TOO_MANY_PORTS)
    assert (code, err) == (1, "")
    report = parsed(out)
    assert report == {
        "version": 1,
        "valid": False,
        "files": [str(tmp_path / "ok.yaml"), "<stdin>"],
        "policies": ["many-ports", "ok"],
        "tests": 0,
        "errors": 1,
        "warnings": 0,
        "diagnostics": [{
            "file": "<stdin>", "line": 8, "col": 11, "severity": "error",
            "code": "port-table-limit", "message": report["diagnostics"][0]["message"],
        }],
    }
    code, out, _ = run(["check", "--json", str(tmp_path)], capsys, monkeypatch)
    assert code == 0
    assert parsed(out)["valid"] is True and parsed(out)["diagnostics"] == []


def test_json_reports_parse_errors_with_positions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "bad.yaml").write_text(VALID.replace("/usr/bin/curl", "usr/bin/curl"))
    code, out, _ = run(["check", "--json", str(tmp_path)], capsys, monkeypatch)
    assert code == 1
    [diagnostic] = parsed(out)["diagnostics"]
    assert (diagnostic["line"], diagnostic["col"], diagnostic["code"]) == (7, 32, "relative-path")
    assert parsed(out)["policies"] == []
