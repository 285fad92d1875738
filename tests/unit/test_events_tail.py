"""guard events' hub: filters, a slow client that never blocks publish, drops counted and told."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from guard.events.records import AuditEvent
from guard.service import tail
from guard.service.control import Caller, ControlServer
from guard.service.tail import EventHub, filters_of, readable, stream_events

CALLER = Caller(1, 0, 0, 0, "/", "t", "/t", "pid")


def event(n: int, policy: str = "p", action: str = "deny", kind: str = "connect") -> AuditEvent:
    return AuditEvent(time_ns=1_700_000_000_000_000_000 + n, action=action, kind=kind,
                      policy=policy, rule=f"{policy}/egress.rules[0]", pid=100 + n, ppid=7,
                      comm="nc", exe="/usr/bin/nc", cgroup="/t", addr="127.0.0.1",
                      port=9000 + n, proto="tcp")


def read_lines(sock: socket.socket, count: int, timeout: float = 5.0) -> list[dict[str, object]]:
    sock.settimeout(timeout)
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()[:count]]


def read_all(sock: socket.socket, quiet: float = 0.5) -> list[dict[str, object]]:
    """Every line until nothing comes for ``quiet`` seconds."""
    sock.settimeout(quiet)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_filters() -> None:
    assert filters_of({"command": "events", "policy": "web", "kind": None}) == {"policy": "web"}
    with pytest.raises(ValueError):
        filters_of({"action": 3})


def test_events_reach_a_client_filtered_as_the_file_target_writes_them() -> None:
    hub = EventHub("host", 42)
    ours, theirs = socket.socketpair()
    hub.serve(theirs, {"policy": "p", "kind": "connect"}, CALLER)
    assert read_lines(ours, 1)[0]["ok"] is True
    hub.publish(event(1, policy="other"))
    hub.publish(event(2))
    hub.publish(event(3, kind="exec"))
    [record] = read_lines(ours, 1)
    assert record["policy"] == "p" and record["port"] == 9002 and record["ppid"] == 7
    assert record["exe"] == "/usr/bin/nc" and record["facility"] == "authpriv"
    assert "deny connect to 127.0.0.1:9002/tcp" in str(record["message"])
    text = readable(record)
    assert "deny connect to 127.0.0.1:9002/tcp" in text and "exe=/usr/bin/nc" in text
    hub.close()
    ours.close()


def test_a_client_that_stops_reading_never_blocks_publish(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(tail, "CLIENT_QUEUE", 10)
    hub = EventHub("host", 42)
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hub.serve(theirs, {}, CALLER)
    assert read_lines(ours, 1)[0]["ok"] is True
    start = time.monotonic()
    for n in range(5000):  # far more than the socket and the queue hold
        hub.publish(event(n))
    assert time.monotonic() - start < 2.0  # never waited for the client
    assert hub.stats()["dropped"] > 0
    dropped = hub.stats()["dropped"]
    # the client reads again: it is told what it missed, then gets the rest
    seen = read_all(ours)
    assert 0 < len(seen) < 5000
    hub.publish(event(9999))
    seen += read_all(ours)
    assert seen[-1]["port"] == 9000 + 9999
    lost = [r for r in seen if r["kind"] == "lost"]
    assert lost and all(r["source"] == "events-client" for r in lost)
    # every drop was told, before the lines that came after it
    assert sum(int(str(r["count"])) for r in lost) == dropped
    hub.close()
    ours.close()


def test_a_client_that_hangs_up_is_forgotten() -> None:
    hub = EventHub("host", 42)
    ours, theirs = socket.socketpair()
    hub.serve(theirs, {}, CALLER)
    read_lines(ours, 1)
    assert hub.stats()["clients"] == 1
    ours.close()
    deadline = time.monotonic() + 5
    while hub.stats()["clients"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hub.stats()["clients"] == 0
    hub.publish(event(1))  # nobody left: nothing to do, nothing raised


def test_through_the_control_socket(tmp_path: Path) -> None:
    hub = EventHub("host", 42)
    server = ControlServer(tmp_path, {"status": lambda _b, _c: {"ok": True}},
                           authorize=lambda _c: "refused for the test",
                           on_refused=lambda *_a: None, streams={"events": hub.serve})
    server.claim()
    try:
        got: list[dict[str, object]] = []
        stream = stream_events(str(server.path), {"action": "deny"})

        def publish_soon() -> None:
            time.sleep(0.3)
            hub.publish(event(1, action="audit"))
            hub.publish(event(2))

        import threading

        threading.Thread(target=publish_soon, daemon=True).start()
        got.append(next(stream))
        assert got[0]["action"] == "deny" and got[0]["port"] == 9002
        stream.close()
    finally:
        hub.close()
        server.close()
