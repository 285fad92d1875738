"""Whose paths a running ``guard run`` resolves, said at start and by ``guard status``.

The daemon is started as the unit would start it with ``PrivateTmp=yes`` (a
mount namespace of its own, a tmpfs on /tmp: support.mountns) and without
``CAP_SYS_PTRACE`` in its bounding set, so that /proc/1/root, the way into the
host's namespace, is closed to it. It must not resolve the policy's /tmp/**
in its private /tmp silently: stderr, syslog and ``guard status`` say so. The
same daemon in the host's namespace says where it resolves, with no error.
That paths are then really the host's is proven in the guest
(tests/guest/test_exec_enforce.py, tests/guest/test_files_enforce.py).
"""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import need, need_root
from support.cgroup import TestCgroup
from support.daemon import GuardDaemon, NotifyListener
from support.mountns import private_tmp
from support.sdnotify import spawn

from guard.service.control import format_status

PR_CAPBSET_DROP, CAP_SYS_PTRACE = 24, 19


def no_ptrace_private_tmp() -> None:
    """In the daemon's child before exec: the unit's PrivateTmp, no CAP_SYS_PTRACE."""
    private_tmp(keep_checkout=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAPBSET_DROP, CAP_SYS_PTRACE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_SYS_PTRACE)")


def tmp_policy(cgroup: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: guard/v1
        kind: Policy
        metadata:
          name: no-tmp
        spec:
          mode: enforce
          scope:
            cgroups: [{cgroup}]
          exec:
            default: allow
            rules:
              - {{action: deny, paths: ["/tmp/**"]}}
        """)


@pytest.fixture
def top() -> Iterator[TestCgroup]:
    need_root()
    from guard.kernel.loader import probe_family

    feature = probe_family("net")
    need(feature.available, f"cgroup network programs: {feature.reason}")
    with TestCgroup.create("guard-paths") as cg:
        yield cg


@pytest.fixture
def work() -> Iterator[Path]:
    """Outside /tmp, which the private daemon does not share."""
    made = Path(tempfile.mkdtemp(prefix="guard-paths-", dir="/var/tmp"))
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def start(top: TestCgroup, work: Path, name: str, private: bool) -> tuple[GuardDaemon, Path]:
    policies = work / f"policies-{name}"
    policies.mkdir()
    (policies / "no-tmp.yaml").write_text(tmp_policy(top.child(name).path))
    notify = NotifyListener()
    state_dir, stderr, syslog = work / f"state-{name}", work / f"{name}.stderr", work / name
    proc = spawn([sys.executable, "-m", "guard", "run", "--policies", str(policies),
                  "--syslog", f"file:{syslog}", "--host-cgroup", top.path,
                  "--state-dir", str(state_dir), "--no-watch"],
                 notify, stderr, env={"PYTHONFAULTHANDLER": "1"},
                 preexec=no_ptrace_private_tmp if private else None)
    guard = GuardDaemon(proc, notify, state_dir, policies, stderr, 0.0)
    return guard, syslog


def test_a_daemon_that_cannot_reach_the_hosts_paths_says_so(
        top: TestCgroup, work: Path) -> None:
    guard, syslog = start(top, work, "private", private=True)
    try:
        guard.wait_ready()
        status = guard.status()
        said = guard.stderr_text()
    finally:
        assert guard.stop() == 0, guard.stderr_text()
    paths = status["paths"]
    assert paths["where"] == "guard's own mount namespace"
    assert paths["error"].startswith("policy paths are resolved in guard's own mount "
                                     "namespace, which is not the host's: cannot read "
                                     "/proc/1/root (Permission denied"), paths
    assert f"guard: error: {paths['error']}\n" in said
    assert f"ERROR: {paths['error']}\n" in format_status(status)
    logged = [json.loads(line) for line in syslog.read_text().splitlines()]
    assert any(paths["error"] in json.dumps(m) for m in logged)


def test_a_daemon_in_the_hosts_namespace_resolves_there_and_says_nothing_else(
        top: TestCgroup, work: Path) -> None:
    guard, _syslog = start(top, work, "shared", private=False)
    try:
        guard.wait_ready()
        status = guard.status()
        said = guard.stderr_text()
    finally:
        assert guard.stop() == 0, guard.stderr_text()
    assert status["paths"] == {"where": "host's mount namespace (guard shares PID 1's)",
                               "error": ""}
    assert "paths: resolved in the host's mount namespace (guard shares PID 1's)\n" in \
        format_status(status)
    assert "mount namespace" not in said
