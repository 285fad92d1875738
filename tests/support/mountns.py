"""Code run where guard runs under ``PrivateTmp=yes``: a mount namespace of its own
with a fresh tmpfs on /tmp.

:func:`in_private_tmp` forks a child that unshares its mount namespace, makes
every mount private (nothing it mounts reaches the host), mounts a tmpfs on
/tmp, runs ``prepare`` and then ``work`` there, and sends ``work``'s result
back pickled. The host, the caller and every other process keep their /tmp.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
# The checkout: when it lives under /tmp (a CI clone may), it stays reachable in the
# private /tmp, or a child could not even start this checkout's interpreter.
CHECKOUT = Path(__file__).resolve().parents[2]


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode() if source else None, target.encode(),
                  fstype.encode() if fstype else None, ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def private_tmp(keep_checkout: bool = False) -> None:
    """In this process: a mount namespace of its own, a new tmpfs on /tmp; with
    ``keep_checkout``, this checkout stays at its path if it is under /tmp (for a
    child that starts this checkout's interpreter there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNS): {os.strerror(err)}")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    keep = os.open(CHECKOUT, os.O_PATH | os.O_DIRECTORY) \
        if keep_checkout and CHECKOUT.is_relative_to("/tmp") else None
    _mount("tmpfs", "/tmp", "tmpfs", 0)
    os.chmod("/tmp", 0o1777)
    if keep is not None:  # the old /tmp's checkout, bound back at its own path
        os.makedirs(CHECKOUT, exist_ok=True)
        _mount(f"/proc/self/fd/{keep}", str(CHECKOUT), None, MS_BIND | MS_REC)
        os.close(keep)


def in_private_tmp(work: Callable[[], T], prepare: Callable[[], None] = lambda: None) -> T:
    """``work()``, called in a child with a private /tmp (after ``prepare()`` there)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code (pytest's, here)
        code = 0
        try:
            os.close(read_fd)
            try:
                private_tmp()
                prepare()
                payload = pickle.dumps((True, work()))
            except BaseException:
                payload = pickle.dumps((False, traceback.format_exc()))
            with os.fdopen(write_fd, "wb") as out:
                out.write(payload)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as incoming:
        data = incoming.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise AssertionError(f"the private-/tmp child died (wait status {status})")
    ok, value = pickle.loads(data)
    if not ok:
        raise AssertionError(f"in the private-/tmp child:\n{value}")
    return value  # type: ignore[no-any-return]
