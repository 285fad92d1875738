"""The example policies in policies/: valid, compiled, and saying what their comments say.

The evaluator answers from the compiled plan exactly as the kernel programs
decide; the exec examples are also enforced for real in the guest
(tests/guest/test_exec_enforce.py::test_example_exec_policies_enforce).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.policy.compile import compile_policies
from guard.policy.evaluate import decide_connect, decide_exec, decide_open
from guard.policy.parse import load_policy_paths
from guard.policy.plan import Plan, Verdict

POLICIES = Path(__file__).resolve().parents[2] / "policies"
WEB = "/system.slice/nginx.service"
BATCH = "/batch.slice/nightly.service"
OTHER = "/user.slice"


@pytest.fixture(scope="module")
def plan() -> Plan:
    loaded = load_policy_paths([str(POLICIES)])
    assert loaded.diagnostics == ()
    assert loaded.policy_set is not None
    assert {p.name for p in loaded.policy_set.policies} == {
        "web-no-downloaders", "batch-allowlist", "no-mail", "shadow-read-audit"}
    return compile_policies(loaded.policy_set)


@pytest.mark.parametrize(("cgroup", "path", "verdict"), [
    (WEB, "/usr/bin/curl", Verdict.DENY),
    (WEB, "/usr/bin/wget", Verdict.DENY),
    (WEB, "/usr/bin/bash", Verdict.DENY),
    (WEB, "/tmp/payload", Verdict.DENY),
    (WEB, "/dev/shm/x/y", Verdict.DENY),
    (WEB, "/usr/sbin/nginx", Verdict.ALLOW),
    (OTHER, "/usr/bin/curl", Verdict.ALLOW),
    (BATCH, "/usr/bin/python3", Verdict.ALLOW),
    (BATCH, "/usr/bin/env", Verdict.ALLOW),
    (BATCH, "/opt/batch/bin/nightly", Verdict.ALLOW),
    (BATCH, "/usr/bin/bash", Verdict.DENY),
    (BATCH, "/lib64/ld-linux-x86-64.so.2", Verdict.DENY),
])
def test_exec_examples(plan: Plan, cgroup: str, path: str, verdict: Verdict) -> None:
    assert decide_exec(plan, cgroup, path).verdict is verdict


@pytest.mark.parametrize(("address", "port", "verdict"), [
    ("192.0.2.10", 25, Verdict.DENY),
    ("2001:db8::1", 587, Verdict.DENY),
    ("192.0.2.10", 465, Verdict.DENY),
    ("192.0.2.10", 443, Verdict.ALLOW),
])
def test_no_mail_covers_every_process(plan: Plan, address: str, port: int,
                                      verdict: Verdict) -> None:
    for cgroup in (WEB, BATCH, OTHER, "/"):
        assert decide_connect(plan, cgroup, address, port, "tcp").verdict is verdict


def test_shadow_reads_are_audited_everywhere(plan: Plan) -> None:
    for cgroup in (WEB, BATCH, OTHER):
        assert decide_open(plan, cgroup, "/etc/shadow", "read").verdict is Verdict.AUDIT
        assert decide_open(plan, cgroup, "/etc/passwd", "read").verdict is Verdict.ALLOW
