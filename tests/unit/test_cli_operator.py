"""The operator's command-line defects of issue 16: each refused at once, with a hint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import need

from guard import __version__
from guard.cli import build_parser, main
from guard.errors import ExitCode
from guard.policy.arguments import cgroup_argument, unit_cgroup_argument


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"guard {__version__}"


def test_exit_codes_and_targets_are_in_the_help() -> None:
    text = build_parser().format_help()
    for line in ("0  success", "1  invalid policy input", "2  usage error",
                 "3  runtime failure"):
        assert line in text
    for code in ExitCode:  # every code a command can exit with is listed
        assert f"\n  {int(code)}  " in text, code
    run = build_parser()._subparsers._group_actions[0].choices["run"].format_help()  # type: ignore[union-attr]
    for target in ("/dev/log", "unix:PATH", "udp://HOST:PORT", "tcp://HOST:PORT", "file:PATH",
                   "authpriv", "/var/log/auth.log", "journal", "guard events"):
        assert target in run, target
    assert "3  runtime failure" in run


@pytest.mark.parametrize("text, hint", [
    ("/sys/fs/cgroup/unified/guard-test", "write '/guard-test'"),
    ("/sys/fs/cgroup/system.slice", "write '/system.slice'"),
    ("/sys/fs/cgroup", "write '/'"),
    ("system.slice", "starts with /"),
    ("/a/../b", "'..'"),
])
def test_host_cgroup_with_the_mount_point_is_refused(text: str, hint: str) -> None:
    with pytest.raises(ValueError, match="--host-cgroup") as error:
        cgroup_argument(text)
    assert hint in str(error.value)


def test_host_cgroup_is_refused_before_any_work(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as done:
        main(["run", "--policies", str(tmp_path), "--host-cgroup",
              "/sys/fs/cgroup/unified/x"])
    assert done.value.code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "cgroup paths are relative to the cgroup2 mount; write '/x'" in err
    assert err.count("/sys/fs/cgroup/unified/x") == 2  # as given, once in the hint


def test_normal_cgroups_pass() -> None:
    assert cgroup_argument("/") == "/"
    assert cgroup_argument("/system.slice//nginx.service/") == "/system.slice/nginx.service"


@pytest.mark.parametrize("text, hint", [
    ("=x", "write UNIT=CGROUP"),
    ("nginx.service", "write UNIT=CGROUP"),
    ("nginx.service=", "write UNIT=CGROUP"),
    ("nginx.service=system.slice/nginx.service", "starts with /"),
    ("nginx=/system.slice/nginx.service", "did you mean 'nginx.service'"),
    ("nginx.service=/sys/fs/cgroup/system.slice", "write '/system.slice'"),
])
def test_unit_cgroup_is_checked(text: str, hint: str) -> None:
    with pytest.raises(ValueError) as error:
        unit_cgroup_argument(text)
    assert hint in str(error.value)


def test_unit_cgroup_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert unit_cgroup_argument("nginx.service=/system.slice/nginx.service") == (
        "nginx.service", "/system.slice/nginx.service")
    with pytest.raises(SystemExit) as done:
        main(["compile", "policies", "--unit-cgroup", "=x"])
    assert done.value.code == ExitCode.USAGE
    assert "write UNIT=CGROUP" in capsys.readouterr().err


def test_run_with_a_policy_file_says_what_to_do(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    policy = tmp_path / "one.yaml"
    policy.write_text("apiVersion: guard/v1\n")
    assert main(["run", "--policies", str(policy), "--state-dir", str(tmp_path / "s")]) \
        == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "is a file; guard run takes a directory" in err
    assert "put the file in a directory of its own" in err


def test_status_json_without_a_daemon_is_json(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    code = main(["status", "--json", "--state-dir", str(tmp_path / "none"),
                 "--pin-dir", str(tmp_path / "pins")])
    assert code == ExitCode.RUNTIME  # unchanged: nothing answers
    captured = capsys.readouterr()
    body = json.loads(captured.out)
    assert body["running"] is False and body["pinned"] == []
    assert body["error"] == "no daemon is running"
    assert "no daemon is running" in captured.err


def test_events_without_a_daemon(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["events", "--state-dir", str(tmp_path)]) == ExitCode.RUNTIME
    assert "no daemon is running" in capsys.readouterr().err


def test_metrics_address() -> None:
    from guard.service.metrics import MetricsError, parse_address

    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    assert parse_address(":9464") == ("0.0.0.0", 9464)
    for bad in ("9464", "localhost:http", "127.0.0.1:70000"):
        with pytest.raises(MetricsError, match="ADDR:PORT"):
            parse_address(bad)


def test_a_missing_host_cgroup_is_refused_before_the_compile(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from guard.kernel.cgroups import CgroupError, cgroup2_mount

    try:
        cgroup2_mount()
        mounted = True
    except CgroupError:
        mounted = False
    need(mounted, "no cgroup2 mount on this machine")
    assert main(["run", "--policies", str(tmp_path), "--host-cgroup", "/guard-no-such-cgroup",
                 "--state-dir", str(tmp_path / "s")]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "--host-cgroup /guard-no-such-cgroup: no such cgroup" in err and "mkdir" in err
    assert not (tmp_path / "s").exists()
