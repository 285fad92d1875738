"""sd_notify without a library: tell the service manager how the daemon is doing.

The protocol is one datagram of ``KEY=VALUE`` lines to the unix socket named by
$NOTIFY_SOCKET; a name starting with ``@`` is in the abstract namespace (the
``@`` stands for a leading NUL byte). Without $NOTIFY_SOCKET (not started by a
service manager) every call is a no-op that returns False.

guard sends ``READY=1`` only once the policy is applied and enforced, so a
``Type=notify`` unit and anything ordered after it start under enforcement.

A send never blocks the daemon's one main loop for long. A blocking sendto()
on a unix datagram socket waits for as long as the manager's receive queue
stays full (net.unix.max_dgram_qlen datagrams, 10 by default), so every send
here is MSG_DONTWAIT, and a full queue is handled by what the message means:

* ``READY=1`` and ``RELOADING=1`` change the unit's state: the manager waits
  for them (a start or a reload that never hears READY=1 times out and the
  unit is failed). They get a bounded wait, ``STATE_WAIT`` seconds, for room
  in the queue: a manager that is merely busy drains it well within that,
  one that is stuck is not worth stalling event delivery for any longer.
* Everything else (``STATUS=``, ``STOPPING=1``, which the manager learns from
  the exit anyway) is dropped at once.

Drops are counted (``dropped()``) and the first one is logged.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Mapping

STATE_WAIT = 1.0  # seconds a state change may wait for room in the manager's queue
_STATE_KEYS = ("READY=1", "RELOADING=1")

log = logging.getLogger("guard.service.notify")
_dropped = 0


def dropped() -> int:
    """Messages dropped so far because the manager's queue stayed full."""
    return _dropped


def _address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def _send(sock: socket.socket, data: bytes, wait: float) -> bool:
    """One datagram on a connected socket; waits at most ``wait`` s for queue room."""
    deadline = time.monotonic() + wait
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while True:
        try:
            sock.send(data, socket.MSG_DONTWAIT)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # a connected datagram socket polls writable once the peer's queue
            # has room again, so this sleeps exactly as long as needed
            poller.poll(max(1, int(left * 1000)))


def notify(state: str, environ: Mapping[str, str] | None = None,
           wait: float | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=enforcing"``); True when sent.

    ``wait``: how long a full queue may delay the send; by default ``STATE_WAIT``
    for a message that changes the unit's state, nothing for the rest.
    """
    global _dropped
    env = os.environ if environ is None else environ
    name = env.get("NOTIFY_SOCKET", "")
    if len(name) < 2 or not name.startswith(("/", "@")):
        return False
    if wait is None:
        wait = STATE_WAIT if any(line in _STATE_KEYS for line in state.split("\n")) else 0.0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(_address(name))
            sent = _send(sock, state.encode(), wait)
        except OSError:
            # the manager went away or the socket is not ours to write: the
            # daemon's work does not depend on being heard
            return False
    if not sent:
        _dropped += 1
        if _dropped == 1:
            log.warning("the service manager's notify queue is full: dropped %r (later drops "
                        "are counted, not logged)", state.split("\n", 1)[0])
    return sent


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def reloading() -> bool:
    # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 for Type=notify-reload
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")
