"""The scope cache (bpf/guard_scope.h) as the network programs use it, in the host kernel.

connect4/6, sendmsg4/6 and skb egress find the actor's ruleset through
``guard_scope_cache``: per cgroup id, the ruleset computed for one (generation,
slot) of the maps. These tests prove, through real sockets, that

- the kernel decides by the cached entry (a forged entry changes the verdict), so
  what follows is not vacuous;
- a reload invalidates every entry without a write: after each of many flips the
  very next connect, and the very next packet of a connected socket, get the new
  set's verdict, although the cgroup's entry of the previous generation is there;
- an entry of another generation, or one naming another cgroup (a recycled LRU
  element), is never used;
- a cgroup created after the apply, below a scoped cgroup, gets that scope (the
  cache miss path, for connect and for packets), and one below no scope gets none.

    /guard-test-XXXX          the programs are attached here
    /guard-test-XXXX/in       the policies' scope
    /guard-test-XXXX/out      under the programs, in no scope
"""

from __future__ import annotations

import ctypes
import errno
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.cgroup import TestCgroup
from support.lab import NetKernel, net_kernel
from support.policies import compile_dir, egress_section, policy_text

from guard.kernel.apply import Applier, ApplyResult, qualified_ruleset
from guard.policy.compile import compile_policies
from guard.policy.parse import load_policy_paths
from guard.policy.plan import Plan

pytestmark = pytest.mark.host

CACHE = "guard_scope_cache"
SCOPE_EGRESS = 1  # enum guard_scope_flags
PEER, OTHER_PEER, PORT = "198.51.100.2", "198.51.100.3", 7000
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Env(NetKernel):
    applier: Applier

    def plan(self, egress: str, scope: TestCgroup | None = None) -> Plan:
        """One enforce-mode policy with this egress section, compiled like a user's."""
        # the trailing blank line is what this test always wrote
        text = policy_text("cache-test", egress_section(egress) + "\n",
                           scope=(scope or self.inside).path)
        return compile_dir(self.policy_dir, "cache-test", text, self.top.path)

    def apply(self, plan: Plan) -> ApplyResult:
        result = self.applier.apply(plan)
        assert result.changed and not result.warnings, result
        return result

    def cache(self) -> Any:
        return self.kernel.map(CACHE)

    def cached(self, cgroup: TestCgroup) -> Any | None:
        try:
            return self.cache()[ctypes.c_uint64(cgroup.id)]
        except KeyError:
            return None

    def entry(self, cgroup: TestCgroup) -> Any:
        """The cgroup's cache entry, which must exist."""
        found = self.cached(cgroup)
        assert found is not None, f"no scope cache entry for {cgroup.path}"
        return found

    def forge(self, cgroup: TestCgroup, *, generation: int, slot: int, ruleset: int,
              flags: int, key_in_value: int | None = None) -> None:
        table = self.cache()
        leaf = table.Leaf()
        leaf.cgroup_id = cgroup.id if key_in_value is None else key_in_value
        leaf.generation, leaf.slot, leaf.ruleset, leaf.flags = generation, slot, ruleset, flags
        table[ctypes.c_uint64(cgroup.id)] = leaf

    def connect(self, cgroup: TestCgroup, addr: str = PEER, port: int = PORT) -> str:
        """'allow' or 'deny' (EPERM) for one TCP exchange from ``cgroup``."""
        token = f"cache-{secrets.token_hex(4)}"
        return outcome(self.lab.run(cgroup, "tcp", addr, port, token))


def outcome(result: dict[str, Any]) -> str:
    if result["result"] == "ok":
        return "allow"
    if result["result"] == "error" and result["errno"] == errno.EPERM:
        return "deny"
    raise AssertionError(f"neither echoed nor refused: {result}")


ALLOW = """\
    default: allow
    rules:
      - {action: deny, to: [203.0.113.0/24], ports: [7009]}
    """
DENY = """\
    default: allow
    rules:
      - {action: deny, to: [198.51.100.2/32], ports: [7000]}
    """
DENY_TOO = """\
    default: allow
    rules:
      - {action: deny, to: [198.51.100.2/32], ports: [7000]}
      - {action: deny, to: [203.0.113.0/24], ports: [7010]}
    """


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with net_kernel(tmp_path_factory.mktemp("scope-cache")) as net:
        yield Env(net.top, net.inside, net.outside, net.lab, net.kernel, net.policy_dir,
                  Applier(net.kernel))


def test_the_kernel_decides_by_the_cached_entry(env: Env) -> None:
    result = env.apply(env.plan(DENY))
    assert env.connect(env.inside) == "deny"
    entry = env.cached(env.inside)
    assert entry is not None, "connect4 left no cache entry for its cgroup"
    ruleset = qualified_ruleset(result.slot, 0)
    assert (entry.cgroup_id, entry.generation, entry.slot, entry.ruleset) == (
        env.inside.id, result.generation, result.slot, ruleset)
    assert entry.flags & SCOPE_EGRESS

    # a forged entry for this generation saying "no scope": trusted, so allowed
    env.forge(env.inside, generation=result.generation, slot=result.slot, ruleset=-1, flags=0)
    assert env.connect(env.inside) == "allow"
    # the same, but naming another cgroup inside (a recycled element): refused, and
    # the walk's answer replaces it
    env.forge(env.inside, generation=result.generation, slot=result.slot, ruleset=-1, flags=0,
              key_in_value=env.outside.id)
    assert env.connect(env.inside) == "deny"
    assert env.entry(env.inside).cgroup_id == env.inside.id
    # another generation, or the other slot: never used
    for generation, slot in ((result.generation - 1, result.slot),
                             (result.generation, 1 - result.slot)):
        env.forge(env.inside, generation=generation, slot=slot, ruleset=-1, flags=0)
        assert env.connect(env.inside) == "deny", (generation, slot)
    # a forged entry, then a reload: invalidated without anyone writing the cache
    env.forge(env.inside, generation=result.generation, slot=result.slot, ruleset=-1, flags=0)
    assert env.connect(env.inside) == "allow"
    again = env.apply(env.plan(DENY_TOO))
    assert env.connect(env.inside) == "deny"
    assert env.entry(env.inside).generation == again.generation


def test_every_reload_is_seen_by_the_very_next_connect_and_packet(env: Env) -> None:
    """Many flips between a set allowing PEER:7000 and one denying it. Before each
    flip the cgroup's entry holds the current generation (so a stale entry is there
    to be misused); after it, the next connect and the next datagram of a UDP socket
    connected long before get the new set's verdict."""
    allow, deny = env.plan(ALLOW), env.plan(DENY)
    env.apply(allow)
    holder = env.lab.hold(env.inside, "udp", PEER, PORT, f"hello-{secrets.token_hex(3)}")
    try:
        assert holder.result()["result"] == "ok"
        for i in range(24):
            denying = i % 2 == 0
            before = env.cached(env.inside)
            current = env.applier.writer().read_config()
            assert before is not None and before.generation == current.generation
            result = env.apply(deny if denying else allow)
            want = "deny" if denying else "allow"
            # the packet first: nothing but the egress program has run since the flip
            token = f"dgram-{i}-{secrets.token_hex(3)}"
            sent = holder.send(token)
            if denying:
                assert sent.get("errors") == 1 and sent["last_error"]["errno"] == errno.EPERM, (
                    i, sent)
                assert not env.lab.peer_received(token)
            else:
                assert sent["result"] == "ok" and sent["echo"] == token, (i, sent)
            assert env.connect(env.inside) == want, i
            assert env.connect(env.inside, OTHER_PEER) == "allow", i
            entry = env.entry(env.inside)
            assert (entry.generation, entry.slot) == (result.generation, result.slot), i
    finally:
        holder.close()


def test_a_cgroup_made_after_the_apply_gets_its_ancestors_scope(env: Env) -> None:
    result = env.apply(env.plan(DENY))
    late = env.inside.child(f"late-{secrets.token_hex(3)}")
    deeper = late.child("deeper")
    elsewhere = env.outside.child(f"late-{secrets.token_hex(3)}")
    assert env.cached(deeper) is None and env.cached(elsewhere) is None
    assert env.connect(deeper) == "deny"
    assert env.connect(elsewhere) == "allow"
    scoped, unscoped = env.cached(deeper), env.cached(elsewhere)
    assert scoped is not None and scoped.ruleset == qualified_ruleset(result.slot, 0)
    assert unscoped is not None and unscoped.ruleset == -1
    assert (unscoped.generation, unscoped.slot) == (result.generation, result.slot)

    # the packet path's miss: a socket of a cgroup made after the last apply, whose
    # first judged packet after the next flip finds only a stale entry
    env.apply(env.plan(ALLOW))
    newest = env.inside.child(f"newest-{secrets.token_hex(3)}")
    holder = env.lab.hold(newest, "udp", PEER, PORT, f"hello-{secrets.token_hex(3)}")
    try:
        assert holder.result()["result"] == "ok"
        env.apply(env.plan(DENY))
        sent = holder.send(f"after-{secrets.token_hex(3)}")
        assert sent.get("errors") == 1 and sent["last_error"]["errno"] == errno.EPERM, sent
    finally:
        holder.close()


def _compiled_plans() -> Iterator[tuple[str, Plan]]:
    sources = [*sorted((REPO / "tests" / "golden").glob("*.yaml")), REPO / "policies",
               REPO / "tests" / "fixtures" / "valid"]
    for source in sources:
        loaded = load_policy_paths([str(source)])
        if loaded.errors or loaded.policy_set is None:
            continue
        yield source.name, compile_policies(loaded.policy_set, host_cgroup="/",
                                            unit_cgroups={})


def test_every_ruleset_with_a_network_entry_has_an_egress_default() -> None:
    """The programs stop at once for a ruleset without an egress default (nothing to
    judge); that is right only because the compiler gives one to every ruleset it
    writes a network entry for."""
    seen = 0
    for name, plan in _compiled_plans():
        with_default = {d.ruleset for d in plan.defaults if d.egress is not None}
        for entry in plan.net:
            assert entry.ruleset in with_default, (name, entry)
            seen += 1
    assert seen > 0
