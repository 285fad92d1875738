"""sd_notify against a manager that stops reading: a send never hangs the daemon.

A real AF_UNIX datagram socket is bound and never read, and its queue is filled
(net.unix.max_dgram_qlen datagrams) until the kernel refuses one more. Each
call under test runs in a thread that the test waits for with a timeout, so a
send that blocks fails the test instead of hanging it; closing the socket at
the end wakes such a thread.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guard.service import notify

GUARD_S = 10.0  # a call still running after this long counts as hung
FILL_LIMIT = 100_000  # datagrams at most to fill one queue


@dataclass(frozen=True)
class Manager:
    name: str  # the NOTIFY_SOCKET value
    sock: socket.socket


def bound(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = b"\0" + name[1:].encode() if name.startswith("@") else name
    sock.bind(address)
    return sock


def fill(name: str) -> int:
    """Datagrams queued until the kernel refuses one more; each from a fresh socket,
    so the sender's own buffer is never what is full."""
    address = b"\0" + name[1:].encode() if name.startswith("@") else name
    for count in range(FILL_LIMIT):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            try:
                sender.sendto(b"STATUS=filler", socket.MSG_DONTWAIT, address)
            except BlockingIOError:
                return count
    raise AssertionError(f"the queue took {FILL_LIMIT} datagrams without filling")


@pytest.fixture(params=["abstract", "path"])
def full(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Manager]:
    """A manager that stopped reading, with its queue full."""
    if request.param == "abstract":
        name = f"@guard-unit-notify-{secrets.token_hex(6)}"
    else:
        name = str(tmp_path / "notify.sock")
    sock = bound(name)
    try:
        assert fill(name) > 0
        yield Manager(name, sock)
    finally:
        sock.close()  # wakes a send that would still be blocked


def timed(call: Callable[[], bool]) -> tuple[bool, float]:
    """(result, seconds) of ``call`` in a thread; AssertionError if it is still running
    after GUARD_S seconds."""
    result: list[bool] = []
    start = time.monotonic()
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(GUARD_S)
    assert not thread.is_alive(), f"the send was still blocked after {GUARD_S} s"
    return result[0], time.monotonic() - start


def queued(sock: socket.socket) -> list[bytes]:
    out = []
    with pytest.raises(BlockingIOError):
        while True:
            out.append(sock.recv(4096, socket.MSG_DONTWAIT))
    return out


def test_status_to_a_full_queue_is_dropped_at_once(full: Manager) -> None:
    before = notify.dropped()
    sent, took = timed(lambda: notify.notify("STATUS=busy", {"NOTIFY_SOCKET": full.name}))
    assert sent is False and took < 0.5
    assert notify.dropped() == before + 1
    assert b"STATUS=busy" not in queued(full.sock)


def test_stopping_to_a_full_queue_is_dropped_at_once(full: Manager,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", full.name)
    sent, took = timed(notify.stopping)
    assert sent is False and took < 0.5


def test_ready_to_a_queue_that_stays_full_gives_up_after_its_bound(
        full: Manager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", full.name)
    before = notify.dropped()
    sent, took = timed(lambda: notify.ready("enforcing"))
    assert sent is False
    assert notify.STATE_WAIT * 0.9 <= took < notify.STATE_WAIT + 1.0
    assert notify.dropped() == before + 1
    sent, took = timed(notify.reloading)
    assert sent is False and took < notify.STATE_WAIT + 1.0


def test_ready_waits_for_a_manager_that_reads_again(full: Manager,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The manager takes one datagram 0.2 s later: READY=1 goes into that room."""
    monkeypatch.setenv("NOTIFY_SOCKET", full.name)
    reader = threading.Timer(0.2, lambda: full.sock.recv(4096))
    reader.start()
    try:
        sent, took = timed(lambda: notify.ready("enforcing"))
    finally:
        reader.join(GUARD_S)
    assert sent is True
    assert 0.15 <= took < notify.STATE_WAIT, took
    assert queued(full.sock)[-1] == b"READY=1\nSTATUS=enforcing"


def test_an_explicit_wait_bounds_any_message(full: Manager) -> None:
    sent, took = timed(lambda: notify.notify("READY=1", {"NOTIFY_SOCKET": full.name}, wait=0.1))
    assert sent is False and 0.09 <= took < 0.6


def test_a_manager_that_went_away_is_a_quiet_no() -> None:
    name = f"@guard-unit-notify-{secrets.token_hex(6)}"  # nothing bound there
    sent, took = timed(lambda: notify.notify("READY=1", {"NOTIFY_SOCKET": name}))
    assert sent is False and took < 0.5


def test_the_bare_abstract_prefix_is_not_a_socket() -> None:
    assert notify.notify("READY=1", {"NOTIFY_SOCKET": "@"}) is False
