"""The operator's first hour, with a real daemon on the host and no syslog daemon at all.

One daemon, its programs on a cgroup this module makes, its event target a unix
socket nobody listens on. Shown:

- the start is quiet and says each stage once, with its time; no clang or
  libbpf line; the unreachable target is said on stderr; the BPF-LSM diagnosis
  once (this host refuses LSM programs);
- ``guard events`` (readable and ``--json``, filtered) receives a real denial
  of a real connect() from a process in the scope, though no syslog daemon runs;
- ``guard status --json`` says per policy and section what is enforced, what is
  not (and why, once) and what waits for its scope cgroup, rules as written, the
  host cgroup by its path; ``guard status`` says it as a table.
"""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import need, need_root
from support.cgroup import TestCgroup
from support.daemon import ConnectProbe, GuardDaemon, running_daemon
from support.policies import egress, exec_section, policy_text, tcp_rule
from support.sdnotify import REPO

pytestmark = pytest.mark.host


@dataclass
class Lab:
    top: TestCgroup
    inside: TestCgroup
    work: Path
    guard: GuardDaemon
    probe: ConnectProbe


def policies(directory: Path, inside: str, port: int) -> None:
    directory.mkdir()
    (directory / "lock.yaml").write_text(policy_text(
        "lock", egress(tcp_rule("deny", port)) + exec_section(
            "{action: deny, paths: [/usr/bin/wget]}", default=None), scope=inside))
    (directory / "later.yaml").write_text(policy_text(
        "later", egress(tcp_rule("deny", port)), scope=f"{inside}-not-yet", mode="audit"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    need_root()
    from guard.kernel.loader import probe_family

    feature = probe_family("net")
    need(feature.available, f"cgroup network programs: {feature.reason}")
    work = tmp_path_factory.mktemp("operator")
    with TestCgroup.create() as top:
        inside = top.child("in")
        probe = ConnectProbe.start(inside, 2)
        try:
            policies(work / "policies", inside.path, probe.ports[0])
            nobody = f"unix:{work / 'nobody-listens.sock'}"
            with running_daemon(work / "policies", top, nobody, work, "op") as guard:
                yield Lab(top, inside, work, guard, probe)
        finally:
            probe.close()


def guard_cli(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guard", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_the_start_is_quiet_and_says_each_thing_once(lab: Lab) -> None:
    err = lab.guard.stderr_text()
    for noise in ("nocf_check", "warnings generated", "In file included from",
                  "bpf: Failed to load program"):
        assert noise not in err, err
    lines = err.splitlines()
    assert not [line for line in lines if not line.strip()], err  # no blank lines
    for stage in ("compile", "load", "apply"):
        done = [line for line in lines if line.startswith(f"guard: {stage}: ")
                and line.endswith(")") and not line.endswith("...")]
        assert len(done) == 1, (stage, err)
        assert done[0].rsplit("(", 1)[1].rstrip(")").split()[1] in ("ms", "s")
    assert sum("is unreachable" in line for line in lines) == 1, err
    assert "guard events" in err
    assert not any("error: " in line and line.count("error: ") > 1 for line in lines)
    assert not any(line.count("warning: ") > 1 for line in lines)
    from guard.kernel.loader import probe_family

    if not probe_family("exec").available:
        assert sum(line.startswith("guard: warning: BPF-LSM is off: ") for line in lines) == 1
        assert sum("fix: " in line for line in lines) >= 1
        reason = probe_family("exec").reason
        assert err.count(reason) == 1, err  # the families share it: said once


def test_guard_events_receives_a_real_denial_without_any_syslog_daemon(lab: Lab) -> None:
    denied, allowed = lab.probe.ports
    state = str(lab.guard.state_dir)
    readable = subprocess.Popen(
        [sys.executable, "-m", "guard", "events", "--state-dir", state, "--count", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    as_json = subprocess.Popen(
        [sys.executable, "-m", "guard", "events", "--json", "--kind", "connect", "--policy",
         "lock", "--action", "deny", "--state-dir", state, "--count", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lab.guard.wait_status(lambda s: s["tail"]["clients"] == 2, timeout=30)
        assert lab.probe.connect(allowed) == 0
        assert lab.probe.connect(denied) == errno.EPERM
        out, err = as_json.communicate(timeout=30)
        assert as_json.returncode == 0, err
        record = json.loads(out)
        assert (record["action"], record["kind"], record["policy"]) == ("deny", "connect", "lock")
        assert record["port"] == denied and record["addr"] == "127.0.0.1"
        assert record["pid"] == lab.probe.proc.pid and record["cgroup"] == lab.inside.path
        assert record["facility"] == "authpriv" and record["rule"] == "lock/egress.rules[0]"
        text, err = readable.communicate(timeout=30)
        assert readable.returncode == 0, err
        assert f"deny connect to 127.0.0.1:{denied}/tcp by pid {lab.probe.proc.pid}" in text
    finally:
        for proc in (readable, as_json):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    status = lab.guard.status()
    assert status["sink"]["connected"] is False  # nobody listens: the tail still worked
    assert status["tail"]["served"] >= 2


def test_status_says_per_section_what_is_enforced(lab: Lab) -> None:
    done = guard_cli(["status", "--json", "--state-dir", str(lab.guard.state_dir)])
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["running"] is True and body["host_cgroup"] == lab.top.path
    rows = {p["name"]: p for p in body["policies"]}
    lock, later = rows["lock"], rows["later"]
    assert lock["rules"] == 2 and later["rules"] == 1 and body["rules"] == 3
    assert lock["scope"] == [lab.inside.path]
    states = {s["section"]: s for s in lock["enforcement"]}
    assert states["egress"]["enforced"] is True and states["egress"]["state"] == "enforced"
    from guard.kernel.loader import probe_family

    exec_feature = probe_family("exec")
    assert states["exec"]["enforced"] is exec_feature.available
    if not exec_feature.available:
        assert states["exec"]["state"] == "not enforced"
        assert states["exec"]["reason"] == body["families"]["unavailable"]["exec"]
        assert body["lsm"]["reasons"]
    [waiting] = later["enforcement"]
    assert waiting["state"] == "waiting" and waiting["enforced"] is False
    assert later["missing_scope"] == [f"{lab.inside.path}-not-yet"]

    text = guard_cli(["status", "--state-dir", str(lab.guard.state_dir)]).stdout
    assert "egress: enforced" in text and "egress: waiting for scope" in text
    if not exec_feature.available:
        assert "exec: NOT enforced [R1]" in text
        assert text.count(exec_feature.reason) == 1, text
        assert "(host)" not in text


def test_status_json_without_a_daemon(tmp_path: Path) -> None:
    done = guard_cli(["status", "--json", "--state-dir", str(tmp_path),
                      "--pin-dir", str(tmp_path / "pins")])
    assert done.returncode == 3
    assert json.loads(done.stdout)["running"] is False


def test_a_slow_events_client_does_not_hold_the_daemon_up(lab: Lab) -> None:
    """A client that connects and never reads: denials still go out at full speed
    and the daemon still answers status."""
    denied = lab.probe.ports[0]
    path = str(lab.guard.state_dir / "status.sock")
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stuck.connect(path)
    stuck.sendall(b'{"command": "events"}\n')
    try:
        before = lab.guard.status()["events"]["received"]
        for _ in range(300):
            assert lab.probe.connect(denied) == errno.EPERM
        body = lab.guard.wait_status(lambda s: s["events"]["received"] >= before + 300,
                                     timeout=30)
        assert body["tail"]["clients"] >= 1
    finally:
        stuck.close()
