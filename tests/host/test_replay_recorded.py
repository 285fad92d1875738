"""A recording made by the real daemon (``guard run --syslog file:PATH``) against real
connects, replayed: under the policies that made it nothing changes, under a set
without the deny rule the denied connect is the one operation that changes.

    /guard-test-XXXX        --host-cgroup: the daemon's programs attached here
    /guard-test-XXXX/in     the client connects from here
"""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import need, need_root
from support.cgroup import TestCgroup
from support.daemon import running_daemon

from guard.cli import main
from guard.errors import ExitCode
from guard.policy.recording import read_recording

pytestmark = pytest.mark.host

CLIENT = textwrap.dedent("""\
    import json, socket, sys
    results = []
    for port in map(int, sys.argv[1:]):
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
            results.append(0)
        except OSError as error:
            results.append(error.errno)
        finally:
            s.close()
    print(json.dumps(results), flush=True)
    """)


def policy(denied: int, audited: int) -> str:
    return textwrap.dedent(f"""\
        apiVersion: guard/v1
        kind: Policy
        metadata: {{name: lock}}
        spec:
          mode: enforce
          network:
            egress:
              default: allow
              rules:
                - {{action: deny, to: [127.0.0.1/32], ports: [{denied}], protocol: tcp}}
                - {{action: audit, to: [127.0.0.1/32], ports: [{audited}], protocol: tcp}}
        """)


def test_a_real_recording_replays_to_the_kernels_verdicts(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    need_root()
    from guard.kernel.loader import probe_family

    feature = probe_family("net")
    need(feature.available, f"cgroup network programs: {feature.reason}")
    listeners = []
    for _ in range(2):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        listeners.append(sock)
    denied, audited = (s.getsockname()[1] for s in listeners)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "lock.yaml").write_text(policy(denied, audited))
    rec = tmp_path / "rec.jsonl"
    try:
        with TestCgroup.create() as top:
            inside = top.child("in")
            with running_daemon(policies, top, f"file:{rec}", tmp_path, "replay"):
                client = inside.spawn([sys.executable, "-c", CLIENT, str(denied), str(audited)],
                                      stdout=subprocess.PIPE)
                out, _ = client.communicate(timeout=60)
                assert json.loads(out) == [errno.EPERM, 0]
                deadline = time.monotonic() + 15
                while len(read_recording([str(rec)]).operations) < 2:
                    assert time.monotonic() < deadline, rec.read_text()
                    time.sleep(0.05)
            host = top.path
            cgroup = inside.path
    finally:
        for sock in listeners:
            sock.close()

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
    (relaxed / "lock.yaml").write_text(policy(denied, audited).replace("action: deny",
                                                                       "action: audit"))
    assert main(["replay", "--policies", str(relaxed), "--host-cgroup", host, "--json",
                 str(rec)]) == ExitCode.CHANGED
    body = json.loads(capsys.readouterr().out)
    assert body["by_effect"] == {"blocked": 0, "allowed": 1, "reported": 0}
    [group] = body["groups"]
    assert group["rule"] == "lock/egress.rules[0]"
    assert group["changes"][0]["target"] == f"127.0.0.1:{denied}/tcp"
