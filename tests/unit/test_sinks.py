"""Formatting and delivery of event lines, without a syslog daemon.

Each formatted line is read back with the strict RFC 5424 parser the host tests
use against rsyslogd (tests/support/rsyslog.py). Delivery is tested against a
scripted transport (down, full, half-written) and against real loopback and
unix sockets the test owns.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import select
import socket
import threading
from pathlib import Path

import pytest
from support.rsyslog import ParseError, parse_rfc5424

from guard.events.formats import (
    FACILITY_AUTH,
    FACILITY_AUTHPRIV,
    SEV_ERR,
    EventFormatter,
    Record,
    escape_param_value,
    event_record,
    format_json,
    format_rfc5424,
    log_record,
    timestamp,
)
from guard.events.records import AuditEvent, lost_event
from guard.events.transports import Sink, Target, TargetError, Transport, parse_target

T0 = 1_764_063_660_123_456_789  # 2025-11-25T09:41:00.123456789Z


def exec_deny(**changes: object) -> AuditEvent:
    fields: dict[str, object] = dict(
        time_ns=T0, action="deny", kind="exec", hook="bprm_check", policy="web",
        rule="web/exec.rules[0]", location="/etc/guard/web.yaml:12", pid=311, tid=311,
        ppid=300, uid=33, comm="sh", exe="/usr/bin/dash", cgroup="/system.slice/nginx.service",
        cgroup_id=99, path="/usr/bin/curl", count=1)
    fields.update(changes)
    return AuditEvent(**fields)  # type: ignore[arg-type]


def line_of(event: AuditEvent) -> str:
    return format_rfc5424(event_record(event), "host1", 4242)


# --- RFC 5424 -------------------------------------------------------------------------


def test_exec_deny_line_parses_back() -> None:
    msg = parse_rfc5424(line_of(exec_deny()))
    assert msg.pri == FACILITY_AUTHPRIV * 8 + 4 == 84
    assert (msg.facility, msg.severity) == (10, 4)
    assert msg.time == "2025-11-25T09:41:00.123456Z"
    assert (msg.host, msg.app, msg.procid, msg.msgid) == ("host1", "guard", "4242", "exec")
    assert msg.fields == {
        "action": "deny", "kind": "exec", "hook": "bprm_check", "policy": "web",
        "rule": "web/exec.rules[0]", "location": "/etc/guard/web.yaml:12", "pid": "311",
        "ppid": "300", "uid": "33", "comm": "sh", "exe": "/usr/bin/dash",
        "cgroup": "/system.slice/nginx.service", "count": "1", "path": "/usr/bin/curl",
    }
    assert msg.msg.startswith("deny exec of /usr/bin/curl by pid 311 (sh)")


@pytest.mark.parametrize(("action", "severity"),
                         [("deny", 4), ("audit", 5), ("would-deny", 5)])
def test_severity_by_action(action: str, severity: int) -> None:
    assert parse_rfc5424(line_of(exec_deny(action=action))).severity == severity


def test_connect_fields() -> None:
    event = exec_deny(kind="connect", hook="connect4", path="", addr="127.0.0.1", port=8080,
                      proto="tcp", count=7)
    msg = parse_rfc5424(line_of(event))
    assert (msg.fields["addr"], msg.fields["port"], msg.fields["proto"]) == (
        "127.0.0.1", "8080", "tcp")
    assert msg.fields["count"] == "7" and "path" not in msg.fields
    assert "connect to 127.0.0.1:8080/tcp" in msg.msg and msg.msg.endswith("(x7)")


def test_file_and_undecided_fields() -> None:
    msg = parse_rfc5424(line_of(exec_deny(kind="file", access="read,write", undecided=True)))
    assert msg.fields["access"] == "read,write" and msg.fields["undecided"] == "1"


def test_lost_line() -> None:
    msg = parse_rfc5424(format_rfc5424(event_record(lost_event(12, "ringbuf", T0)), "h", 1))
    assert msg.msgid == "lost" and msg.severity == 4
    assert msg.fields == {"action": "lost", "kind": "lost", "count": "12", "source": "ringbuf"}
    assert msg.msg == "12 event(s) lost: the kernel ring buffer was full"


@pytest.mark.parametrize(
    "nasty",
    ['a"b', "a\\b", "a]b", 'all "\\] three', "trailing\\", "]", '"', "ünï", "[guard@1 x=\"y\"]"],
)
def test_param_values_escaped_and_round_trip(nasty: str) -> None:
    msg = parse_rfc5424(line_of(exec_deny(path=nasty, comm=nasty, policy=nasty)))
    assert msg.fields["path"] == nasty
    assert msg.fields["comm"] == nasty
    assert msg.fields["policy"] == nasty


def test_escape_param_value() -> None:
    assert escape_param_value('a"b\\c]d') == 'a\\"b\\\\c\\]d'


def test_newlines_never_split_a_line() -> None:
    record = Record(T0, SEV_ERR, "error", (("file", "a\nb"),), "two\nlines\r")
    line = format_rfc5424(record, "h", 1)
    assert "\n" not in line and "\r" not in line
    parse_rfc5424(line)


def test_log_record_without_params_uses_nilvalue() -> None:
    line = format_rfc5424(log_record(6, "start", "guard: enforcing 2 policies", time_ns=T0), "h", 9)
    assert " start - guard: enforcing" in line
    msg = parse_rfc5424(line)
    assert msg.sd == {} and msg.msg == "guard: enforcing 2 policies" and msg.severity == 6


def test_header_tokens_are_sanitized() -> None:
    record = Record(T0, 4, "has space", (), "m")
    msg = parse_rfc5424(format_rfc5424(record, "bad host\n", 1))
    assert (msg.host, msg.msgid) == ("badhost", "hasspace")
    empty = parse_rfc5424(format_rfc5424(Record(T0, 4, "", (), "m"), "", 1))
    assert (empty.host, empty.msgid) == ("-", "-")


def test_timestamp() -> None:
    assert timestamp(0) == "1970-01-01T00:00:00.000000Z"
    assert timestamp(T0) == "2025-11-25T09:41:00.123456Z"


def test_the_parser_is_strict() -> None:
    good = line_of(exec_deny())
    parse_rfc5424(good)
    for bad in [
        good.replace("<84>1", "<84>2"),
        good.replace('path="/usr/bin/curl"', 'path="/usr/bin/cu"rl"'),
        good.replace('path="/usr/bin/curl"', 'path="/usr/bin/cu]rl"'),
        good.replace('path="/usr/bin/curl"', 'path="/usr/bin/cu\\rl"'),
        good.replace(" guard ", "  guard "),
        good.replace("[guard@32473 ", "[guard@32473  "),
    ]:
        with pytest.raises(ParseError):
            parse_rfc5424(bad)


# --- the event formatter: the generic lines, byte for byte ------------------------------

NASTY = ['a"b', "a\\b", "a]b", "tw\no\rlines", "ünï", "[guard@1 x=\"y\"]", "", " "]


def formatter_cases() -> list[AuditEvent]:
    cases = [
        exec_deny(),
        exec_deny(action="audit", count=5),
        exec_deny(action="would-deny", undecided=True, rule=""),
        exec_deny(kind="connect", hook="connect4", path="", addr="127.0.0.1", port=8080,
                  proto="tcp", count=2),
        exec_deny(kind="connect", hook="sendmsg6", path="", addr="fd00::1", port=53,
                  proto="udp"),
        exec_deny(kind="file", hook="file_open", access="read,write", path="/etc/shadow"),
        exec_deny(kind="file", hook="path_change", access="", path="/etc/x"),
        exec_deny(kind="tamper", hook="bpf", path="bpf(BPF_PROG_GET_NEXT_ID)"),
        exec_deny(kind="weird kind\n", hook="hook-99", action="verdict-9"),
        lost_event(12, "ringbuf", T0),
        lost_event(3, "sink", 0),
        exec_deny(time_ns=0),
        exec_deny(time_ns=T0 + 999_999_999),
    ]
    for nasty in NASTY:
        cases += [exec_deny(path=nasty, comm=nasty, policy=nasty, rule=nasty, exe=nasty,
                            cgroup=nasty, location=nasty, action=nasty or "deny"),
                  exec_deny(kind="file", access=nasty, path=nasty)]
    return cases


@pytest.mark.parametrize("facility", [FACILITY_AUTHPRIV, FACILITY_AUTH])
def test_event_formatter_writes_the_generic_line(facility: int) -> None:
    formatter = EventFormatter("host 1", 4242, facility)
    for _ in range(2):  # the second time from its cache
        for event in formatter_cases():
            assert formatter.line(event) == format_rfc5424(
                event_record(event), "host 1", 4242, facility), event


def test_event_formatter_cache_is_bounded() -> None:
    formatter = EventFormatter("h", 1)
    for pid in range(EventFormatter.MAX_GROUPS + 10):
        event = exec_deny(pid=pid)
        assert formatter.line(event) == format_rfc5424(event_record(event), "h", 1)
    assert len(formatter._groups) <= EventFormatter.MAX_GROUPS


def test_timestamp_of_many_seconds() -> None:
    for seconds in range(0, 100_000, 997):
        moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
        assert timestamp(seconds * 10**9 + 1_000) == (
            moment.strftime("%Y-%m-%dT%H:%M:%S") + ".000001Z")


# --- JSON lines ------------------------------------------------------------------------


def test_json_line() -> None:
    text = format_json(event_record(exec_deny(path='a"\nb')), "host1", 4242)
    assert "\n" not in text
    body = json.loads(text)
    assert body["time"] == "2025-11-25T09:41:00.123456Z"
    assert (body["host"], body["app"], body["procid"]) == ("host1", "guard", 4242)
    assert (body["facility"], body["severity"], body["msgid"]) == ("authpriv", "warning", "exec")
    # a control character is named, never carried: the decoded value holds no newline either
    assert (body["action"], body["pid"], body["count"], body["path"]) == ("deny", 311, 1,
                                                                         'a"\\x0ab')
    assert body["message"].startswith("deny exec of")


# --- targets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("/dev/log", Target("unix", path="/dev/log")),
        ("unix:/run/x.sock", Target("unix", path="/run/x.sock")),
        ("unix:///run/x.sock", Target("unix", path="/run/x.sock")),
        ("udp://127.0.0.1:514", Target("udp", host="127.0.0.1", port=514)),
        ("tcp://logs.example:6514", Target("tcp", host="logs.example", port=6514)),
        ("tcp://[::1]:514", Target("tcp", host="::1", port=514)),
        ("file:/var/log/guard.jsonl", Target("file", path="/var/log/guard.jsonl")),
    ],
)
def test_parse_target(text: str, target: Target) -> None:
    assert parse_target(text) == target


def test_target_text_round_trip() -> None:
    for text in ["udp://127.0.0.1:514", "tcp://[::1]:514", "unix:/run/x.sock"]:
        assert parse_target(str(parse_target(text))) == parse_target(text)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("syslog.example:514", "unknown syslog target"),
        ("http://h:1", "unknown syslog target"),
        ("udp://127.0.0.1", "HOST:PORT"),
        ("tcp://:514", "HOST:PORT"),
        ("tcp://h:99999", "out of range"),
        ("tcp://h:0", "port 0"),
        ("tcp://h:514/path", "only tcp://HOST:PORT"),
        ("unix:relative.sock", "absolute path"),
        ("dev/log", "unknown syslog target"),
    ],
)
def test_bad_targets_are_clear_errors(text: str, why: str) -> None:
    with pytest.raises(TargetError, match=why):
        parse_target(text)


# --- the sink's queue, against a scripted transport -------------------------------------


class Script(Transport):
    """A transport the test switches up and down, and fills."""

    def __init__(self, stream: bool = False) -> None:
        self.stream = stream
        self.up = True
        self.opened = False
        self.room: int | None = None  # bytes the peer takes before it is full
        self.got = bytearray()
        self.frames: list[bytes] = []

    def open(self) -> None:
        if not self.up:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        self.opened = True

    def send(self, frame: bytes) -> int:
        if not self.up or not self.opened:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        take = len(frame) if self.room is None else min(self.room, len(frame))
        if not self.stream and take < len(frame):
            return 0
        if self.room is not None:
            self.room -= take
        self.got += frame[:take]
        if not self.stream:
            self.frames.append(frame)
        return take

    def close(self) -> None:
        self.opened = False


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_sink(transport: Transport, clock: Clock, queue_size: int = 5) -> Sink:
    return Sink(Target("udp", host="127.0.0.1", port=9), transport=transport, clock=clock,
                queue_size=queue_size, hostname="h", procid=1, retry_initial=1.0,
                retry_max=4.0)


def parsed(frames: list[bytes]) -> list[dict[str, str]]:
    return [parse_rfc5424(f.decode()).fields for f in frames]


def test_delivers_at_once_when_up() -> None:
    transport, clock = Script(), Clock()
    sink = make_sink(transport, clock)
    sink.submit(event_record(exec_deny(pid=1)))
    assert [f["pid"] for f in parsed(transport.frames)] == ["1"]
    assert sink.stats().delivered == 1 and sink.stats().queued == 0


def test_queue_while_down_then_overflow_reported_first() -> None:
    transport, clock = Script(), Clock()
    transport.up = False
    sink = make_sink(transport, clock, queue_size=3)
    for pid in range(1, 8):
        sink.submit(event_record(exec_deny(pid=pid)))
    stats = sink.stats()
    assert (stats.queued, stats.overflow, stats.delivered) == (3, 4, 0)
    assert "Connection refused" in stats.last_error and not stats.connected
    transport.up = True
    sink.pump()  # backoff: not yet
    assert transport.frames == []
    clock.now += 1.0
    sink.pump()
    fields = parsed(transport.frames)
    assert fields[0] == {"action": "lost", "kind": "lost", "count": "4", "source": "sink"}
    assert [f["pid"] for f in fields[1:]] == ["1", "2", "3"]  # the oldest kept, in order
    assert sink.stats().overflow_unreported == 0 and sink.stats().reconnects == 0
    assert sink.retry_in() is None


def test_backoff_doubles_up_to_the_limit() -> None:
    transport, clock = Script(), Clock()
    transport.up = False
    sink = make_sink(transport, clock)
    sink.submit(event_record(exec_deny()))
    waits = []
    for _ in range(5):
        wait = sink.retry_in()
        assert wait is not None
        waits.append(wait)
        clock.now += wait
        sink.pump()
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_connection_lost_mid_stream_resends_the_frame_whole() -> None:
    transport, clock = Script(stream=True), Clock()
    sink = make_sink(transport, clock)
    transport.room = 30
    sink.submit(event_record(exec_deny(pid=1)))  # 30 bytes of it go out
    assert sink.stats().queued == 1 and len(transport.got) == 30
    transport.up = False
    sink.pump()
    assert not sink.stats().connected
    transport.up, transport.room = True, None
    transport.got.clear()
    clock.now += 1.0
    sink.pump()
    frame = bytes(transport.got)
    length, _, body = frame.partition(b" ")
    assert int(length) == len(body)
    assert parse_rfc5424(body.decode()).fields["pid"] == "1"
    assert sink.stats().reconnects == 1 and sink.stats().delivered == 1


def test_peer_full_keeps_lines_without_reconnecting() -> None:
    transport, clock = Script(), Clock()
    sink = make_sink(transport, clock)
    transport.room = 0
    sink.submit(event_record(exec_deny(pid=1)))
    sink.submit(event_record(exec_deny(pid=2)))
    assert sink.stats().queued == 2 and sink.stats().connected
    assert sink.retry_in() == pytest.approx(0.05)
    transport.room = None
    sink.pump()
    assert [f["pid"] for f in parsed(transport.frames)] == ["1", "2"]


def test_oversized_datagram_is_counted_not_retried_forever() -> None:
    class TooBig(Script):
        def send(self, frame: bytes) -> int:
            if b'pid="2"' in frame:
                raise OSError(errno.EMSGSIZE, "Message too long")
            return super().send(frame)

    transport, clock = TooBig(), Clock()
    sink = make_sink(transport, clock)
    for pid in (1, 2, 3):
        sink.submit(event_record(exec_deny(pid=pid)))
    assert [f.get("pid", "lost") for f in parsed(transport.frames)] == ["1", "lost", "3"]


def test_queue_then_pump_sends_datagrams_one_line_each() -> None:
    transport, clock = Script(), Clock()
    sink = make_sink(transport, clock, queue_size=10)
    for pid in range(1, 5):
        sink.queue_event(exec_deny(pid=pid))
    assert transport.frames == [] and sink.queued == 4  # queued only
    sink.pump()
    assert [f["pid"] for f in parsed(transport.frames)] == ["1", "2", "3", "4"]
    assert sink.stats().delivered == 4


def test_queue_event_overflow_is_counted_and_reported_first() -> None:
    transport, clock = Script(), Clock()
    sink = make_sink(transport, clock, queue_size=2)
    for pid in range(1, 6):
        sink.queue_event(exec_deny(pid=pid))
    assert sink.stats().overflow == 3
    sink.pump()
    assert [f.get("pid", f["count"]) for f in parsed(transport.frames)] == ["3", "1", "2"]


class Counting(Script):
    """A stream transport that counts its writes."""

    def __init__(self) -> None:
        super().__init__(stream=True)
        self.writes = 0

    def send(self, frame: bytes) -> int:
        self.writes += 1
        return super().send(frame)


def test_stream_target_gets_many_lines_per_write() -> None:
    transport, clock = Counting(), Clock()
    sink = make_sink(transport, clock, queue_size=1000)
    for pid in range(500):
        sink.queue_event(exec_deny(pid=pid))
    sink.pump()
    frames = octet_frames(bytes(transport.got))
    assert [parse_rfc5424(f).fields["pid"] for f in frames] == [str(p) for p in range(500)]
    assert sink.stats().delivered == 500 and sink.stats().queued == 0
    # about 400 bytes a line: a few 64 KiB writes, not 500
    assert transport.writes <= len(transport.got) // Sink.BATCH_BYTES + 2


def test_stream_short_writes_count_whole_lines_only() -> None:
    transport, clock = Counting(), Clock()
    sink = make_sink(transport, clock, queue_size=100)
    for pid in range(3):
        sink.queue_event(exec_deny(pid=pid))
    one = len(octet_frame_of(sink, exec_deny(pid=0)))
    transport.room = one + 10  # the first line and a bit of the second
    sink.pump()
    assert sink.stats().delivered == 1 and sink.stats().queued == 2
    assert sink.wait_fd() is None  # the script has no descriptor
    transport.room = None
    sink.pump()
    frames = octet_frames(bytes(transport.got))
    assert [parse_rfc5424(f).fields["pid"] for f in frames] == ["0", "1", "2"]
    assert sink.stats().delivered == 3


def test_stream_broken_mid_batch_resends_only_unfinished_lines() -> None:
    transport, clock = Counting(), Clock()
    sink = make_sink(transport, clock, queue_size=100)
    for pid in range(3):
        sink.queue_event(exec_deny(pid=pid))
    one = len(octet_frame_of(sink, exec_deny(pid=0)))
    transport.room = one + 10
    sink.pump()
    transport.up = False  # the connection breaks inside the second line
    sink.pump()
    assert not sink.stats().connected and sink.stats().delivered == 1
    transport.up, transport.room = True, None
    transport.got.clear()
    clock.now += 1.0
    sink.pump()
    frames = octet_frames(bytes(transport.got))
    assert [parse_rfc5424(f).fields["pid"] for f in frames] == ["1", "2"]  # whole, once
    assert sink.stats().delivered == 3


def test_stream_overflow_is_reported_first_after_whole_batches() -> None:
    transport, clock = Counting(), Clock()
    sink = make_sink(transport, clock, queue_size=3)
    for pid in range(3):
        sink.queue_event(exec_deny(pid=pid))
    sink.pump()  # a whole batch out
    for pid in range(3, 8):
        sink.queue_event(exec_deny(pid=pid))  # 3 kept, 2 turned away
    sink.pump()
    frames = [parse_rfc5424(f).fields for f in octet_frames(bytes(transport.got))]
    assert [f.get("pid", "lost " + f["count"]) for f in frames] == [
        "0", "1", "2", "lost 2", "3", "4", "5"]
    assert sink.stats().overflow_unreported == 0


def test_congested_only_when_connected_full_and_backlogged() -> None:
    transport, clock = Script(), Clock()
    sink = make_sink(transport, clock, queue_size=100)
    transport.room = 0
    for pid in range(4):
        sink.queue_event(exec_deny(pid=pid))
    assert not sink.congested(high_water=4)  # nothing tried yet
    sink.pump()
    assert sink.congested(high_water=4) and not sink.congested(high_water=5)
    transport.room = None
    sink.pump()
    assert not sink.congested(high_water=1) and sink.queued == 0
    transport.up = False
    sink.queue_event(exec_deny())
    sink.pump()  # down, not full: a producer goes on (its overflow is counted)
    assert not sink.congested(high_water=1)


def octet_frame_of(sink: Sink, event: AuditEvent) -> bytes:
    data = sink.format_event(event).encode()
    return b"%d " % len(data) + data


def octet_frames(data: bytes) -> list[str]:
    frames: list[str] = []
    while data:
        length, _, rest = data.partition(b" ")
        frames.append(rest[: int(length)].decode())
        data = rest[int(length):]
    return frames


def test_close_flushes_what_it_can() -> None:
    transport, clock = Script(), Clock()
    sink = make_sink(transport, clock)
    transport.room = 0
    sink.submit(event_record(exec_deny()))
    transport.room = None
    sink.close(timeout=1.0)
    assert len(transport.frames) == 1


def test_queue_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        make_sink(Script(), Clock(), queue_size=0)


# --- real sockets the test owns -----------------------------------------------------


def test_unix_datagram(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        sink = Sink(parse_target(f"unix:{path}"), hostname="h", procid=1)
        sink.submit(event_record(exec_deny(pid=5)))
        server.settimeout(2)
        assert parse_rfc5424(server.recv(65536).decode()).fields["pid"] == "5"
        sink.close()


def test_unix_stream_fallback_uses_octet_counting(tmp_path: Path) -> None:
    path = tmp_path / "stream.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        sink = Sink(parse_target(f"unix:{path}"), hostname="h", procid=1)
        sink.submit(event_record(exec_deny(pid=6)))
        sink.submit(event_record(exec_deny(pid=7)))
        server.settimeout(2)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(2)
            frames = read_octet_counted(conn, 2)
        assert [parse_rfc5424(f).fields["pid"] for f in frames] == ["6", "7"]
        assert sink.transport.stream
        sink.close()


def read_octet_counted(conn: socket.socket, count: int) -> list[str]:
    buffer = b""
    frames: list[str] = []
    while len(frames) < count:
        chunk = conn.recv(65536)
        assert chunk, "connection closed early"
        buffer += chunk
        while b" " in buffer:
            length, _, rest = buffer.partition(b" ")
            if len(rest) < int(length):
                break
            frames.append(rest[: int(length)].decode())
            buffer = rest[int(length):]
    return frames


def test_full_datagram_peer_is_waited_for_on_the_socket(tmp_path: Path) -> None:
    """A datagram receiver that does not read fills up (net.unix.max_dgram_qlen
    datagrams); the sink keeps the lines, names the socket to wait on for
    POLLOUT, and delivers the rest, in order, as the receiver reads."""
    path = tmp_path / "log.sock"
    lines = 2000  # more than any unix datagram queue holds (10 by default, 512 with systemd)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        sink = Sink(parse_target(f"unix:{path}"), hostname="h", procid=1, queue_size=lines)
        for pid in range(lines):
            sink.queue_event(exec_deny(pid=pid))
        sink.pump()
        fd = sink.wait_fd()
        assert fd is not None and sink.congested(1)
        assert 0 < sink.stats().delivered < lines
        assert select.select([], [fd], [], 0)[1] == []  # no room: not writable
        server.settimeout(2)
        got: list[bytes] = []
        for _ in range(lines):  # each round: read what was sent, wait for room, send more
            got += [server.recv(65536) for _ in range(sink.stats().delivered - len(got))]
            if sink.queued == 0:
                break
            assert select.select([], [fd], [], 2)[1] == [fd]  # room again
            sink.pump()
        assert [parse_rfc5424(g.decode()).fields["pid"] for g in got] == [
            str(p) for p in range(lines)]
        assert sink.wait_fd() is None and not sink.congested(1)
        sink.close()


def test_udp_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        sink = Sink(parse_target(f"udp://127.0.0.1:{port}"), hostname="h", procid=1)
        sink.submit(event_record(exec_deny(pid=8)))
        server.settimeout(2)
        assert parse_rfc5424(server.recv(65536).decode()).fields["pid"] == "8"
        sink.close()


def test_tcp_loopback_and_receiver_restart() -> None:
    """A receiver that closes the connection is noticed before the next line is
    written into the dead connection, so lines sent meanwhile are queued."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(2)
    port = server.getsockname()[1]
    sink = Sink(parse_target(f"tcp://127.0.0.1:{port}"), hostname="h", procid=1,
                retry_initial=0.05)
    try:
        sink.submit(event_record(exec_deny(pid=1)))
        conn, _ = server.accept()
        conn.settimeout(2)
        deadline = threading.Event()
        while sink.stats().delivered < 1 and not deadline.wait(0.01):
            sink.pump()
        assert read_octet_counted(conn, 1)
        conn.close()  # the receiver goes away
        threading.Event().wait(0.1)  # let the FIN arrive
        sink.submit(event_record(exec_deny(pid=2)))
        sink.submit(event_record(exec_deny(pid=3)))
        assert sink.stats().delivered == 1  # nothing written into the dead connection
        server.setblocking(False)
        accepted: socket.socket | None = None
        for _ in range(200):
            sink.pump()
            if accepted is None:
                with contextlib.suppress(BlockingIOError):
                    accepted, _ = server.accept()  # the sink reconnected
            if accepted is not None and sink.stats().queued == 0:
                break
            threading.Event().wait(0.01)
        assert accepted is not None
        conn = accepted
        conn.settimeout(2)
        frames = read_octet_counted(conn, 2)
        assert [parse_rfc5424(f).fields["pid"] for f in frames] == ["2", "3"]
        conn.close()
    finally:
        sink.close(timeout=0)
        server.close()


def test_file_target_writes_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = Sink(parse_target(f"file:{path}"), hostname="h", procid=1)
    sink.submit(event_record(exec_deny(pid=1)))
    sink.submit(event_record(exec_deny(pid=2)))
    sink.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["pid"] for r in rows] == [1, 2]
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


# --- no name a process chooses can forge or disguise a line -----------------------------

# C0 (ESC, CR, LF, NUL), DEL, C1 (CSI, NEL), the line/paragraph separators, and
# bidirectional controls: each would break a line, drive a terminal, or reorder
# what a reader sees.
UNSAFE = ["\x1b", "\r", "\n", "\x00", "\x7f", "\x9b", "\x85", "\u2028", "\u2029", "\u202e",
          "\u202a", "\u2066", "\u2069", "\u200f", "\u061c"]


@pytest.mark.parametrize("char", UNSAFE)
def test_unsafe_characters_never_reach_a_line_raw(char: str) -> None:
    bad = f"x{char}y"
    event = exec_deny(comm=bad, exe=f"/usr/bin/{bad}", cgroup=f"/user.slice/{bad}",
                      path=f"/tmp/{bad}", policy=bad, rule=bad, location=bad, hook=bad)
    lines = [format_rfc5424(event_record(event), "h", 1), format_json(event_record(event), "h", 1),
             EventFormatter("h", 1).line(event)]
    for line in lines:
        assert char not in line, (char, line)
        assert (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}") in line
    assert char not in "".join(str(v) for v in json.loads(lines[1]).values())


@pytest.mark.parametrize("char", UNSAFE)
def test_printable_names_every_unsafe_character(char: str) -> None:
    from guard.events.records import printable, printable_text

    text = printable(f"a{char}b".encode())
    assert char not in text and text == printable_text(f"a{char}b")
    assert printable_text("/plain/path") == "/plain/path"
