"""The daemon's pure parts and sd_notify, without a kernel (tests/host/test_daemon.py
runs the real daemon)."""

from __future__ import annotations

import argparse
import secrets
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from guard import notify
from guard.daemon import (
    PolicyLoad,
    families_to_load,
    format_status,
    load_policies,
    needed_sections,
    unenforced,
)

POLICY = textwrap.dedent("""\
    apiVersion: guard/v1
    kind: Policy
    metadata:
      name: {name}
    spec:
      mode: enforce
      exec:
        default: allow
        rules:
          - {{action: deny, paths: [/usr/bin/wget]}}
      network:
        egress:
          default: allow
          rules:
            - {{action: deny, to: [10.0.0.0/8], ports: [25], protocol: tcp}}
    """)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


# --- sd_notify --------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[tuple[str, socket.socket]]:
    name = f"@guard-unit-notify-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name[1:].encode())
    sock.settimeout(2)
    try:
        yield name, sock
    finally:
        sock.close()


def test_notify_abstract_socket(listener: tuple[str, socket.socket]) -> None:
    name, sock = listener
    assert notify.notify("READY=1\nSTATUS=enforcing", {"NOTIFY_SOCKET": name})
    assert sock.recv(4096) == b"READY=1\nSTATUS=enforcing"


def test_notify_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        assert notify.notify("STOPPING=1", {"NOTIFY_SOCKET": str(path)})
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_helpers_use_the_environment(listener: tuple[str, socket.socket],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    name, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    assert notify.ready("enforcing 2 policies")
    assert sock.recv(4096) == b"READY=1\nSTATUS=enforcing 2 policies"
    assert notify.reloading()
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].split("=")[1]) > 0
    assert notify.status("x") and sock.recv(4096) == b"STATUS=x"
    assert notify.stopping() and sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("value", ["", "relative/path", "/nonexistent/guard-notify.sock"])
def test_notify_without_a_manager_is_a_quiet_no(value: str) -> None:
    assert notify.notify("READY=1", {"NOTIFY_SOCKET": value}) is False


def test_notify_unset() -> None:
    assert notify.notify("READY=1", {}) is False


# --- loading a directory ------------------------------------------------------------------


def test_load_policies_valid(tmp_path: Path) -> None:
    write(tmp_path, "mail", POLICY.format(name="mail"))
    loaded = load_policies(str(tmp_path), "/", unit_lookup=lambda units: {})
    assert isinstance(loaded, PolicyLoad)
    assert [p.name for p in loaded.policy_set.policies] == ["mail"]
    assert loaded.files == (str(tmp_path / "mail.yaml"),)
    assert str(loaded.revision).startswith(("sha256:", "git:"))
    assert len(loaded.plan.rules) == 4  # two rules and two defaults


def test_load_policies_errors_are_positioned(tmp_path: Path) -> None:
    path = write(tmp_path, "bad", POLICY.format(name="bad").replace("ports: [25]",
                                                                     "ports: [99999]"))
    diagnostics = load_policies(str(tmp_path), "/", unit_lookup=lambda units: {})
    assert not isinstance(diagnostics, PolicyLoad)
    errors = [d for d in diagnostics if d.severity == "error"]
    assert errors and all(d.location.file == str(path) for d in errors)
    assert errors[0].location.line == 15
    assert str(errors[0]).startswith(f"{path}:15:")


def test_unenforced_names_each_section(tmp_path: Path) -> None:
    write(tmp_path, "a", POLICY.format(name="a"))
    write(tmp_path, "b", POLICY.format(name="b"))
    loaded = load_policies(str(tmp_path), "/", unit_lookup=lambda units: {})
    assert isinstance(loaded, PolicyLoad)
    assert [(f, p) for f, p, _ in needed_sections(loaded.policy_set)] == [
        ("exec", "a"), ("net", "a"), ("exec", "b"), ("net", "b")]
    [message] = unenforced(loaded.policy_set, {"exec": "no BPF-LSM", "files": "no source"})
    assert message.startswith("the kernel cannot run the exec programs (no BPF-LSM); "
                              "NOT ENFORCED: ")
    assert f"policy a section exec at {tmp_path / 'a.yaml'}:8:" in message
    assert f"policy b section exec at {tmp_path / 'b.yaml'}:8:" in message
    assert unenforced(loaded.policy_set, {}) == []


def test_families_to_load() -> None:
    load, unavailable = families_to_load({"net": (True, "ok"), "exec": (False, "EPERM"),
                                          "files": (False, "no source")})
    assert load == {"net"}
    assert unavailable == {"exec": "EPERM", "files": "no source"}


# --- guard status, for people ----------------------------------------------------------------


def status_body() -> dict[str, object]:
    return {
        "pid": 42, "uptime_s": 3725.5, "started": "2026-11-25T09:00:00Z",
        "policies_dir": "/etc/guard/policies", "host_cgroup": "/", "revision": "git:0123abcd",
        "generation": 3, "active_slot": 1, "rules": 4,
        "policies": [{"name": "mail", "mode": "enforce", "file": "/etc/guard/policies/m.yaml",
                      "sections": ["exec", "egress"], "scope": ["(host)"], "rules": 4}],
        "families": {"enforced": ["net"], "unavailable": {"exec": "EPERM"},
                     "unenforced": ["the kernel cannot run the exec programs (EPERM); ..."]},
        "events": {"received": 10, "lines": 3, "aggregated": 7, "pending": 0, "delivered": 3,
                   "lost": {"ringbuf": 1, "reader": 0, "malformed": 0, "sink": 2}},
        "kernel": {"events": 10, "lost": 1, "undecided": 0, "denied": 11, "audited": 0,
                   "suppressed": 0},
        "sink": {"target": "unix:/dev/log", "connected": False, "delivered": 3, "queued": 5,
                 "overflow": 2, "overflow_unreported": 2, "reconnects": 0,
                 "last_error": "unix:/dev/log: No such file or directory"},
        "reloads": 2,
        "last_reload": {"time": "2026-11-25T10:00:00Z", "ok": False, "reason": "SIGHUP",
                        "revision": "", "changed": False,
                        "errors": ["/etc/guard/policies/m.yaml:3:1: error: bad"]},
        "last_reload_error": {"time": "2026-11-25T10:00:00Z", "ok": False, "reason": "SIGHUP",
                              "revision": "", "changed": False,
                              "errors": ["/etc/guard/policies/m.yaml:3:1: error: bad"]},
    }


def test_format_status() -> None:
    text = format_status(status_body())
    assert text.startswith("guard: running, pid 42, up 1h02m05s\n")
    assert "revision: git:0123abcd  generation 3  (1 policies, 4 rules)" in text
    assert "enforced: net" in text and "unavailable: exec: EPERM" in text
    assert "ERROR: the kernel cannot run the exec programs" in text
    assert "mail" in text and "exec,egress" in text
    assert "lost: ring buffer 1, reader 0 (malformed 0), syslog queue 2" in text
    assert "syslog: unix:/dev/log NOT connected, delivered 3, queued 5" in text
    assert "last reload: REJECTED" in text
    assert "  /etc/guard/policies/m.yaml:3:1: error: bad" in text


# --- guard run: refusals before anything is touched -------------------------------------------


def run_args(policies: str, syslog: str, state_dir: str) -> argparse.Namespace:
    from guard.cli import build_parser

    return build_parser().parse_args(["run", "--policies", policies, "--syslog", syslog,
                                      "--state-dir", state_dir])


@pytest.mark.parametrize("target", ["syslog.example:514", "tcp://host", "unix:relative"])
def test_run_refuses_a_bad_syslog_target(tmp_path: Path, target: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from guard.daemon import run

    assert run(run_args(str(tmp_path), target, str(tmp_path / "state"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("guard run: ") and "syslog target" in err
    assert not (tmp_path / "state").exists()


def test_run_refuses_a_missing_policy_directory(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from guard.daemon import run

    missing = str(tmp_path / "nope")
    assert run(run_args(missing, "/dev/log", str(tmp_path / "state"))) == 2
    assert "not a directory" in capsys.readouterr().err
