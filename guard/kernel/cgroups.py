"""cgroup v2 paths and ids on the machine at hand.

A cgroup path is relative to the cgroup2 mount ("/" is the root). Its kernel id,
the value ``bpf_get_current_cgroup_id()`` and ``bpf_get_current_ancestor_cgroup_id()``
return, is the kernfs node id, which is also the inode number of the cgroup's
directory (``st_ino``) on 64-bit machines. The host tests check this equality
against the id the kernel reports in events.

The cgroup2 mount is found in /proc/self/mountinfo and never assumed: a hybrid
host mounts it at /sys/fs/cgroup/unified, a pure v2 host at /sys/fs/cgroup.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from guard.policy.units import normalize_cgroup

MOUNTINFO = Path("/proc/self/mountinfo")


class CgroupError(RuntimeError):
    """No cgroup2 file system, or a cgroup that should exist does not."""


def parse_mountinfo(text: str) -> Path | None:
    """The mount point of the first cgroup2 file system in a mountinfo text."""
    for line in text.splitlines():
        # "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        if len(fields) >= 5 and right.split()[:1] == ["cgroup2"]:
            return Path(_unescape(fields[4]))
    return None


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal ``\\NNN``."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 4 <= len(text) and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


_mount_cache: Path | None = None


def cgroup2_mount() -> Path:
    """The cgroup2 mount point of this machine (cached: mounts do not move under us)."""
    global _mount_cache
    if _mount_cache is None:
        found = parse_mountinfo(MOUNTINFO.read_text())
        if found is None:
            raise CgroupError("no cgroup2 file system is mounted (see /proc/self/mountinfo)")
        _mount_cache = found
    return _mount_cache


def cgroup_dir(path: str, mount: Path | None = None) -> Path:
    """The directory of a cgroup path."""
    root = mount if mount is not None else cgroup2_mount()
    relative = normalize_cgroup(path).lstrip("/")
    return root / relative if relative else root


def cgroup_id(path: str, mount: Path | None = None) -> int | None:
    """The kernel id of a cgroup, or None when it does not exist."""
    try:
        return os.stat(cgroup_dir(path, mount)).st_ino
    except FileNotFoundError:
        return None


def mutex_barrier(mount: Path | None = None) -> None:
    """Return only once every cgroup mkdir that had started is done and its directory
    visible: take and release the kernel's cgroup_mutex.

    cgroup_mkdir() (kernel/cgroup/cgroup.c) holds the one global cgroup_mutex from
    before the cgroup_mkdir tracepoint to after kernfs_activate(). BPF_PROG_QUERY on
    a cgroup (kernel/bpf/cgroup.c: cgroup_bpf_query, query_flags 0) takes that mutex
    and needs only a read-only descriptor of the cgroup2 root, so it works where the
    cgroup file system is read-only (the unit's ProtectControlGroups=yes). Where the
    raw syscall number is unknown, a mkdir and rmdir of a cgroup of guard's own
    below the root (both take the mutex) do the same. apply relies on it
    (guard.apply, Applier._follow_scope_paths)."""
    root = mount if mount is not None else cgroup2_mount()
    if _query_barrier(root):
        return
    global _barrier_count
    _barrier_count += 1
    directory = root / f"guard-barrier-{os.getpid()}-{_barrier_count}"
    os.mkdir(directory)
    os.rmdir(directory)


_barrier_count = 0
_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
_BPF_PROG_QUERY = 16
_ATTACH_INET_EGRESS = 1


def _query_barrier(root: Path) -> bool:
    """BPF_PROG_QUERY on ``root`` (see mutex_barrier); False when it could not be made."""
    import ctypes
    import platform

    number = _BPF_SYSCALL.get(platform.machine())
    if number is None:
        return False
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # union bpf_attr, query part: target_fd, attach_type, query_flags (0: not the
        # effective set, which newer kernels may answer without the mutex), ...
        attr = (ctypes.c_uint8 * 128)()
        ctypes.c_uint32.from_buffer(attr, 0).value = fd
        ctypes.c_uint32.from_buffer(attr, 4).value = _ATTACH_INET_EGRESS
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        res = libc.syscall(ctypes.c_long(number), ctypes.c_long(_BPF_PROG_QUERY),
                           ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
        return bool(res == 0)
    finally:
        os.close(fd)


def cgroup_depth(path: str) -> int:
    """The ancestor level of a cgroup: 0 for the root, 1 for /a, 2 for /a/b."""
    return len([p for p in normalize_cgroup(path).split("/") if p])


def cgroup_of_pid(pid: int) -> str | None:
    """The cgroup v2 path of a process (the ``0::`` line of /proc/PID/cgroup)."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return normalize_cgroup(line[3:])
    return None


@dataclass
class CgroupIndex:
    """id -> path for events, from a walk of the cgroup2 tree.

    The walk is cached; a miss walks again (a cgroup made since the last walk),
    but at most once per ``min_refresh_s`` so a stream of events from a cgroup
    that is already gone cannot turn into a stream of walks.
    """

    mount: Path | None = None
    min_refresh_s: float = 1.0
    _paths: dict[int, str] = field(default_factory=dict)
    _last_walk: float = -1e9

    def path(self, cgroup_id_: int, now: float | None = None) -> str | None:
        found = self._paths.get(cgroup_id_)
        if found is not None:
            return found
        clock = now if now is not None else _monotonic()
        if clock - self._last_walk < self.min_refresh_s:
            return None
        self.refresh(clock)
        return self._paths.get(cgroup_id_)

    def refresh(self, now: float | None = None) -> None:
        root = self.mount if self.mount is not None else cgroup2_mount()
        self._paths = walk_cgroups(root)
        self._last_walk = now if now is not None else _monotonic()


def walk_cgroups(root: Path) -> dict[int, str]:
    """Every cgroup under ``root``: id -> path relative to it."""
    found: dict[int, str] = {}
    for directory, subdirs, _files in os.walk(root):
        try:
            ino = os.stat(directory).st_ino
        except FileNotFoundError:  # removed while we walked
            continue
        relative = os.path.relpath(directory, root)
        found[ino] = "/" if relative == "." else "/" + relative
        subdirs.sort()
    return found


def _monotonic() -> float:
    import time

    return time.monotonic()


def systemd_running() -> bool:
    """systemd's own test: it created /run/systemd/system at boot."""
    return Path("/run/systemd/system").is_dir()


def systemd_unit_cgroup(unit: str) -> str | None:
    """systemd's answer for where ``unit`` runs, or will run, or None (no systemd, unit
    not loaded).

    A running unit's ControlGroup; a loaded unit that is not running (yet) has none,
    and its cgroup will be its Slice's path and its own escaped name, which is where
    guard follows it (a scope is a path: docs/semantics.md). When this is None the
    compiler's convention (guard.policy.units) decides instead.
    """
    if not systemd_running() or shutil.which("systemctl") is None:
        return None
    try:
        done = subprocess.run(
            ["systemctl", "show", "-p", "ControlGroup", "-p", "Slice", "--", unit],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return unit_cgroup_from_show(unit, done.stdout)


def unit_cgroup_from_show(unit: str, text: str) -> str | None:
    """The cgroup of ``unit`` from ``systemctl show -p ControlGroup -p Slice`` output:
    the ControlGroup when set, else the Slice's path and the unit's escaped name, else
    None. Pure."""
    from guard.policy.units import cg_escape, check_unit_name, slice_path

    values = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
    group = values.get("ControlGroup", "").strip()
    if group:
        return normalize_cgroup(group)
    parent = values.get("Slice", "").strip()
    if not parent or check_unit_name(parent) is not None or not parent.endswith(".slice"):
        return None
    base = slice_path(parent)
    return normalize_cgroup(f"{base.rstrip('/')}/{cg_escape(unit)}")


def systemd_unit_cgroups(units: list[str] | tuple[str, ...]) -> dict[str, str]:
    """The units systemd knows, mapped to their cgroups (the compiler's ``unit_cgroups``)."""
    found: dict[str, str] = {}
    for unit in units:
        path = systemd_unit_cgroup(unit)
        if path is not None:
            found[unit] = path
    return found
