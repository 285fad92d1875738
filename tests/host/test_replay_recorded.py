"""A recording made by the real daemon (``guard run --syslog file:PATH``) against real
connects, replayed: under the policies that made it nothing changes, under a set
without the deny rule the denied connect is the one operation that changes.

    /guard-test-XXXX        --host-cgroup: the daemon's programs attached here
    /guard-test-XXXX/in     the client connects from here
"""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import pytest
from support import need, need_root
from support.cgroup import TestCgroup
from support.daemon import ConnectProbe, running_daemon
from support.policies import egress, policy_text, tcp_rule

from guard.cli import main
from guard.errors import ExitCode
from guard.policy.recording import read_recording

pytestmark = pytest.mark.host


def policy(denied: int, audited: int, action: str = "deny") -> str:
    return policy_text("lock", egress(tcp_rule(action, denied), tcp_rule("audit", audited)))


def test_a_real_recording_replays_to_the_kernels_verdicts(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    need_root()
    from guard.kernel.loader import probe_family

    feature = probe_family("net")
    need(feature.available, f"cgroup network programs: {feature.reason}")
    rec = tmp_path / "rec.jsonl"
    with TestCgroup.create() as top:
        inside = top.child("in")
        probe = ConnectProbe.start(inside, 2)
        try:
            denied, audited = probe.ports
            policies = tmp_path / "policies"
            policies.mkdir()
            (policies / "lock.yaml").write_text(policy(denied, audited))
            with running_daemon(policies, top, f"file:{rec}", tmp_path, "replay"):
                assert probe.connect(denied) == errno.EPERM and probe.connect(audited) == 0
                deadline = time.monotonic() + 15
                while not rec.exists() or len(read_recording([str(rec)]).operations) < 2:
                    assert time.monotonic() < deadline, rec.exists() and rec.read_text()
                    time.sleep(0.05)
        finally:
            probe.close()
        host, cgroup = top.path, inside.path

    recording = read_recording([str(rec)])
    assert recording.problems == () and recording.skipped >= 1  # the daemon's own lines
    ops = {op.port: op for op in recording.operations}
    assert (ops[denied].action, ops[denied].cgroup, ops[denied].op) == ("deny", cgroup,
                                                                        "connect")
    assert ops[audited].action == "audit"
    # the policies that made the recording: every recorded verdict again
    assert main(["replay", "--policies", str(policies), "--host-cgroup", host,
                 str(rec)]) == ExitCode.OK
    assert "0 of 2 change verdict" in capsys.readouterr().out
    # without the deny rule: the denied connect is now allowed, and nothing else changes
    relaxed = tmp_path / "relaxed"
    relaxed.mkdir()
    (relaxed / "lock.yaml").write_text(policy(denied, audited, action="audit"))
    assert main(["replay", "--policies", str(relaxed), "--host-cgroup", host, "--json",
                 str(rec)]) == ExitCode.CHANGED
    body = json.loads(capsys.readouterr().out)
    assert body["by_effect"] == {"blocked": 0, "allowed": 1, "reported": 0}
    [group] = body["groups"]
    assert group["rule"] == "lock/egress.rules[0]"
    assert group["changes"][0]["target"] == f"127.0.0.1:{denied}/tcp"
