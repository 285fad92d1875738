"""Tamper resistance: who guard is (for bpf/tamper.bpf.c), and tamper events as text.

The kernel side (bpf/tamper.bpf.c) refuses, to every *protected* process,
the ways of switching guard off that go through the kernel:

* the ``bpf()`` syscall (detaching or replacing programs, rewriting maps,
  opening pins: all of it needs bpf());
* any signal to the daemon, and ptrace of it (which also covers
  /proc/PID/mem, process_vm_writev and pidfd_getfd of its link fds);
* unlinking, renaming or removing directories in bpffs (the pins), and
  unmounting a bpffs.

A process is protected when the deepest scoped cgroup containing it is a
policy's own scope, not the host cgroup: whole-host policies cover PID 1 and
the administrators' shells, and refusing them bpf() would break the service
manager (it loads BPF programs for units) and lock the operators out of their
own machine. The daemon itself is never protected from itself.

The daemon writes ``guard_tamper[0]`` (its tgid, the host cgroup id) once,
before the first policy is applied (so it is exempt before any scope exists),
and then freezes the map: no bpf() caller can rewrite it afterwards.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Any, Protocol

from guard import layout

TAMPER_MAP = "guard_tamper"

# enum bpf_cmd (include/uapi/linux/bpf.h), for the events
BPF_COMMANDS = (
    "BPF_MAP_CREATE", "BPF_MAP_LOOKUP_ELEM", "BPF_MAP_UPDATE_ELEM", "BPF_MAP_DELETE_ELEM",
    "BPF_MAP_GET_NEXT_KEY", "BPF_PROG_LOAD", "BPF_OBJ_PIN", "BPF_OBJ_GET",
    "BPF_PROG_ATTACH", "BPF_PROG_DETACH", "BPF_PROG_TEST_RUN", "BPF_PROG_GET_NEXT_ID",
    "BPF_MAP_GET_NEXT_ID", "BPF_PROG_GET_FD_BY_ID", "BPF_MAP_GET_FD_BY_ID",
    "BPF_OBJ_GET_INFO_BY_FD", "BPF_PROG_QUERY", "BPF_RAW_TRACEPOINT_OPEN", "BPF_BTF_LOAD",
    "BPF_BTF_GET_FD_BY_ID", "BPF_TASK_FD_QUERY", "BPF_MAP_LOOKUP_AND_DELETE_ELEM",
    "BPF_MAP_FREEZE", "BPF_BTF_GET_NEXT_ID", "BPF_MAP_LOOKUP_BATCH",
    "BPF_MAP_LOOKUP_AND_DELETE_BATCH", "BPF_MAP_UPDATE_BATCH", "BPF_MAP_DELETE_BATCH",
    "BPF_LINK_CREATE", "BPF_LINK_UPDATE", "BPF_LINK_GET_FD_BY_ID", "BPF_LINK_GET_NEXT_ID",
    "BPF_ENABLE_STATS", "BPF_ITER_CREATE", "BPF_LINK_DETACH", "BPF_PROG_BIND_MAP",
    "BPF_TOKEN_CREATE",
)


def bpf_command(number: int) -> str:
    return BPF_COMMANDS[number] if 0 <= number < len(BPF_COMMANDS) else f"BPF_CMD_{number}"


def signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def tamper_object(hook: int, detail: int, addr: bytes, path: str) -> str:
    """What a tamper event was about, as one phrase (the event's ``path``).

    ``detail`` is the record's ``port`` (bpf command, signal, ptrace mode),
    ``addr`` starts with the target tgid, ``path`` is the pin's name or the
    target's comm (already printable), as bpf/guard.h documents.
    """
    target = struct.unpack_from("<I", addr.ljust(4, b"\0"))[0]
    if hook == layout.HOOK_BPF:
        return f"bpf({bpf_command(detail)})"
    if hook == layout.HOOK_TASK_KILL:
        return f"{signal_name(detail)} to the guard daemon, pid {target} ({path})"
    if hook == layout.HOOK_PTRACE:
        return f"ptrace of the guard daemon, pid {target} ({path}), mode {detail:#x}"
    if hook == layout.HOOK_BPFFS_UMOUNT:
        return "umount of a bpffs"
    if hook in (layout.HOOK_BPFFS_UNLINK, layout.HOOK_BPFFS_RENAME, layout.HOOK_BPFFS_RMDIR):
        return f"bpffs {path}"
    return path


class Maps(Protocol):
    def map(self, name: str) -> Any: ...


def configure(maps: Maps, daemon_tgid: int, host_cgroup_id: int) -> None:
    """Write guard_tamper[0] and freeze the map. OSError when the kernel refuses."""
    from bcc.libbcc import lib

    table = maps.map(TAMPER_MAP)
    value = layout.TamperConfig(daemon_tgid=daemon_tgid, host_cgroup_id=host_cgroup_id)
    key = ctypes.c_uint32(0)
    res = lib.bpf_update_elem(table.map_fd, ctypes.byref(key), ctypes.byref(value), 0)
    if res != 0:
        raise OSError(-res if res < 0 else ctypes.get_errno(), "guard_tamper: update failed")
    freeze = lib.bpf_map_freeze
    freeze.restype, freeze.argtypes = ctypes.c_int, [ctypes.c_int]
    res = freeze(table.map_fd)
    if res != 0:
        err = -res if res < 0 else ctypes.get_errno()
        raise OSError(err, f"guard_tamper: BPF_MAP_FREEZE: {os.strerror(err)}")


def read_config(maps: Maps) -> layout.TamperConfig:
    table = maps.map(TAMPER_MAP)
    return layout.TamperConfig.from_buffer_copy(bytes(table[table.Key(0)]))
