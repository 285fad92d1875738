"""A process inside a scope, as root, against the daemon (docs/threat-model.md).

The control socket obeys no one inside a scope, and no name such a process
chooses (here a cgroup it creates in a delegated subtree) can forge or disguise
a log line.

A real ``guard run`` (network family, attached to a test cgroup) enforces one
policy scoped to ``top/confined``. A root process inside that scope connects to
the daemon's control socket and asks it to stop and unload: refused, the daemon
keeps enforcing, and a ``kind=tamper`` line naming the caller reaches a real
rsyslogd. Reading the status is still allowed there. A root process outside
every policy scope (the test itself, and a process in ``top``, which only the
whole-host scope covers) stops it with ``guard stop``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.cgroup import TestCgroup
from support.daemon import ConnectProbe, GuardDaemon, running_daemon
from support.lab import syslog_and_cgroup
from support.policies import egress, policy_text, tcp_rule
from support.rsyslog import Rsyslog, guard_messages

pytestmark = pytest.mark.host

ASK = textwrap.dedent("""\
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sys.argv[1])
    s.sendall(sys.argv[2].encode() + b"\\n")
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    print(data.decode().strip(), flush=True)
    """)


@dataclass
class Lab:
    top: TestCgroup
    confined: TestCgroup
    syslog: Rsyslog
    work: Path


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with syslog_and_cgroup(tmp_path) as (top, syslog):
        yield Lab(top, top.child("confined"), syslog, tmp_path)


def ask_from(cgroup: TestCgroup, guard: GuardDaemon, request: dict[str, object]
             ) -> tuple[int, dict[str, object]]:
    """One request to the control socket from a new root process in ``cgroup``:
    (its pid, the reply)."""
    proc = cgroup.spawn([sys.executable, "-c", ASK, str(guard.state_dir / "status.sock"),
                         json.dumps(request)], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    reply: dict[str, object] = json.loads(out)
    return proc.pid, reply


def start(lab: Lab, probe_port: int) -> AbstractContextManager[GuardDaemon]:
    """guard run, its one policy denying ``probe_port`` to the confined cgroup."""
    policies = lab.work / "policies"
    policies.mkdir()
    (policies / "confined.yaml").write_text(policy_text(
        "confined", egress(tcp_rule("deny", probe_port)), scope=lab.confined.path))
    return running_daemon(policies, lab.top, f"unix:{lab.syslog.unix_path}", lab.work,
                          "control")


def test_a_scoped_root_process_cannot_stop_or_unload_guard(lab: Lab) -> None:
    probe = ConnectProbe.start(lab.confined, 1)
    port = probe.ports[0]
    try:
        with start(lab, port) as guard:
            assert probe.connect(port) != 0  # enforcing
            pid, reply = ask_from(lab.confined, guard, {"command": "stop", "unload": True})
            assert reply["ok"] is False and "refused" in str(reply["error"]), reply
            assert "inside the policy scope" in str(reply["error"]), reply
            # still running, still enforcing, still answering
            assert guard.alive
            assert probe.connect(port) != 0
            _, status = ask_from(lab.confined, guard, {"command": "status"})
            assert status["ok"] is True
            # the attempt is a tamper event naming the caller, at a real syslog daemon
            lines = lab.syslog.wait_for(lambda ls: any(
                m.fields.get("kind") == "tamper" for m in guard_messages(ls)), timeout=15)
            tamper = [m for m in guard_messages(lines) if m.fields.get("kind") == "tamper"]
            assert len(tamper) == 1, tamper
            fields = tamper[0].fields
            assert fields["action"] == "deny" and fields["hook"] == "control"
            assert fields["pid"] == str(pid) and fields["uid"] == "0"
            assert fields["cgroup"] == lab.confined.path
            assert fields["path"] == "guard stop via the control socket"
            # a command guard does not know is refused too, before anything is read
            _, reply = ask_from(lab.confined, guard, {"command": "reload"})
            assert reply["ok"] is False
            assert guard.alive and probe.connect(port) != 0
            # root outside every policy scope stops it (the whole-host scope is not one)
            _, reply = ask_from(lab.top, guard, {"command": "stop"})
            assert reply["ok"] is True, reply
            assert guard.proc.wait(timeout=30) == 0
    finally:
        probe.close()


def test_guard_stop_from_an_unscoped_root_still_works(lab: Lab) -> None:
    with start(lab, 9) as guard:
        done = subprocess.run(
            [sys.executable, "-m", "guard", "stop", "--state-dir", str(guard.state_dir),
             "--pin-dir", str(lab.work / "no-pins")],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "stopped" in done.stdout
        assert guard.proc.wait(timeout=30) == 0


def test_a_cgroup_name_cannot_forge_or_disguise_a_log_line(lab: Lab) -> None:
    """A child cgroup named with ESC sequences, a carriage return, C1 CSI and a
    bidi override: the deny line at rsyslogd names it, escaped, and holds none of
    them. (cgroupfs refuses '/', NUL and a newline in a name; everything else is
    the name's creator's choice.)"""
    evil = "x\x1b[31mred\rforged: ok\u202eexe.txt\u009b2J"
    try:
        child = lab.confined.child(evil)
    except OSError as error:
        raise AssertionError(f"cannot make the cgroup: {error}") from error
    probe = ConnectProbe.start(child, 1)
    port = probe.ports[0]
    try:
        with start(lab, port):
            assert probe.connect(port) != 0
            lines = lab.syslog.wait_for(lambda ls: any(
                m.fields.get("kind") == "connect" for m in guard_messages(ls)), timeout=15)
    finally:
        probe.close()
    raw = lab.syslog.messages.read_bytes().decode("utf-8", "replace")
    for char in ("\x1b", "\u202e", "\u009b", "\r"):
        assert char not in raw, repr(char)
    deny = [m for m in guard_messages(lines) if m.fields.get("kind") == "connect"]
    assert deny, lines
    cgroup = deny[0].fields["cgroup"]
    assert cgroup == (f"{lab.confined.path}/x\\x1b[31mred\\x0dforged: ok\\u202eexe.txt"
                      "\\x9b2J"), cgroup
