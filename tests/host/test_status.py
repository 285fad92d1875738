"""``guard status --json`` field by field against what the test did, on the host.

One daemon (network family, pinned), one policy with two deny rules, a known
sequence: 3 denied connects to port A, 2 to port B, 1 allowed connect, one
SIGHUP reload of an unchanged directory, one broken edit (rejected), the fix.
Every counter the status shows is then compared with that sequence, and with
what the real rsyslogd received from the daemon.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.cgroup import TestCgroup
from support.daemon import attached_total
from support.lab import syslog_and_cgroup
from support.policies import egress, policy_text, tcp_rule
from support.rsyslog import Rsyslog, guard_messages
from support.service import GuardService, guard_cli, start_guard

READY_TIMEOUT = 120.0

CLIENT = textwrap.dedent("""\
    import socket, sys
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", int(sys.argv[1])))
        print(0)
    except OSError as error:
        print(error.errno)
    """)


def policy(port_a: int, port_b: int, cgroup: str, extra: str = "") -> str:
    """``extra`` is written into the second rule's mapping (a bad key, for a rejected
    edit)."""
    second = tcp_rule("deny", port_b).removesuffix("}") + extra + "}"
    return policy_text("lock", egress(tcp_rule("deny", port_a), second), scope=cgroup,
                  description="two ports are off limits")


@dataclass
class Lab:
    top: TestCgroup
    inside: TestCgroup
    syslog: Rsyslog
    work: Path
    pin_dir: Path
    listeners: list[socket.socket]

    def listen(self) -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        self.listeners.append(sock)
        port: int = sock.getsockname()[1]
        return port

    def connect(self, port: int) -> tuple[int, int]:
        proc = self.inside.spawn([sys.executable, "-c", CLIENT, str(port)],
                                 stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=60)
        for sock in self.listeners:
            sock.setblocking(False)
            try:
                while True:
                    sock.accept()[0].close()
            except BlockingIOError:
                pass
        return proc.pid, int(out)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    pin_dir = Path("/sys/fs/bpf") / f"guard-status-{os.getpid()}"
    with syslog_and_cgroup(tmp_path) as (top, syslog):
        built = Lab(top, top.child("in"), syslog, tmp_path, pin_dir, [])
        try:
            yield built
        finally:
            for sock in built.listeners:
                sock.close()
            guard_cli(["stop", "--unload", "--state-dir", str(tmp_path / "state"),
                       "--pin-dir", str(pin_dir), "--timeout", "30"])
            assert not pin_dir.exists()
            assert attached_total(top.directory) == 0


def start(lab: Lab, policies: Path) -> GuardService:
    state = lab.work / "state"
    guard = start_guard(
        ["run", "--policies", str(policies), "--syslog", f"unix:{lab.syslog.unix_path}",
         "--host-cgroup", lab.top.path, "--state-dir", str(state), "--pin-dir",
         str(lab.pin_dir), "--no-watch"], state, lab.work / "guard.stderr")
    guard.wait_ready(READY_TIMEOUT)
    return guard


def settle(guard: GuardService, lab: Lab, predicate: Any, timeout: float = 15.0
           ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = guard.status()
        if predicate(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_status_json_field_by_field(lab: Lab) -> None:
    port_a, port_b, free = lab.listen(), lab.listen(), lab.listen()
    policies = lab.work / "policies"
    policies.mkdir()
    policy_file = policies / "lock.yaml"
    policy_file.write_text(policy(port_a, port_b, lab.inside.path))
    began = time.monotonic()
    guard = start(lab, policies)
    try:
        pids = []
        for port, times in ((port_a, 3), (port_b, 2)):
            for _ in range(times):
                pid, result = lab.connect(port)
                assert result == errno.EPERM
                pids.append(pid)
        assert lab.connect(free)[1] == 0

        # One reload with nothing changed, one broken edit, the fix.
        revision = guard.status()["revision"]
        seen = []
        for text in (None, policy(port_a, port_b, lab.inside.path, extra=", color: red"),
                     policy(port_a, port_b, lab.inside.path)):
            if text is not None:
                policy_file.write_text(text)
            mark = len(guard.notify.messages)
            os.kill(guard.pid, signal.SIGHUP)
            guard.notify.wait_for("READY=1", 60, after=mark)
            seen.append(guard.status())
        assert [s["last_reload"]["ok"] for s in seen] == [True, False, True]
        assert [s["reloads"] for s in seen] == [1, 2, 3]
        errors = seen[1]["last_reload_error"]["errors"]
        assert any(f"{policy_file}:15:" in e and "color" in e for e in errors), errors
        assert seen[1]["revision"] == revision  # the broken set was not applied

        status = settle(guard, lab, lambda s: s["events"]["received"] >= 5
                        and s["sink"]["queued"] == 0 and s["events"]["pending"] == 0)
        elapsed = time.monotonic() - began
        lines = lab.syslog.wait_for(lambda ls: sum(
            1 for m in guard_messages(ls) if m.procid == str(guard.pid)) >= status["sink"][
                "delivered"], timeout=15)
        mine = [m for m in guard_messages(lines) if m.procid == str(guard.pid)]

        # who and since when
        assert status["pid"] == guard.pid
        assert 0 < status["uptime_s"] <= elapsed
        assert status["started"].endswith("Z")
        assert status["policies_dir"] == str(policies)
        assert status["host_cgroup"] == lab.top.path
        # what it enforces
        assert status["revision"] == revision and revision.startswith("sha256:")
        assert status["generation"] == 1  # the reloads changed nothing in the kernel
        assert status["active_slot"] in (0, 1)
        [entry] = status["policies"]
        assert entry == {"name": "lock", "mode": "enforce", "file": str(policy_file),
                         "sections": ["egress"], "scope": [lab.inside.path], "rules": 2,
                         "enforced": True, "host_wide": False, "missing_scope": [],
                         "enforcement": [{"section": "egress", "family": "net",
                                          "state": "enforced", "enforced": True,
                                          "reason": ""}]}
        assert status["rules"] == 2  # the two rules as written (the default is not one)
        assert "net" in status["families"]["enforced"]
        # events: 5 denials, each its own line (different pids: nothing to fold)
        events = status["events"]
        assert (events["received"], events["lines"], events["aggregated"],
                events["pending"]) == (5, 5, 0, 0)
        assert events["lost"] == {"ringbuf": 0, "reader": 0, "malformed": 0, "sink": 0}
        denies = [m for m in mine if m.fields.get("kind") == "connect"]
        assert sorted(int(m.fields["pid"]) for m in denies) == sorted(pids)
        # delivered: every line rsyslogd got from this daemon, its own messages too
        assert events["delivered"] == status["sink"]["delivered"] == len(mine)
        assert status["sink"]["target"] == f"unix:{lab.syslog.unix_path}"
        assert status["sink"]["connected"] and status["sink"]["overflow"] == 0
        # per-rule hits
        assert status["rule_hits"] == {"lock/egress.rules[0]": 3, "lock/egress.rules[1]": 2}
        # the kernel's own counters
        kernel = status["kernel"]
        assert (kernel["events"], kernel["denied"], kernel["lost"], kernel["audited"],
                kernel["tamper"]) == (5, 5, 0, 0, 0)
        # reloads: 3 asked, the last one good, the broken one remembered
        assert status["reloads"] == 3
        assert status["last_reload"]["ok"] and not status["last_reload"]["changed"]
        assert status["last_reload_error"] is None  # the set in force is good again
        # pins (fail-closed) and tamper (no BPF-LSM on this host)
        pins = status["pins"]
        assert pins["mode"] == "fail-closed" and pins["error"] == "" and not pins["taken_over"]
        assert pins["dir"] == str(lab.pin_dir)
        assert sorted(pins["pins"]) == sorted(os.listdir(lab.pin_dir / pins["instance"]))
        assert status["tamper"] == {"enabled": False, "error": "", "denied": 0}
        assert status["watch"]["enabled"] is False

        shown = guard_cli(["status", "--state-dir", str(lab.work / "state")])
        assert shown.returncode == 0
        assert "lock/egress.rules[0] 3" in shown.stdout and "fail-closed" in shown.stdout, \
            shown.stdout
    finally:
        guard.stop()
