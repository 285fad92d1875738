"""sd_notify without a library: tell the service manager how the daemon is doing.

The protocol is one datagram of ``KEY=VALUE`` lines to the unix socket named by
$NOTIFY_SOCKET; a name starting with ``@`` is in the abstract namespace (the
``@`` stands for a leading NUL byte). Without $NOTIFY_SOCKET (not started by a
service manager) every call is a no-op that returns False.

guard sends ``READY=1`` only once the policy is applied and enforced, so a
``Type=notify`` unit and anything ordered after it start under enforcement.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


def _address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=enforcing"``); True when sent."""
    env = os.environ if environ is None else environ
    name = env.get("NOTIFY_SOCKET", "")
    if not name or not (name.startswith(("/", "@"))):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), _address(name))
        except OSError:
            # the manager went away or the socket is not ours to write: the
            # daemon's work does not depend on being heard
            return False
    return True


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
