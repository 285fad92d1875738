"""Exec and file rules follow a cgroup made at the scope's path after apply.

In the BPF-LSM guest: the exec and files families (and, with them, the shared
scope family: bpf/scope.bpf.c on the cgroup_mkdir tracepoint) loaded once; one
policy scoped to CGROUP/later, which does not exist when it is applied. Then
the cgroup is made, and made again (a restart: new id, same path); each time
the first exec and the first open for write of a process moved into it are
refused, with no reload. tests/host/test_scope_lifecycle.py shows the same for
connect on the host.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import exec_fixtures
import pytest
from exec_fixtures import Cgroup, GuestGuard, plan_from_yaml

pytestmark = pytest.mark.guest

cgroup = exec_fixtures.cgroup

TRUE = "/usr/bin/true"
WRITE = "import sys; open(sys.argv[1], 'w').close()"


@pytest.fixture(scope="module")
def exec_files() -> Iterator[GuestGuard]:
    from guard.kernel.apply import Applier
    from guard.kernel.loader import Kernel

    kernel = Kernel(families={"exec", "files"})
    try:
        assert kernel.families == {"exec", "files"}, kernel.dropped
        assert kernel.shared == {"scope"}, kernel.dropped
        log = exec_fixtures.EventLog(kernel.bpf)
        kernel.map("guard_events").open_ring_buffer(log.callback)
        guard = GuestGuard(kernel, Applier(kernel, settle_s=0.0), log)
        yield guard
        guard.clear()
    finally:
        kernel.close()


def policy(scope: str, protected: Path) -> str:
    return "\n".join([
        "apiVersion: guard/v1",
        "kind: Policy",
        "metadata:",
        "  name: lifecycle",
        "spec:",
        "  mode: enforce",
        "  scope:",
        f"    cgroups: [{json.dumps(scope)}]",
        "  exec:",
        "    default: allow",
        "    rules:",
        f"      - {{action: deny, paths: [{json.dumps(TRUE)}]}}",
        "  files:",
        "    rules:",
        f"      - {{action: deny, access: [write], paths: [{json.dumps(str(protected))}]}}",
    ]) + "\n"


def first_exec_refused(cg: Cgroup) -> bool:
    try:
        cg.run([TRUE])
    except PermissionError:
        return True
    return False


def first_write_refused(cg: Cgroup, path: Path) -> bool:
    done = cg.run([sys.executable, "-S", "-c", WRITE, str(path)])
    return done.returncode != 0 and "PermissionError" in done.stderr


def test_exec_and_file_rules_follow_a_cgroup_made_after_apply(
        exec_files: GuestGuard, cgroup: Cgroup, tmp_path: Path) -> None:
    protected = tmp_path / "protected"
    protected.write_text("x")
    later = Cgroup(f"{cgroup.path}/later", cgroup.directory / "later")
    result = exec_files.apply(plan_from_yaml(policy(later.path, protected)))
    assert result.changed
    ids = []
    for _life in range(2):  # made after apply, then a restart: rmdir and mkdir
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(later.directory)
        later.directory.mkdir()
        ids.append(later.id)
        assert first_exec_refused(later)
        assert first_write_refused(later, protected)
    assert ids[0] != ids[1]
    # outside the scope path both work: a sibling made the same way (the cgroup
    # fixture removes both)
    other = cgroup.child("other")
    assert other.run([TRUE]).returncode == 0
    assert not first_write_refused(other, protected)
    # the test process itself (outside every scope) is not affected
    assert subprocess.run([TRUE], check=False).returncode == 0
