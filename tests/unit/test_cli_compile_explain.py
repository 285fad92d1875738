"""``guard compile`` and ``guard explain`` end to end, from YAML through the parser.

Golden files: each tests/golden/NAME.yaml compiles to exactly the bytes of
tests/golden/NAME.plan.json. After an intended change, regenerate them with

    GUARD_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_cli_compile_explain.py

and review the diff like code. Paths in the plans are relative to the repository,
so the tests run from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from guard.cli import main
from guard.policy.compile import compile_policies
from guard.policy.parse import load_policy_paths
from guard.policy.plan import Plan

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
GOLDEN_YAML = sorted(p.name for p in GOLDEN.glob("*.yaml"))
UPDATE = os.environ.get("GUARD_UPDATE_GOLDEN") == "1"


@pytest.fixture(autouse=True)
def at_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def load(path: str) -> Plan:
    result = load_policy_paths([path])
    assert not result.errors, result.errors
    assert result.policy_set is not None
    return compile_policies(result.policy_set)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --- golden plans --------------------------------------------------------------


def test_there_are_golden_files() -> None:
    assert len(GOLDEN_YAML) >= 3


@pytest.mark.parametrize("name", GOLDEN_YAML)
def test_golden_plan(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    source = f"tests/golden/{name}"
    expected_file = GOLDEN / name.replace(".yaml", ".plan.json")
    code, out, err = run(["compile", "--json", source], capsys)
    assert (code, err) == (0, "")
    assert out == load(source).to_json()  # the CLI prints the plan, byte for byte
    if UPDATE:
        expected_file.write_text(out)
    assert expected_file.exists(), f"run with GUARD_UPDATE_GOLDEN=1 to create {expected_file}"
    assert out == expected_file.read_text(), (
        f"{source} no longer compiles to {expected_file.name}; if intended, regenerate "
        f"with GUARD_UPDATE_GOLDEN=1 and review the diff")


def test_no_orphan_golden_plans() -> None:
    plans = {p.name.replace(".plan.json", ".yaml") for p in GOLDEN.glob("*.plan.json")}
    assert plans <= set(GOLDEN_YAML)


# --- guard compile -------------------------------------------------------------


def test_compile_summary(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["compile", "tests/golden/web-tier.yaml"], capsys)
    assert (code, err) == (0, "")
    assert out.startswith("1 ruleset(s), 1 scope(s), 9 rule(s), 2 port table(s)\n")
    assert "scope cgroups: /system.slice/nginx.service\n" in out
    assert "deny   /usr/bin/curl    web-tier/exec.rules[0] (tests/golden/web-tier.yaml:15:9)" \
        in out
    assert "tcp port 25              deny   web-tier/egress.rules[0] " \
           "(tests/golden/web-tier.yaml:26:11)" in out


def test_compile_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["compile", "--json", "--host-cgroup", "/guard",
                        "--unit-cgroup", "api.service=/custom/api", "tests/golden/egress.yaml"],
                       capsys)
    assert code == 0
    assert '"cgroup": "/guard"' in out
    assert '"cgroup": "/custom/api"' in out
    assert '"cgroup": "/system.slice/system-worker.slice/worker@1.service"' in out


def test_compile_invalid_policy_exits_1(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: guard/v1\nkind: Policy\nmetadata: {name: x}\n"
                   "spec: {exec: {default: maybe}}\n")
    code, out, err = run(["compile", str(bad)], capsys)
    assert code == 1 and out == ""
    assert f"{bad}:4:" in err and "error:" in err


def test_compile_port_table_limit_exits_1(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    ports = ", ".join(str(p) for p in range(1, 17))
    path = tmp_path / "wide.yaml"
    path.write_text(
        "apiVersion: guard/v1\nkind: Policy\nmetadata: {name: wide}\nspec:\n"
        "  network:\n    egress:\n      default: deny\n      rules:\n"
        f"        - {{action: allow, to: [10.0.0.0/8], ports: [{ports}], protocol: tcp}}\n")
    code, out, err = run(["compile", str(path)], capsys)
    assert code == 1 and out == ""
    assert err.startswith(f"{path}:9:11: error: the port table for 10.0.0.0/8")
    assert "at most 16" in err


# --- guard explain -------------------------------------------------------------


@pytest.mark.parametrize(("argv", "lines"), [
    (["--policies", "tests/golden/web-tier.yaml", "--unit", "nginx.service",
      "--as-written", "exec", "/usr/bin/curl"], [
        "deny: exec /usr/bin/curl from /system.slice/nginx.service",
        "  decided by web-tier/exec.rules[0] (tests/golden/web-tier.yaml:15:9): deny /usr/bin/curl",
        "  why: exact path match; more specific than the ruleset's default "
        "(allow by web-tier/exec.default (tests/golden/web-tier.yaml:13:5))",
        "  scope: /system.slice/nginx.service -> ruleset 0 (policies: web-tier)",
        "  effect: blocked, and reported as an event",
    ]),
    (["--policies", "tests/golden/egress.yaml", "--unit", "api.service",
      "connect", "2001:db8:100::1", "8050"], [
        "audit: connect [2001:db8:100::1]:8050/tcp from /system.slice/api.service",
        "  decided by api/egress.rules[4] (tests/golden/egress.yaml:19:11): audit to "
        "2001:db8:100::/48 ports 8000-8099 (any protocol)",
        "  why: longest matching prefix 2001:db8:100::/48; first matching line of its port "
        "table; next matching line: allow tcp any port by api/egress.rules[5] "
        "(tests/golden/egress.yaml:20:11)",
        "  scope: /system.slice/api.service -> ruleset 0 (policies: api, no-mail)",
        "  effect: allowed, and reported as an event",
    ]),
], ids=["exec", "connect"])
def test_explain_exact_output(argv: list[str], lines: list[str],
                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["explain", *argv], capsys)
    assert (code, err) == (0, "")  # a denial is still a successful explanation
    assert out.splitlines() == lines


def test_explain_open_and_default_cgroup(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["explain", "--policies", "tests/golden/layered.yaml",
                        "open", "/etc/shadow"], capsys)
    assert code == 0
    assert out.startswith("audit: open /etc/shadow for read from /\n"
                          "  decided by baseline/files.rules[0] (tests/golden/layered.yaml:16:9)")
    code, out, _ = run(["explain", "--policies", "tests/golden/layered.yaml",
                        "--cgroup", "/batch.slice/gpu/job7", "open", "/etc/hosts",
                        "--access", "write"], capsys)
    assert code == 0
    assert out.startswith("would-deny: open /etc/hosts for write from /batch.slice/gpu/job7\n"
                          "  decided by trial/files.rules[0]")
    assert "effect: allowed, and reported as an event" in out


def test_explain_connect(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--policies", "tests/golden/egress.yaml", "--unit", "api.service",
            "connect"]
    code, out, _ = run([*argv, "10.20.0.53", "53", "--protocol", "udp"], capsys)
    assert code == 0
    assert out.startswith("allow: connect 10.20.0.53:53/udp from /system.slice/api.service\n"
                          "  decided by api/egress.rules[1] ")
    code, out, _ = run([*argv, "::ffff:192.0.2.7", "443"], capsys)
    assert out.startswith("allow: connect 192.0.2.7:443/tcp")
    assert "IPv4-mapped" in out
    code, out, _ = run([*argv, "192.0.2.7", "25"], capsys)
    assert out.startswith("deny: connect 192.0.2.7:25/tcp")
    assert "default deny" in out
    code, out, _ = run(["explain", "--policies", "tests/golden/egress.yaml", "connect",
                        "192.0.2.7", "25"], capsys)
    assert out.startswith("would-deny: connect 192.0.2.7:25/tcp from /\n"
                          "  decided by no-mail/egress.rules[0]")


def test_explain_invalid_policy_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["explain", "--policies", "tests/fixtures/broken/bad-ports.yaml",
                          "exec", "/bin/sh"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith("tests/fixtures/broken/bad-ports.yaml:9:48: error: port 0 is out of "
                          "range: ports are 1..65535\n")
    assert "guard explain" not in err


def test_explain_unit_mapping(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["explain", "--policies", "tests/golden/egress.yaml",
                        "--unit-cgroup", "api.service=/custom/api", "--unit", "api.service",
                        "connect", "10.20.1.1", "5432"], capsys)
    assert code == 0
    assert out.startswith("allow: connect 10.20.1.1:5432/tcp from /custom/api\n")


def test_explain_uncovered_cgroup(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["explain", "--policies", "tests/golden/web-tier.yaml",
                        "--cgroup", "/user.slice", "exec", "/usr/bin/curl"], capsys)
    assert code == 0
    assert out.splitlines() == [
        "allow: exec /usr/bin/curl from /user.slice",
        "  decided by no rule: allowed",
        "  why: no policy covers /user.slice (scope cgroups: /system.slice/nginx.service), "
        "so nothing is checked",
    ]


@pytest.mark.parametrize("tail", [
    ["exec", "usr/bin/curl"],
    ["connect", "10.0.0.999", "80"],
    ["connect", "10.0.0.1", "70000"],
])
def test_explain_bad_target_exits_2(tail: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["explain", "--policies", "tests/golden/web-tier.yaml", *tail], capsys)
    assert code == 2 and out == ""
    assert err.startswith("guard explain: error: ")


@pytest.mark.parametrize(("unit", "message"), [
    # the same rule and words as guard check's bad-unit (guard/policy/units.py)
    ("default.target", "a .target unit runs no processes of its own: name the unit that does "
                       "(e.g. the .service it starts)"),
    ("-a.slice", "'-a.slice': a slice name cannot start or end with '-' or contain '--'"),
])
def test_explain_bad_unit_exits_2(unit: str, message: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["explain", "--policies", "tests/golden/web-tier.yaml",
                          f"--unit={unit}", "exec", "/bin/sh"], capsys)
    assert (code, out, err) == (2, "", f"guard explain: error: {message}\n")


def test_cli_in_a_real_process() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "guard", "explain", "--policies", "tests/golden/web-tier.yaml",
         "--cgroup", "/system.slice/nginx.service", "exec", "/tmp/x"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("deny: exec /tmp/x from /system.slice/nginx.service\n"
                                  "  decided by web-tier/exec.rules[1]")
