"""Hot reload of an exec policy under a running ``guard run``, in the BPF-LSM guest.

One daemon start (bcc compiles every program family: tens of seconds under
TCG). Its programs judge a cgroup this test made (``--host-cgroup``); the
policy directory is in a tmp dir. A denied exec fails with EPERM; after the
policy file is saved with the other binary denied, the first binary runs and
the second is refused, within a bounded time measured from the save.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cgroup import TestCgroup
from support.daemon import running_daemon

pytestmark = pytest.mark.guest

READY_TIMEOUT = 900.0  # bcc compiles net, exec, files, tamper under TCG
BOUND_S = 10.0  # from save to enforced; emulated CPUs are ~10x slower than the host


def exec_policy(denied: Path) -> str:
    return textwrap.dedent(f"""\
        apiVersion: guard/v1
        kind: Policy
        metadata:
          name: tools
        spec:
          mode: enforce
          exec:
            default: allow
            rules:
              - {{action: deny, paths: ["{denied}"]}}
        """)


def runs(cgroup: TestCgroup, binary: Path) -> bool:
    """True when ``binary`` ran in the cgroup; False when its exec was refused (EPERM)."""
    try:
        proc = cgroup.spawn([str(binary)])
    except PermissionError:
        return False
    assert proc.wait(timeout=60) == 0
    return True


def wait_for(cgroup: TestCgroup, expected: dict[Path, bool], since: float) -> float:
    deadline = since + BOUND_S
    while True:
        seen = {binary: runs(cgroup, binary) for binary in expected}
        if seen == expected:
            return time.monotonic() - since
        assert time.monotonic() < deadline, f"after {BOUND_S} s: {seen}, expected {expected}"
        time.sleep(0.02)


@pytest.fixture
def syslog(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for the syslog daemon: guard's lines, as sent."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "log.sock"))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    lines = []
    while True:
        try:
            lines.append(sock.recv(65536).decode(errors="replace"))
        except BlockingIOError:
            return lines


def test_an_edited_exec_policy_is_enforced_within_bounded_time(
        tmp_path: Path, syslog: socket.socket) -> None:
    first, second = tmp_path / "first-tool", tmp_path / "second-tool"
    for copy in (first, second):
        shutil.copy2("/usr/bin/true", copy)
        os.chmod(copy, 0o755)
    policies = tmp_path / "policies"
    policies.mkdir()
    policy = policies / "tools.yaml"
    policy.write_text(exec_policy(first))
    with TestCgroup.create() as top:
        inside = top.child("in")
        assert runs(inside, first) and runs(inside, second)  # nothing loaded yet
        with running_daemon(policies, top, f"unix:{tmp_path / 'log.sock'}", tmp_path,
                            "guest-exec", ready_timeout=READY_TIMEOUT) as guard:
            print(f"guard run -> READY=1 in {guard.ready_after:.1f} s")
            assert "exec" in guard.status()["families"]["enforced"]
            assert not runs(inside, first)  # denied: EPERM
            assert runs(inside, second)
            assert subprocess.run([str(first)], timeout=60).returncode == 0  # outside: runs
            generation = guard.status()["generation"]

            tmp = policies / ".tools.yaml.tmp"
            tmp.write_text(exec_policy(second))
            os.replace(tmp, policy)  # an editor's save
            latency = wait_for(inside, {first: True, second: False}, since=time.monotonic())
            print(f"exec policy save -> enforced in {latency * 1000:.0f} ms")

            status = guard.wait_status(lambda s: s["generation"] > generation)
            last = status["last_reload"]
            assert last["ok"] and last["changed"] and last["reason"] == "watch", last
            assert last["added"] == last["removed"] == ["tools/exec.rules[0]"]
            lines = received(syslog)
            assert any(" reload " in line and "applied revision" in line for line in lines), \
                lines[-10:]
        # stopped: every program detached, both run again
        assert runs(inside, first) and runs(inside, second)
