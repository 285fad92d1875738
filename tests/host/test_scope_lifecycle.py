"""Scopes follow cgroups through their life, in the host kernel, with no reload.

A scope names a cgroup path. A cgroup made at that path after the policy was
applied (a unit started after guard, a unit restarted: removed and made again
with a new id, a scope directory made later) is in the scope from its first
connect on: bpf/scope.bpf.c, on the cgroup_mkdir tracepoint, puts it there
before any process can enter it.

    /guard-test-XXXX            the programs are attached here (host cgroup)
    /guard-test-XXXX/later...   scope paths that do not exist when applied

Each test moves a fresh process into the new cgroup and has it connect once to
127.0.0.1 on a port nothing listens on: EPERM is guard's deny, ECONNREFUSED
means the connect went through unjudged. Loopback only.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import need_root
from support.cgroup import TestCgroup, attached_programs
from support.daemon import NET_ATTACH_TYPES
from support.lab import need_net_programs
from support.policies import compile_dir, egress, policy_text, tcp_rule

from guard import layout
from guard.kernel.apply import Applier
from guard.kernel.cgroups import cgroup2_mount
from guard.kernel.loader import Kernel
from guard.policy.plan import Plan

pytestmark = pytest.mark.host

DENIED_PORT = 47  # nothing listens there: ECONNREFUSED unless guard denies
CLIENT = f"""
import errno, socket, sys
s = socket.socket()
try:
    s.connect(("127.0.0.1", {DENIED_PORT}))
    print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"""


@dataclass
class Env:
    top: TestCgroup
    kernel: Kernel
    applier: Applier
    policy_dir: Path

    def plan(self, scopes: list[str], *, units: bool = False, extra: int = 0,
             host: str | None = None) -> Plan:
        """One policy denying TCP to 127.0.0.1:DENIED_PORT for ``scopes`` (cgroup
        paths, or unit names with ``units``); ``extra`` more deny rules make plans
        that differ."""
        rules = [tcp_rule("deny", DENIED_PORT)]
        rules += [tcp_rule("deny", 20000 + i) for i in range(extra)]
        text = policy_text("lifecycle", egress(*rules))
        key = "units" if units else "cgroups"
        text = text.replace("spec:\n  mode: enforce\n",
                            f"spec:\n  mode: enforce\n  scope:\n    {key}: [{', '.join(scopes)}]\n")
        return compile_dir(self.policy_dir, "lifecycle", text, host or self.top.path)

    def scoped(self, cgroup_id: int) -> bool:
        """guard_scopes has the cgroup in the active slot."""
        config = self.kernel.map("guard_config")[ctypes.c_uint32(0)]
        key = layout.ScopeKey(slot=config.active_slot & 1, cgroup_id=cgroup_id)
        table = self.kernel.map("guard_scopes")
        return any(bytes(k) == bytes(key) for k in table)

    def stat(self, index: int) -> int:
        return int(sum(self.kernel.map("guard_stats")[ctypes.c_int(index)]))


def first_connect(directory: Path) -> str:
    """A fresh process, moved into ``directory``'s cgroup before it runs, connects once."""
    procs = str(directory / "cgroup.procs")

    def enter() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    done = subprocess.run([sys.executable, "-S", "-c", CLIENT], preexec_fn=enter,
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


def mkdir(directory: Path) -> Path:
    directory.mkdir()
    return directory


def rmdir(directory: Path) -> None:
    deadline = time.monotonic() + 5
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # the last process may still be leaving
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def remove_tree(directory: Path) -> None:
    if not directory.exists():
        return
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir()),
                      key=lambda p: len(p.parts), reverse=True):
        rmdir(sub)
    rmdir(directory)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    need_root()
    need_net_programs()
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    with TestCgroup.create() as top:
        try:
            with Kernel(families={"net"}, host_cgroup=top.path) as kernel:
                assert "scope" in kernel.shared, kernel.dropped
                yield Env(top, kernel, Applier(kernel, settle_s=0.002), policy_dir)
        finally:
            for child in top.directory.iterdir():
                if child.is_dir():
                    remove_tree(child)
        attached = [attached_programs(top.directory, t) for t in NET_ATTACH_TYPES]
        assert attached == [0] * len(NET_ATTACH_TYPES)


def test_a_scope_made_after_apply_denies_its_first_connect(env: Env) -> None:
    later = f"{env.top.path}/later"
    result = env.applier.apply(env.plan([later]))
    assert result.changed and not any("does not exist" in w for w in result.warnings)
    directory = mkdir(env.top.directory / "later")
    assert env.scoped(directory.stat().st_ino)
    assert first_connect(directory) == "EPERM"
    # below it too (the ancestor walk), and a sibling is not in the scope
    assert first_connect(mkdir(directory / "child")) == "EPERM"
    assert first_connect(mkdir(env.top.directory / "other")) == "ECONNREFUSED"


def test_a_restarted_scope_cgroup_denies_its_first_connect(env: Env) -> None:
    directory = mkdir(env.top.directory / "svc")
    first_id = directory.stat().st_ino
    env.applier.apply(env.plan([f"{env.top.path}/svc"]))
    assert first_connect(directory) == "EPERM"
    for _restart in range(3):  # as systemd restarts a unit: rmdir, mkdir, new id
        rmdir(directory)
        mkdir(directory)
        assert directory.stat().st_ino != first_id
        assert first_connect(directory) == "EPERM"
    # the removed cgroups' entries went with them (cgroup_rmdir): restarts do not fill
    # guard_scopes
    assert not env.scoped(first_id)


def test_a_unit_that_is_not_running_at_apply_is_scoped_when_it_starts(tmp_path: Path) -> None:
    need_root()
    need_net_programs()
    # a test slice, named as systemd names slices, holding the programs; the unit is
    # a slice below it, whose cgroup the convention gives (no systemd unit is started)
    name = f"glc{secrets.token_hex(3)}"
    top_dir = cgroup2_mount() / f"{name}.slice"
    top_dir.mkdir()
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    top = TestCgroup(path=f"/{name}.slice", directory=top_dir)
    try:
        with top, Kernel(families={"net"}, host_cgroup=top.path) as kernel:
            env = Env(top, kernel, Applier(kernel, settle_s=0.002), policy_dir)
            plan = env.plan([f"{name}-app.slice"], units=True)
            assert [s.cgroup for s in plan.scopes] == [f"/{name}.slice/{name}-app.slice"]
            env.applier.apply(plan)
            unit_dir = top_dir / f"{name}-app.slice"
            try:
                mkdir(unit_dir)
                assert first_connect(unit_dir) == "EPERM"
                rmdir(unit_dir)  # and when it restarts
                mkdir(unit_dir)
                assert first_connect(unit_dir) == "EPERM"
            finally:
                remove_tree(unit_dir)
    finally:
        rmdir(top_dir)


def test_cgroups_made_during_reloads_are_never_left_unscoped(env: Env) -> None:
    count = 40
    paths = [f"{env.top.path}/r{i}" for i in range(count)]
    plans = [env.plan(paths, extra=1), env.plan(paths, extra=2)]
    env.applier.apply(plans[0])
    made: list[Path] = []
    stop = threading.Event()
    reloads = [0]
    errors: list[BaseException] = []

    def reload() -> None:
        try:
            while not stop.is_set() and reloads[0] < 400:
                result = env.applier.apply(plans[reloads[0] % 2 ^ 1])
                assert result.changed
                reloads[0] += 1
        except BaseException as error:  # reported below
            errors.append(error)

    answers: dict[str, str] = {}
    thread = threading.Thread(target=reload)
    thread.start()
    deadline = time.monotonic() + 30
    try:
        # each cgroup's first connect right after its mkdir, while the reloads go on
        for i in range(count):
            directory = mkdir(env.top.directory / f"r{i}")
            made.append(directory)
            answers[directory.name] = first_connect(directory)
            if time.monotonic() > deadline:
                break
        during = reloads[0]
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert during >= 2, "the reloads did not overlap the mkdirs"
    assert {name: a for name, a in answers.items() if a != "EPERM"} == {}
    # and none of them is left out of the set in force once the reloads are over
    unscoped = [d.name for d in made if not env.scoped(d.stat().st_ino)]
    assert unscoped == []
    assert env.stat(layout.STAT_SCOPE_LOST) == 0


def test_only_the_exact_path_gets_the_scope(env: Env) -> None:
    # the map's key is the whole path: a prefix, an extension, a path that differs in
    # one byte or in case, or the same name elsewhere, is not the scope
    env.applier.apply(env.plan([f"{env.top.path}/later"]))
    for name in ("late", "later2", "latex", "Later", "later\\x2d"):
        directory = mkdir(env.top.directory / name)
        assert not env.scoped(directory.stat().st_ino), name
        assert first_connect(directory) == "ECONNREFUSED", name
    nested = mkdir(mkdir(env.top.directory / "x") / "later")
    assert first_connect(nested) == "ECONNREFUSED"
    # while the path itself is the scope
    assert first_connect(mkdir(env.top.directory / "later")) == "EPERM"


def test_a_scope_path_the_next_plan_drops_no_longer_scopes_new_cgroups(env: Env) -> None:
    env.applier.apply(env.plan([f"{env.top.path}/a"]))
    env.applier.apply(env.plan([f"{env.top.path}/b"]))
    assert first_connect(mkdir(env.top.directory / "a")) == "ECONNREFUSED"
    assert first_connect(mkdir(env.top.directory / "b")) == "EPERM"
    # the old slot's paths are gone: only the active slot has entries for them
    keys = list(env.kernel.map("guard_scope_paths").keys())
    assert len(keys) == 1



def test_without_the_scope_programs_the_others_still_load_and_say_why(tmp_path: Path) -> None:
    # e.g. tracefs not mounted: bcc cannot read the event's format, so scope.bpf.c does
    # not compile; the family is left out (and the daemon says so at start), net stays
    need_root()
    need_net_programs()
    import shutil

    from guard.layout import BPF_DIR

    bpf_dir = tmp_path / "bpf"
    shutil.copytree(BPF_DIR, bpf_dir)
    source = bpf_dir / "scope.bpf.c"
    source.write_text(source.read_text().replace("TRACEPOINT_PROBE(cgroup, cgroup_rmdir)",
                                                  "TRACEPOINT_PROBE(cgroup, cgroup_nosuch)"))
    with TestCgroup.create() as top, Kernel(families={"net"}, host_cgroup=top.path,
                                            bpf_dir=bpf_dir) as kernel:
        assert kernel.families == {"net"} and kernel.shared == set()
        assert kernel.dropped["scope"].startswith("compiling failed: scope.bpf.c:")
        assert len(kernel.attached) == 5
