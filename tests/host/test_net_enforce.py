"""Outbound connection control, in the host kernel, through real sockets.

Every test goes the whole way: policy YAML -> parse -> compile -> apply into the
maps of programs attached to a cgroup this module made, then a client process in
a child cgroup talks to echo servers in network namespaces this module made.

    /guard-test-XXXX          the programs are attached here (host cgroup)
    /guard-test-XXXX/in       the policies' scope: judged
    /guard-test-XXXX/out      under the programs, but in no scope: not judged

Teardown (even on failure): detach (Kernel context manager), stop the servers,
delete the namespaces, kill what runs in the cgroups and remove them.
"""

from __future__ import annotations

import ctypes
import errno
import json
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from support.lab import NetKernel, net_kernel
from support.policies import compile_dir, egress_section, policy_text, tcp_rule

from guard import layout
from guard.kernel.apply import Applier
from guard.kernel.loader import Kernel
from guard.policy.compile import compile_policies
from guard.policy.model import PolicySet
from guard.policy.plan import Plan, Verdict

pytestmark = pytest.mark.host

AF_INET, AF_INET6 = 2, 10
TCP, UDP = 6, 17


class EventTap:
    """The ring buffer, read directly: every record decoded as guard.layout.Event."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.events: list[layout.Event] = []
        self.short = 0
        kernel.map("guard_events").open_ring_buffer(self._on_event)

    def _on_event(self, _ctx: Any, data: Any, size: int) -> int:
        if size < ctypes.sizeof(layout.Event):
            self.short += 1
            return 0
        self.events.append(layout.Event.from_buffer_copy(ctypes.string_at(data, size)))
        return 0

    def poll(self, timeout_ms: int = 100) -> None:
        self.kernel.bpf.ring_buffer_poll(timeout_ms)

    def wait_for(self, pred: Callable[[layout.Event], bool], timeout: float = 3.0,
                 ) -> list[layout.Event]:
        deadline = time.monotonic() + timeout
        while True:
            self.poll(100)
            found = [e for e in self.events if pred(e)]
            if found or time.monotonic() > deadline:
                return found

    def clear(self) -> None:
        self.poll(0)
        self.events.clear()


@dataclass(frozen=True)
class Env(NetKernel):
    applier: Applier
    tap: EventTap
    counter: list[int] = field(default_factory=lambda: [0])

    def token(self, what: str) -> str:
        self.counter[0] += 1
        return f"{what}-{self.counter[0]}-{secrets.token_hex(3)}"

    def plan(self, egress: str, mode: str = "enforce", name: str = "net-test") -> Plan:
        """A one-policy plan scoped to ``inside``, compiled from YAML like a user's."""
        # the trailing blank line is what this test always wrote
        text = policy_text(name, egress_section(egress) + "\n", scope=self.inside.path,
                           mode=mode)
        return compile_dir(self.policy_dir, name, text, self.top.path)

    def enforce(self, egress: str, mode: str = "enforce") -> Plan:
        plan = self.plan(egress, mode)
        result = self.applier.apply(plan)
        assert not result.warnings, result.warnings
        self.tap.clear()
        return plan

    def stat(self, index: int) -> int:
        return int(sum(self.kernel.map("guard_stats")[ctypes.c_int(index)]))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with net_kernel(tmp_path_factory.mktemp("net")) as net:
        yield Env(net.top, net.inside, net.outside, net.lab, net.kernel, net.policy_dir,
                  Applier(net.kernel), EventTap(net.kernel))


def blocked(result: dict[str, Any]) -> bool:
    return bool(result["result"] == "error" and result["errno"] == errno.EPERM)


def echoed(result: dict[str, Any], token: str) -> bool:
    return bool(result["result"] == "ok" and result["echo"] == token)


def test_programs_are_attached_to_the_test_cgroup_only(env: Env) -> None:
    assert set(env.kernel.attached) == {
        "guard_connect4", "guard_connect6", "guard_sendmsg4", "guard_sendmsg6", "guard_egress"}


def test_tcp_connect_to_denied_cidr_and_port_fails_with_eperm(env: Env) -> None:
    env.enforce("""\
        default: allow
        rules:
          - {action: deny, to: [198.51.100.0/24], ports: [7001], protocol: tcp}
        """)
    denied, allowed, other = env.token("deny"), env.token("allow"), env.token("other")
    result = env.lab.run(env.inside, "tcp", "198.51.100.2", 7001, denied)
    assert blocked(result), result
    assert result["name"] == "PermissionError"
    assert echoed(env.lab.run(env.inside, "tcp", "198.51.100.2", 7000, allowed), allowed)
    assert echoed(env.lab.run(env.inside, "tcp", "203.0.113.2", 7001, other), other)
    assert not env.lab.peer_received(denied)
    assert env.lab.peer_received(allowed)


def test_processes_outside_the_scope_are_not_affected(env: Env) -> None:
    env.enforce("""\
        default: deny
        rules: []
        """)
    token = env.token("scoped")
    assert blocked(env.lab.run(env.inside, "tcp", "198.51.100.2", 7000, token))
    # a sibling cgroup: the programs run for it, but no scope covers it
    sibling = env.token("sibling")
    assert echoed(env.lab.run(env.outside, "tcp", "198.51.100.2", 7000, sibling), sibling)
    # the test's own cgroup, where no guard program is attached at all
    mine = env.token("mine")
    assert echoed(env.lab.run(None, "tcp", "198.51.100.2", 7000, mine), mine)
    udp = env.token("sibling-udp")
    assert echoed(env.lab.run(env.outside, "udp", "198.51.100.2", 7002, udp), udp)


def test_udp_to_denied_destination_is_not_delivered(env: Env) -> None:
    env.enforce("""\
        default: allow
        rules:
          - {action: deny, to: [198.51.100.2/32], ports: [7002], protocol: udp}
        """)
    denied, allowed = env.token("udp-deny"), env.token("udp-allow")
    result = env.lab.run(env.inside, "udp", "198.51.100.2", 7002, denied)
    assert blocked(result), result  # sendmsg4 refuses the datagram: sendto() gets EPERM
    assert echoed(env.lab.run(env.inside, "udp", "198.51.100.3", 7002, allowed), allowed)
    # bounded wait: the allowed datagram arrived, the denied one never does
    assert env.lab.wait_received(allowed)
    assert not env.lab.wait_received(denied, timeout=1.0)


# A datagram sent through a raw socket: with IP_HDRINCL the process writes the
# whole IPv4 header itself, whatever protocol the socket was opened with.
RAW_SEND = textwrap.dedent("""\
    import json, socket, struct, sys
    proto, hdrincl, dst, port, token = sys.argv[1], sys.argv[2] == "1", sys.argv[3], \\
        int(sys.argv[4]), sys.argv[5].encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, getattr(socket, proto))
    udp = struct.pack("!HHHH", 40000, port, 8 + len(token), 0) + token
    if hdrincl:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        src = socket.inet_aton("198.51.100.1")
        packet = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64,
                             socket.IPPROTO_UDP, 0, src, socket.inet_aton(dst)) + udp
    else:
        packet = udp
    try:
        sock.sendto(packet, (dst, 0))
        print(json.dumps({"result": "ok"}))
    except OSError as error:
        print(json.dumps({"result": "error", "errno": error.errno}))
    """)


def raw_send(env: Env, proto: str, hdrincl: bool, dst: str, port: int, token: str
             ) -> dict[str, Any]:
    proc = env.inside.spawn([sys.executable, "-c", RAW_SEND, proto, "1" if hdrincl else "0",
                             dst, str(port), token], netns=env.lab.client_ns,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.mark.parametrize(("proto", "hdrincl"), [
    ("IPPROTO_TCP", True),   # opened as TCP, writes a UDP header: the socket's protocol lies
    ("IPPROTO_RAW", True),
    ("IPPROTO_UDP", False),  # the kernel writes the IP header, the process the UDP one
])
def test_raw_sockets_are_judged_by_the_headers_they_send(env: Env, proto: str,
                                                         hdrincl: bool) -> None:
    env.enforce("""\
        default: allow
        rules:
          - {action: deny, to: [198.51.100.2/32], ports: [7002], protocol: udp}
        """)
    denied, allowed = env.token("raw-deny"), env.token("raw-allow")
    # the same crafted datagram reaches an allowed destination: raw sends work here
    assert raw_send(env, proto, hdrincl, "198.51.100.3", 7002, allowed)["result"] == "ok"
    assert env.lab.wait_received(allowed)
    result = raw_send(env, proto, hdrincl, "198.51.100.2", 7002, denied)
    assert result == {"result": "error", "errno": errno.EPERM}, result
    assert not env.lab.wait_received(denied, timeout=1.0)
    skb_egress = 10  # bpf/guard.h GUARD_HOOK_SKB_EGRESS
    found = env.tap.wait_for(lambda e: e.hook == skb_egress and e.port == 7002)
    assert found and found[0].proto == 17 and found[0].verdict == Verdict.DENY, found


def test_ipv6_is_enforced_the_same_way(env: Env) -> None:
    env.enforce("""\
        default: allow
        rules:
          - {action: deny, to: ["2001:db8:1::/64"], ports: [7001]}
          - {action: deny, to: ["2001:db8:2::2/128"], protocol: udp}
        """)
    cases = {
        ("tcp", "2001:db8:1::2", 7001): True,
        ("udp", "2001:db8:1::3", 7001): True,
        ("tcp", "2001:db8:1::2", 7000): False,
        ("udp", "2001:db8:2::2", 7000): True,
        ("tcp", "2001:db8:2::2", 7000): False,
        ("tcp", "198.51.100.2", 7001): False,  # the IPv4 twin is not covered
    }
    tokens = {case: env.token("v6") for case in cases}
    results = env.lab.batch(env.inside, [(op, addr, port, tokens[(op, addr, port)], 1.0)
                                         for op, addr, port in cases])
    for (case, deny), result in zip(cases.items(), results, strict=True):
        if deny:
            assert blocked(result), (case, result)
            assert not env.lab.peer_received(tokens[case])
        else:
            assert echoed(result, tokens[case]), (case, result)


def test_ipv4_mapped_ipv6_destination_is_decided_as_ipv4(env: Env) -> None:
    env.enforce("""\
        default: allow
        rules:
          - {action: deny, to: [198.51.100.2/32], ports: [7001]}
        """)
    # an IPv6 socket to ::ffff:198.51.100.2 goes out as IPv4
    for op in ("tcp", "udp"):
        token = env.token(f"mapped-{op}")
        result = env.lab.run(env.inside, op, "::ffff:198.51.100.2", 7001, token)
        assert blocked(result), (op, result)
        assert not env.lab.peer_received(token)
    env.tap.wait_for(lambda e: e.port == 7001 and e.proto == UDP)
    events = [e for e in env.tap.events if e.port == 7001]
    # TCP is judged by connect6 (the mapped address decided as IPv4); for UDP the
    # kernel hands a mapped destination to udp_sendmsg, so sendmsg4 judges it
    assert sorted((e.hook, e.proto) for e in events) == [(7, TCP), (8, UDP)]
    assert all(e.family == AF_INET and bytes(e.addr[:4]) == bytes([198, 51, 100, 2])
               for e in events)
    ok = env.token("mapped-ok")
    assert echoed(env.lab.run(env.inside, "tcp", "::ffff:198.51.100.2", 7000, ok), ok)


def test_egress_allowlist_lets_only_listed_destinations_through(env: Env) -> None:
    env.enforce("""\
        default: deny
        rules:
          - {action: allow, to: [198.51.100.2/32], ports: [7000], protocol: tcp}
          - {action: allow, to: ["2001:db8:1::3/128"], protocol: udp}
        """)
    cases = {
        ("tcp", "198.51.100.2", 7000): False,
        ("tcp", "198.51.100.2", 7001): True,
        ("udp", "198.51.100.2", 7000): True,
        ("tcp", "198.51.100.3", 7000): True,
        ("tcp", "203.0.113.2", 7000): True,
        ("udp", "2001:db8:1::3", 7002): False,
        ("tcp", "2001:db8:1::3", 7002): True,
        ("tcp", "2001:db8:1::2", 7000): True,
        ("tcp", "127.0.0.1", 7000): True,  # loopback is not special
    }
    tokens = {case: env.token("allowlist") for case in cases}
    results = env.lab.batch(env.inside, [(op, addr, port, tokens[(op, addr, port)], 1.0)
                                         for op, addr, port in cases])
    for (case, deny), result in zip(cases.items(), results, strict=True):
        assert blocked(result) if deny else echoed(result, tokens[case]), (case, result)


def test_port_ranges(env: Env) -> None:
    env.enforce("""\
        default: allow
        rules:
          - {action: deny, to: [0.0.0.0/0], ports: [7010-7019]}
        """)
    cases = {7009: False, 7010: True, 7019: True, 7020: False}
    tokens = {port: env.token("range") for port in cases}
    results = env.lab.batch(env.inside, [("tcp", "198.51.100.2", port, tokens[port], 1.0)
                                         for port in cases])
    for (port, deny), result in zip(cases.items(), results, strict=True):
        assert blocked(result) if deny else echoed(result, tokens[port]), (port, result)


def test_protocol_specific_rules(env: Env) -> None:
    env.enforce("""\
        default: allow
        rules:
          - {action: deny, to: [198.51.100.0/24], ports: [7000], protocol: udp}
          - {action: deny, to: [198.51.100.0/24], ports: [7001], protocol: tcp}
        """)
    cases = {("udp", 7000): True, ("tcp", 7000): False, ("tcp", 7001): True,
             ("udp", 7001): False}
    tokens = {case: env.token("proto") for case in cases}
    results = env.lab.batch(env.inside, [(op, "198.51.100.2", port, tokens[(op, port)], 1.0)
                                         for op, port in cases])
    for (case, deny), result in zip(cases.items(), results, strict=True):
        assert blocked(result) if deny else echoed(result, tokens[case]), (case, result)


def test_loopback_rules(env: Env) -> None:
    env.enforce("""\
        default: allow
        rules:
          - {action: deny, to: [127.0.0.0/8], ports: [7001]}
          - {action: deny, to: ["::1/128"], ports: [7002]}
        """)
    cases = {("tcp", "127.0.0.1", 7001): True, ("udp", "127.0.0.1", 7001): True,
             ("tcp", "127.0.0.1", 7000): False, ("tcp", "::1", 7002): True,
             ("tcp", "::1", 7001): False}
    tokens = {case: env.token("lo") for case in cases}
    results = env.lab.batch(env.inside, [(*case, tokens[case], 1.0) for case in cases])
    for (case, deny), result in zip(cases.items(), results, strict=True):
        if deny:
            assert blocked(result), (case, result)
            assert not env.lab.loopback_received(tokens[case])
        else:
            assert echoed(result, tokens[case]), (case, result)


def test_audit_mode_allows_and_reports_with_process_fields(env: Env) -> None:
    plan = env.enforce("""\
        default: allow
        rules:
          - {action: deny, to: [198.51.100.2/32], ports: [7001], protocol: tcp}
          - {action: audit, to: ["2001:db8:1::2/128"], ports: [7002], protocol: udp}
        """, mode="audit")
    first, second = env.token("would-deny"), env.token("audited")
    assert echoed(env.lab.run(env.inside, "tcp", "198.51.100.2", 7001, first), first)
    assert echoed(env.lab.run(env.inside, "udp", "2001:db8:1::2", 7002, second), second)
    would = env.tap.wait_for(lambda e: e.port == 7001)
    audited = env.tap.wait_for(lambda e: e.port == 7002)
    assert len(would) == 1 and len(audited) == 1, (would, audited)
    w, a = would[0], audited[0]
    assert (w.kind, w.hook, w.verdict, w.family, w.proto) == (
        layout.KIND_CONNECT, 6, int(Verdict.WOULD_DENY), AF_INET, TCP)
    assert bytes(w.addr[:4]) == bytes([198, 51, 100, 2])
    assert (a.hook, a.verdict, a.family, a.proto) == (9, int(Verdict.AUDIT), AF_INET6, UDP)
    assert bytes(a.addr) == bytes.fromhex("20010db8000100000000000000000002")
    for event in (w, a):
        # the cgroup id the kernel reports is the directory's inode number
        assert event.cgroup_id == env.inside.id
        assert event.pid > 0 and event.comm.startswith(b"python")
        assert event.count == 1
    rule_w = env.applier.rule_for(w.ruleset, w.rule_id)
    rule_a = env.applier.rule_for(a.ruleset, a.rule_id)
    assert rule_w is not None and (rule_w.policy, rule_w.section, rule_w.index) == (
        "net-test", "egress", 0)
    assert rule_a is not None and rule_a.index == 1
    assert rule_w == plan.rule(w.rule_id)


def test_denials_are_reported_with_the_deciding_rule(env: Env) -> None:
    env.enforce("""\
        default: allow
        rules:
          - {action: deny, to: [203.0.113.0/24], ports: [7002], protocol: udp}
        """)
    denied_before = env.stat(layout.STAT_DENIED)
    token = env.token("report")
    assert blocked(env.lab.run(env.inside, "udp", "203.0.113.2", 7002, token))
    events = env.tap.wait_for(lambda e: e.port == 7002)
    assert len(events) == 1
    event = events[0]
    assert (event.hook, event.verdict, event.proto) == (8, int(Verdict.DENY), UDP)
    assert bytes(event.addr[:4]) == bytes([203, 0, 113, 2])
    rule = env.applier.rule_for(event.ruleset, event.rule_id)
    assert rule is not None and rule.index == 0
    assert env.stat(layout.STAT_DENIED) == denied_before + 1


def cut_by_deny(env: Env, port: int, hello: str, after: str) -> layout.Event:
    """Hold a TCP connection from ``inside`` to 198.51.100.2:``port`` (``hello`` echoed
    back), enforce a deny of exactly that, and prove the connection cut: ``after`` is
    refused and never arrives, and skb egress (hook 10) reports a DENY owned by the
    holder. Returns that event."""
    holder = env.lab.hold(env.inside, "tcp", "198.51.100.2", port, hello)
    try:
        assert echoed(holder.result(), hello)
        env.enforce(f"default: allow\nrules:\n  - {tcp_rule('deny', port, '198.51.100.2/32')}\n")
        result = holder.send(after)
        assert result["result"] != "ok", result
        assert not env.lab.wait_received(after, timeout=1.0)
        events = env.tap.wait_for(lambda e: e.hook == 10 and e.port == port)
        assert events and events[0].verdict == int(Verdict.DENY)
        assert events[0].pid == holder.proc.pid  # the socket's owner, from socket storage
        return events[0]
    finally:
        holder.close()


def test_established_connection_stops_once_denied(env: Env) -> None:
    env.enforce("""\
        default: allow
        rules: []
        """)
    event = cut_by_deny(env, 7000, env.token("hello"), env.token("after-deny"))
    assert event.cgroup_id == env.inside.id


def test_connection_made_while_no_policy_covered_it_is_cut_by_a_later_one(env: Env) -> None:
    """A service whose first policy arrives while it is connected: the connection was
    made with no scope at all (nothing judged it), yet the new deny stops it."""
    env.applier.apply(compile_policies(PolicySet(())))
    cut_by_deny(env, 7001, env.token("unscoped-hello"), env.token("unscoped-after"))


def test_packet_denials_are_folded_in_the_kernel(env: Env) -> None:
    env.enforce("""\
        default: allow
        rules: []
        """)
    hello = env.token("udp-hello")
    # a connected UDP socket: its datagrams no longer pass sendmsg4, only skb egress
    holder = env.lab.hold(env.inside, "udp", "198.51.100.2", 7009, hello)
    try:
        assert echoed(holder.result(), hello)
        env.enforce("""\
            default: allow
            rules:
              - {action: deny, to: [198.51.100.2/32], ports: [7009], protocol: udp}
            """)
        suppressed = env.stat(layout.STAT_SUPPRESSED)
        flood = holder.send(env.token("flood"), count=200)
        assert flood["result"] != "ok"
        # the kernel refuses each datagram: send() fails with EPERM
        assert flood["errors"] == 200 and flood["last_error"]["errno"] == errno.EPERM, flood
        first = env.tap.wait_for(lambda e: e.hook == 10 and e.port == 7009)
        assert len(first) == 1 and first[0].count == 1, [e.count for e in first]
        assert env.stat(layout.STAT_SUPPRESSED) == suppressed + 199
        time.sleep(1.1)  # the fold window passes; the next packet reports them all
        env.tap.clear()
        holder.send(env.token("one-more"), count=1)
        later = env.tap.wait_for(lambda e: e.hook == 10 and e.port == 7009)
        assert len(later) == 1 and later[0].count == 200, [e.count for e in later]
    finally:
        holder.close()


def test_kernel_agrees_with_the_evaluator(env: Env) -> None:
    from guard.policy.evaluate import decide_connect

    plan = env.enforce("""\
        default: allow
        rules:
          - {action: deny, to: [198.51.100.0/24], ports: [7001, 7009-7010]}
          - {action: allow, to: [198.51.100.3/32], ports: [7001]}
          - {action: deny, to: [203.0.113.0/24], protocol: udp}
          - {action: deny, to: ["2001:db8:1::/64"], ports: [7000], protocol: tcp}
          - {action: deny, to: ["2001:db8::/32"], ports: [7002]}
          - {action: allow, to: ["2001:db8:2::2/128"], ports: [7002], protocol: udp}
          - {action: deny, to: [198.51.100.2/32], protocol: tcp, ports: [7019-7020]}
        """)
    addresses = ("198.51.100.2", "198.51.100.3", "203.0.113.2", "2001:db8:1::2",
                 "2001:db8:1::3", "2001:db8:2::2", "::ffff:198.51.100.3")
    ports = (7000, 7001, 7002, 7009, 7010, 7020)
    cases = [(op, addr, port, env.token("x"), 1.0)
             for op in ("tcp", "udp") for addr in addresses for port in ports]
    results = env.lab.batch(env.inside, cases)
    mismatches = []
    for (op, addr, port, token, _), result in zip(cases, results, strict=True):
        expected = decide_connect(plan, env.inside.path, addr, port, op).verdict.blocks
        if blocked(result) != expected or (not expected and not echoed(result, token)):
            mismatches.append((op, addr, port, expected, result))
    assert not mismatches
    assert sum(1 for c in cases
               if decide_connect(plan, env.inside.path, c[1], c[2], c[0]).verdict.blocks) > 10
