"""Tamper resistance: telling bpf/tamper.bpf.c who guard is.

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
and then freezes the map: no bpf() caller can rewrite it afterwards. Tamper
events are put into words by guard.events.enrich (``tamper_object``).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Protocol

from guard import layout

TAMPER_MAP = "guard_tamper"

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
