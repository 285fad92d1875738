"""Enrichment: a decoded record becomes an ``AuditEvent`` a person can read.

``Enricher.enrich`` adds wall-clock time, the rule that decided (policy, label,
file:line), the cgroup path, and what the kernel could not fill (ppid and
executable, from /proc, best effort: the process may be gone by the time it is
read). What an event takes from its process, rule and cgroup is cached per
actor, so a flood is enriched once, not once per event.
"""

from __future__ import annotations

import ipaddress
import operator
import os
import signal
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from guard import layout
from guard.events.records import (
    ACTION_BY_VALUE,
    PROTO_NAMES,
    AuditEvent,
    RawEvent,
    printable,
    printable_text,
)
from guard.policy.plan import RuleRef

# --- enrichment ---------------------------------------------------------------

RuleLookup = Callable[[int, int], RuleRef | None]  # (ruleset, rule_id) -> rule
CgroupLookup = Callable[[int], str | None]  # cgroup id -> path


def boot_to_wall_offset_ns() -> int:
    """Add this to a CLOCK_BOOTTIME time to get CLOCK_REALTIME.

    Sampled again every WALL_OFFSET_TTL_S (by the Enricher) rather than once:
    the wall clock may be stepped (NTP) while the daemon runs, and the event
    should carry the time a person would have read on the wall when it happened.
    """
    return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(
        time.CLOCK_BOOTTIME
    )


@dataclass(frozen=True)
class ProcInfo:
    ppid: int
    exe: str


def read_proc(pid: int, proc: Path = Path("/proc")) -> ProcInfo | None:
    """ppid and executable of a live process; None when it is gone."""
    try:
        stat = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        ppid = int(fields[1])
    except (IndexError, ValueError):
        return None
    try:
        exe = printable(os.readlink(proc / str(pid) / "exe").encode("utf-8", "surrogateescape"))
    except OSError:
        exe = ""  # kernel threads, or permission
    return ProcInfo(ppid=ppid, exe=exe)


class _TtlCache:
    """A small bounded cache: the same pid floods the stream during an attack,
    and /proc reads for each of its events would cost more than the event."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float]) -> None:
        self.size, self.ttl, self.clock = size, ttl_s, clock
        self._items: OrderedDict[int, tuple[float, ProcInfo | None]] = OrderedDict()

    def get(self, key: int, load: Callable[[int], ProcInfo | None]) -> ProcInfo | None:
        now = self.clock()
        hit = self._items.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        value = load(key)
        self._items[key] = (now, value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


def _address_text(family: int, addr: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, addr[:4])  # what IPv4Address prints, 8x faster
    if family == socket.AF_INET6:
        six = ipaddress.IPv6Address(addr[:16])
        return str(six.ipv4_mapped or six)
    return ""


def _access_text(bits: int) -> str:
    names = [n for b, n in ((layout.ACCESS_READ, "read"), (layout.ACCESS_WRITE, "write"))
             if bits & b]
    return ",".join(names)


# --- tamper events (bpf/tamper.bpf.c) in words ------------------------------------

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


def _tamper_object(raw: RawEvent) -> str:
    return tamper_object(raw.hook, raw.port, raw.addr, printable(raw.path))


@dataclass(frozen=True, slots=True)
class _Actor:
    """What an event takes from its process, rule and cgroup, enriched once for
    the many events of a flood rather than once per event."""

    ref: RuleRef | None  # the rule it was made with: a reload's new plan makes it stale
    expires: float  # the /proc part is as old as the proc cache allows
    action: str
    kind: str
    hook: str
    policy: str
    rule: str
    location: str
    ppid: int
    comm: str
    exe: str
    cgroup: str


# the record fields an _Actor is made from
_actor_key = operator.itemgetter(*(RawEvent._fields.index(name) for name in (
    "pid", "cgroup_id", "ruleset", "rule_id", "verdict", "kind", "hook", "ppid", "comm", "exe")))

PROC_TTL_S = 1.0  # /proc answers (ppid, exe) are reused this long
WALL_OFFSET_TTL_S = 0.01  # the boot-to-wall clock offset is sampled this often


class Enricher:
    """Turns RawEvents into AuditEvents using the daemon's current knowledge.

    ``rules`` maps a slot-qualified ruleset and rule id to the rule (apply keeps
    the plan of each slot, so an event from the previous generation still finds
    its rule); ``cgroups`` maps a cgroup id to its path. Both may return None:
    the event then carries the ids rather than being dropped.

    What comes from the process, the rule and the cgroup is kept per actor
    (pid, cgroup, rule, verdict, hook, comm, exe) for PROC_TTL_S, bounded: a
    flood of distinct events from one process costs a lookup for it, not
    /proc, cgroup and rule lookups and text conversions per event. The rule is
    still asked for each event, so a reload's new plan is seen at once.
    """

    MAX_ACTORS = 4096

    def __init__(
        self,
        rules: RuleLookup,
        cgroups: CgroupLookup,
        proc: Path = Path("/proc"),
        wall_offset: Callable[[], int] = boot_to_wall_offset_ns,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = rules
        self.cgroups = cgroups
        self.proc = proc
        self.wall_offset = wall_offset
        self.clock = clock
        self._procs = _TtlCache(1024, PROC_TTL_S, clock)
        self._cgroup_paths: OrderedDict[int, str] = OrderedDict()
        self._actors: dict[tuple[object, ...], _Actor] = {}
        self._offset, self._offset_until = 0, float("-inf")

    def _cgroup(self, cgroup_id: int) -> str:
        path = self._cgroup_paths.get(cgroup_id)
        if path is None:
            try:
                found = self.cgroups(cgroup_id)
            except OSError:
                found = None
            if found is None:
                # Not cached: the cgroup may be created later under this id, or
                # removed; the id is still worth printing.
                return f"cgroup-id:{cgroup_id}"
            path = printable_text(found)  # a delegated subtree's names are the user's
            # cgroup ids are never reused within a boot, so a hit stays true
            self._cgroup_paths[cgroup_id] = path
            while len(self._cgroup_paths) > 4096:
                self._cgroup_paths.popitem(last=False)
        return path

    def _read_proc(self, pid: int) -> ProcInfo | None:
        return read_proc(pid, self.proc)

    def _actor(self, raw: RawEvent, ref: RuleRef | None, now: float) -> _Actor:
        ppid, exe = raw.ppid, printable(raw.exe)
        if (ppid == 0 or not exe) and raw.pid > 0:
            info = self._procs.get(raw.pid, self._read_proc)
            if info is not None:
                ppid = ppid or info.ppid
                exe = exe or info.exe
        return _Actor(
            ref=ref,
            expires=now + PROC_TTL_S,
            action=ACTION_BY_VALUE.get(raw.verdict) or f"verdict-{raw.verdict}",
            kind=layout.KIND_NAMES.get(raw.kind, f"kind-{raw.kind}"),
            hook=layout.HOOK_NAMES.get(raw.hook, f"hook-{raw.hook}"),
            policy=ref.policy if ref else "",
            rule=ref.label if ref else (f"#{raw.rule_id}" if raw.rule_id else ""),
            location=f"{ref.location.file}:{ref.location.line}" if ref else "",
            ppid=ppid,
            comm=printable(raw.comm),
            exe=exe,
            cgroup=self._cgroup(raw.cgroup_id),
        )

    def enrich(self, raw: RawEvent) -> AuditEvent:
        ref = self.rules(raw.ruleset, raw.rule_id) if raw.rule_id else None
        now = self.clock()
        key = _actor_key(raw)
        actor = self._actors.get(key)
        if actor is None or actor.ref is not ref or actor.expires <= now:
            if len(self._actors) >= self.MAX_ACTORS:
                self._actors.clear()
            actor = self._actors[key] = self._actor(raw, ref, now)
        if now >= self._offset_until:
            self._offset = self.wall_offset()
            self._offset_until = now + WALL_OFFSET_TTL_S
        kind = raw.kind
        if kind == layout.KIND_CONNECT:
            path, access = "", ""
            addr = (socket.inet_ntop(socket.AF_INET, raw.addr[:4])
                    if raw.family == socket.AF_INET else _address_text(raw.family, raw.addr))
            port, proto = raw.port, PROTO_NAMES.get(raw.proto) or str(raw.proto)
        else:
            path = _tamper_object(raw) if kind == layout.KIND_TAMPER else printable(raw.path)
            access = _access_text(raw.access) if kind == layout.KIND_FILE else ""
            addr, port, proto = "", 0, ""
        # positional, in the field order: a third of the keyword call's cost
        return AuditEvent(raw.time_ns + self._offset, actor.action, actor.kind, actor.hook,
                          actor.policy, actor.rule, actor.location, raw.pid, raw.tid,
                          actor.ppid, raw.uid, actor.comm, actor.exe, actor.cgroup,
                          raw.cgroup_id, path, access, addr, port, proto, raw.count or 1,
                          bool(raw.flags & layout.EVENT_UNDECIDED), "")
