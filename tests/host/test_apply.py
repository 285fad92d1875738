"""Apply against real maps of loaded programs: slots, no-op reloads, failures, scale.

Enforcement is checked with a real connect() to a loopback listener this test
opens, from a process in a cgroup this test made (the programs are attached to
that cgroup only, so nothing else on the machine is judged).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support import need, need_root
from support.cgroup import TestCgroup

from guard import layout
from guard.errors import Location
from guard.kernel import apply
from guard.kernel.loader import Kernel, probe_family
from guard.policy.plan import (
    Decision,
    NetEntry,
    Plan,
    PortMatch,
    PortTable,
    Proto,
    RuleRef,
    Ruleset,
    RulesetDefaults,
    ScopeEntry,
    Verdict,
)

pytestmark = pytest.mark.host

HERE = Location("generated.yaml", 1, 1)
CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
    print("connected")
except PermissionError:
    print("denied")
"""


@dataclass
class Env:
    cgroup: TestCgroup
    inside: TestCgroup
    kernel: Kernel
    listener: socket.socket

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def connect(self) -> str:
        proc = self.inside.spawn([sys.executable, "-c", CONNECT, str(self.port)],
                                 stdout=-1, stderr=-1, text=True)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        return str(out.strip())

    def count(self, name: str) -> int:
        return sum(1 for _ in self.kernel.map(name))

    def config(self) -> layout.Config:
        value = self.kernel.map("guard_config")[ctypes_u32(0)]
        return layout.Config.from_buffer_copy(bytes(value))


def ctypes_u32(value: int) -> Any:
    import ctypes

    return ctypes.c_uint32(value)


@pytest.fixture
def env() -> Iterator[Env]:
    need_root()
    feature = probe_family("net")
    need(feature.available, f"cgroup network programs: {feature.reason}")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        with TestCgroup.create() as cg:
            inside = cg.child("in")
            with Kernel(families={"net"}, host_cgroup=cg.path) as kernel:
                yield Env(cg, inside, kernel, listener)
    finally:
        listener.close()


def net_plan(scope: str, count: int, deny_loopback: bool) -> Plan:
    """``count`` /32 prefixes (from 10.0.0.0 on; never contacted) all denying tcp,
    plus, when asked, 127.0.0.1/32 denying any port."""
    rules = (RuleRef(1, "scale", "egress", 0, HERE), RuleRef(2, "scale", "egress", -1, HERE))
    deny = PortTable(0, (PortMatch(Proto.ANY, 0, 65535, Decision(Verdict.DENY, 1)),))
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    net = [NetEntry(0, f"{ipaddress.IPv4Address(base + i)}/32", 0) for i in range(count)]
    if deny_loopback:
        net.append(NetEntry(0, "127.0.0.1/32", 0))
    return Plan(
        rules=rules,
        rulesets=(Ruleset(0, ("scale",)),),
        scopes=(ScopeEntry(scope, 0),),
        defaults=(RulesetDefaults(0, None, Decision(Verdict.ALLOW, 2)),),
        exec=(),
        files=(),
        net=tuple(net),
        port_tables=(deny,),
    )


def test_apply_flips_slots_and_clears_the_old_one(env: Env) -> None:
    applier = apply.Applier(env.kernel)
    assert env.connect() == "connected"
    first = applier.apply(net_plan(env.inside.path, 10, deny_loopback=True))
    assert first.changed and first.slot == 1 and first.generation == 1
    assert env.connect() == "denied"
    assert env.count("guard_net4") == 11
    second = applier.apply(net_plan(env.inside.path, 20, deny_loopback=False))
    assert second.changed and second.slot == 0 and second.generation == 2
    assert (second.added, second.removed) == (10, 1)
    assert env.connect() == "connected"
    assert env.count("guard_net4") == 20  # slot 1's entries were deleted
    assert env.count("guard_scopes") == 1 and env.count("guard_port_tables") == 1
    assert (env.config().active_slot, env.config().generation) == (0, 2)


def test_the_same_plan_again_writes_nothing(env: Env) -> None:
    applier = apply.Applier(env.kernel)
    plan = net_plan(env.inside.path, 100, deny_loopback=True)
    applier.apply(plan)
    generation = env.config().generation
    again = applier.apply(net_plan(env.inside.path, 100, deny_loopback=True))
    assert not again.changed and again.written == 0
    assert env.config().generation == generation
    assert env.connect() == "denied"


def test_a_missing_scope_is_no_failure_and_is_followed_by_its_path(env: Env) -> None:
    # no warning: a cgroup made there later is in the scope at once (bpf/scope.bpf.c;
    # tests/host/test_scope_lifecycle.py shows it with real connects)
    applier = apply.Applier(env.kernel)
    plan = net_plan(env.inside.path + "/not-there", 1, deny_loopback=True)
    result = applier.apply(plan)
    assert result.changed and result.warnings == ()
    assert env.count("guard_scopes") == 0 and env.count("guard_scope_paths") == 1
    assert env.connect() == "connected"


class FailingMaps:
    """The error path only: the real maps, except that one of them fails to write."""

    def __init__(self, kernel: Kernel, failing: str) -> None:
        self.kernel, self.failing = kernel, failing

    def map(self, name: str) -> Any:
        if name == self.failing:
            raise OSError(errno.ENOMEM, "injected failure")
        return self.kernel.map(name)


def test_a_failed_apply_leaves_the_active_set_in_force(env: Env) -> None:
    good = net_plan(env.inside.path, 5, deny_loopback=True)
    applier = apply.Applier(env.kernel)
    applier.apply(good)
    before = env.config()
    applier.maps = FailingMaps(env.kernel, apply.PORT_TABLES)
    applier._writer = None
    with pytest.raises(OSError, match="injected"):
        applier.apply(net_plan(env.inside.path, 50, deny_loopback=False))
    after = env.config()
    assert (after.active_slot, after.generation) == (before.active_slot, before.generation)
    assert env.connect() == "denied"  # the old plan still decides
    # the half-written idle slot is cleaned by the next apply that succeeds
    applier.maps = env.kernel
    applier._writer = None
    result = applier.apply(net_plan(env.inside.path, 7, deny_loopback=False))
    assert result.changed
    assert env.count("guard_net4") == 7
    assert env.connect() == "connected"


@pytest.mark.parametrize("count", [10, 1_000, 10_000, 100_000])
def test_apply_time_by_number_of_rules(env: Env, count: int,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    applier = apply.Applier(env.kernel)
    plan = net_plan(env.inside.path, count, deny_loopback=True)
    start = time.monotonic()
    result = applier.apply(plan)
    first = time.monotonic() - start
    start = time.monotonic()
    again = applier.apply(net_plan(env.inside.path, count, deny_loopback=True))
    noop = time.monotonic() - start
    swap = applier.apply(net_plan(env.inside.path, count, deny_loopback=False))
    assert result.changed and not again.changed and swap.changed
    assert env.connect() == "connected"
    assert env.count("guard_net4") == count
    with capsys.disabled():
        print(f"\napply {count:>7} net rules: first {first * 1000:8.1f} ms "
              f"(written {result.written}), same plan {noop * 1000:8.1f} ms, "
              f"swap to another {swap.seconds * 1000:8.1f} ms (written {swap.written}, "
              f"incl. {applier.settle_s * 1000:.0f} ms settle)")
    assert first < 60  # generous: a sanity bound, the numbers are what matters


ATTACH_TYPES = (1, 10, 11, 14, 15)  # egress, connect4/6, sendmsg4/6


def test_close_detaches_everything_and_a_failed_attach_leaves_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from support.cgroup import attached_programs

    from guard.kernel import loader

    need_root()
    with TestCgroup.create() as cg:
        with Kernel(families={"net"}, host_cgroup=cg.path) as kernel:
            assert len(kernel.attached) == 5
            assert [attached_programs(cg.directory, t) for t in ATTACH_TYPES] == [1] * 5
        assert [attached_programs(cg.directory, t) for t in ATTACH_TYPES] == [0] * 5
        # the fourth program cannot load: the three attached before it are detached
        broken = (*loader.NET_PROGRAMS[:3], loader.Program("no_such_function", 18, 15),
                  *loader.NET_PROGRAMS[4:])
        monkeypatch.setitem(loader.CGROUP_PROGRAMS, "net", broken)
        with pytest.raises(loader.LoadError, match="no_such_function"):
            Kernel(families={"net"}, host_cgroup=cg.path)
        assert [attached_programs(cg.directory, t) for t in ATTACH_TYPES] == [0] * 5
