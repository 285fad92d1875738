"""Every transport against a real rsyslogd, and delivery across its restart.

The test starts its own rsyslogd (tests/support/rsyslog.py) on a unix socket in
a temporary directory and on ephemeral loopback ports, sends formatted events
through guard's Sink, and parses what rsyslogd wrote back with the strict
RFC 5424 parser. No root needed; rsyslogd must be installed (scripts/setup).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import need
from support.rsyslog import Rsyslog, guard_messages

from guard.events.formats import event_record
from guard.events.records import AuditEvent
from guard.events.transports import Sink, parse_target

T0 = 1_764_063_660_123_456_000


@pytest.fixture(autouse=True)
def _rsyslogd() -> None:
    need(shutil.which("rsyslogd") is not None or Path("/usr/sbin/rsyslogd").exists(),
         "rsyslogd is not installed (scripts/setup installs Debian's rsyslog)")


def event(pid: int, **changes: object) -> AuditEvent:
    fields: dict[str, object] = dict(
        time_ns=T0, action="deny", kind="connect", hook="connect4", policy="egress-lock",
        rule="egress-lock/egress.rules[0]", location="/etc/guard/net.yaml:14", pid=pid,
        tid=pid, ppid=1, uid=1000, comm='we"ird]\\name', exe="/usr/bin/python3.11",
        cgroup="/guard-test/in", cgroup_id=5, addr="127.0.0.1", port=9, proto="tcp", count=1)
    fields.update(changes)
    return AuditEvent(**fields)  # type: ignore[arg-type]


def pump_until(sink: Sink, timeout: float = 10.0) -> None:
    """Drive the sink the way the daemon's loop does, until its queue is empty."""
    deadline = time.monotonic() + timeout
    while sink.stats().queued or sink.stats().overflow_unreported:
        if time.monotonic() > deadline:
            raise TimeoutError(f"sink did not drain: {sink.stats()}")
        sink.pump()
        time.sleep(min(0.02, sink.retry_in() or 0.02))


def received(syslog: Rsyslog, count: int, timeout: float = 10.0) -> list[dict[str, str]]:
    lines = syslog.wait_for(lambda lines: len(guard_messages(lines)) >= count, timeout)
    return [m.fields for m in guard_messages(lines)]


TARGETS = {
    "unix-datagram": lambda s: f"unix:{s.unix_path}",
    "unix-stream": lambda s: f"unix:{s.unix_stream_path}",
    "udp": lambda s: f"udp://127.0.0.1:{s.udp_port}",
    "tcp": lambda s: f"tcp://127.0.0.1:{s.tcp_port}",
}


@pytest.fixture(scope="module")
def syslog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rsyslog]:
    server = Rsyslog(tmp_path_factory.mktemp("rsyslog"), unix=True, unix_stream=True,
                     udp=True, tcp=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("transport", sorted(TARGETS))
def test_each_transport_delivers_parseable_fields(syslog: Rsyslog, transport: str) -> None:
    pid = 10_000 + sorted(TARGETS).index(transport)
    sink = Sink(parse_target(TARGETS[transport](syslog)), hostname="guard-test-host",
                procid=4242)
    sink.submit(event_record(event(pid)))
    pump_until(sink)
    lines = syslog.wait_for(
        lambda lines: any(m.fields.get("pid") == str(pid) for m in guard_messages(lines)))
    [message] = [m for m in guard_messages(lines) if m.fields.get("pid") == str(pid)]
    sink.close()
    assert (message.facility, message.severity) == (10, 4)  # authpriv.warning
    assert (message.host, message.app, message.procid, message.msgid) == (
        "guard-test-host", "guard", "4242", "connect")
    assert message.time == "2025-11-25T09:41:00.123456Z"
    assert message.fields == {
        "action": "deny", "kind": "connect", "hook": "connect4", "policy": "egress-lock",
        "rule": "egress-lock/egress.rules[0]", "location": "/etc/guard/net.yaml:14",
        "pid": str(pid), "ppid": "1", "uid": "1000", "comm": 'we"ird]\\name',
        "exe": "/usr/bin/python3.11", "cgroup": "/guard-test/in", "count": "1",
        "addr": "127.0.0.1", "port": "9", "proto": "tcp",
    }
    assert message.msg.startswith("deny connect to 127.0.0.1:9/tcp by pid")
    if transport == "unix-stream":
        assert sink.transport.stream  # found a stream socket there and framed for it

    # rsyslogd's own RFC 5424 parser read the same fields
    views = [v for v in syslog.parsed_lines() if f'pid="{pid}"' in v.structured_data]
    assert len(views) == 1, syslog.parsed_lines()[-5:]
    view = views[0]
    assert (view.protocol_version, view.pri) == ("1", "84")
    assert (view.app_name, view.procid, view.msgid) == ("guard", "4242", "connect")
    assert view.timereported.startswith("2025-11-25T09:41:00.123456")
    assert view.structured_data.startswith('[guard@32473 action="deny" kind="connect" ')
    assert 'comm="we\\"ird\\]\\\\name"' in view.structured_data
    assert view.msg.startswith("deny connect to 127.0.0.1:9/tcp")


@pytest.mark.parametrize("transport", ["tcp", "unix-datagram", "unix-stream"])
def test_target_down_then_back_delivers_everything(tmp_path: Path, transport: str) -> None:
    """rsyslogd stops; denials keep coming; it starts again; every one arrives, in order."""
    server = Rsyslog(tmp_path, unix=transport == "unix-datagram",
                     unix_stream=transport == "unix-stream", tcp=transport == "tcp")
    server.start()
    try:
        sink = Sink(parse_target(TARGETS[transport](server)), hostname="h", procid=1,
                    retry_initial=0.05, retry_max=0.2)
        sink.submit(event_record(event(1)))
        pump_until(sink)
        assert received(server, 1)[0]["pid"] == "1"

        server.stop()
        time.sleep(0.2)  # the connection's end reaches the sender
        for pid in range(2, 52):
            sink.submit(event_record(event(pid)))
        stats = sink.stats()
        assert stats.queued == 50 and stats.overflow == 0 and not stats.connected
        assert stats.delivered == 1  # nothing was written into the dead target

        server.start()
        pump_until(sink)
        fields = received(server, 51)
        assert [f["pid"] for f in fields] == [str(p) for p in range(1, 52)]
        assert sink.stats().reconnects >= 1
        sink.close()
    finally:
        server.stop()


def test_overflow_while_down_is_counted_exactly(tmp_path: Path) -> None:
    """More denials than the queue holds: the oldest are kept, the rest counted,
    and the count is the first line once rsyslogd is back."""
    server = Rsyslog(tmp_path, tcp=True)
    server.start()
    try:
        sink = Sink(parse_target(f"tcp://127.0.0.1:{server.tcp_port}"), hostname="h",
                    procid=1, queue_size=20, retry_initial=0.05, retry_max=0.2)
        server.stop()
        for pid in range(1, 101):
            sink.submit(event_record(event(pid)))
        assert (sink.stats().queued, sink.stats().overflow) == (20, 80)
        server.start()
        pump_until(sink)
        fields = received(server, 21)
        assert fields[0] == {"action": "lost", "kind": "lost", "count": "80", "source": "sink"}
        assert [f["pid"] for f in fields[1:]] == [str(p) for p in range(1, 21)]
        # every denial is either a line or inside the count
        assert len(fields[1:]) + int(fields[0]["count"]) == 100
        sink.close()
    finally:
        server.stop()


def test_udp_delivers_a_burst(syslog: Rsyslog) -> None:
    """UDP has no delivery guarantee; on loopback a modest burst still arrives whole."""
    sink = Sink(parse_target(TARGETS["udp"](syslog)), hostname="h", procid=77)
    for pid in range(20_000, 20_050):
        sink.submit(event_record(event(pid)))
    pump_until(sink)
    lines = syslog.wait_for(lambda lines: sum(
        1 for m in guard_messages(lines) if m.procid == "77") >= 50)
    pids = [m.fields["pid"] for m in guard_messages(lines) if m.procid == "77"]
    assert pids == [str(p) for p in range(20_000, 20_050)]
    sink.close()
