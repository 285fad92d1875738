"""Landlock through its three system calls (ctypes), for the peer measurements.

A ruleset is built once in the bench process (``Ruleset``), and a child process
restricts itself with it between fork and exec (``Ruleset.restrictor``), so the
measured program runs under it from its first instruction. x86_64 syscall
numbers; the ABI version tells what the kernel supports (net rules: ABI >= 4).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterable

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2
PR_SET_NO_NEW_PRIVS = 38

ACCESS_FS_EXECUTE = 1 << 0
ACCESS_FS_READ_FILE = 1 << 2
ACCESS_NET_CONNECT_TCP = 1 << 1
MAX_PORT = 65535

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


class LandlockError(OSError):
    pass


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise LandlockError(err, f"{what}: {os.strerror(err)}")
    return result


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    res = _libc.syscall(ctypes.c_long(SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
                        ctypes.c_uint32(CREATE_RULESET_VERSION))
    return int(res) if res > 0 else 0


class Ruleset:
    """An open Landlock ruleset fd and the number of rules added to it."""

    def __init__(self, fs: int = 0, net: int = 0) -> None:
        attr = RulesetAttr(handled_access_fs=fs, handled_access_net=net)
        size = ctypes.sizeof(attr) if net else ctypes.sizeof(ctypes.c_uint64)
        self.fd = _check(_libc.syscall(ctypes.c_long(SYS_CREATE_RULESET), ctypes.byref(attr),
                                       ctypes.c_size_t(size), ctypes.c_uint32(0)),
                         "landlock_create_ruleset")
        self.rules = 0

    def allow_path(self, path: str, access: int) -> None:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            attr = PathBeneathAttr(allowed_access=access, parent_fd=fd)
            _check(_libc.syscall(ctypes.c_long(SYS_ADD_RULE), ctypes.c_int(self.fd),
                                 ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(attr),
                                 ctypes.c_uint32(0)), f"landlock_add_rule({path})")
        finally:
            os.close(fd)
        self.rules += 1

    def allow_paths(self, paths: Iterable[str], access: int) -> None:
        for path in paths:
            self.allow_path(path, access)

    def allow_port(self, port: int, access: int = ACCESS_NET_CONNECT_TCP) -> None:
        attr = NetPortAttr(allowed_access=access, port=port)
        _check(_libc.syscall(ctypes.c_long(SYS_ADD_RULE), ctypes.c_int(self.fd),
                             ctypes.c_int(RULE_NET_PORT), ctypes.byref(attr),
                             ctypes.c_uint32(0)), f"landlock_add_rule(port {port})")
        self.rules += 1

    def restrictor(self) -> Callable[[], None]:
        """For a child, between fork and exec: no_new_privs, then restrict itself."""
        fd = self.fd

        def restrict() -> None:
            if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
            _check(_libc.syscall(ctypes.c_long(SYS_RESTRICT_SELF), ctypes.c_int(fd),
                                 ctypes.c_uint32(0)), "landlock_restrict_self")

        return restrict

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
