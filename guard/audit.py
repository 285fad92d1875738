"""The audit reader: kernel event records in, enriched and aggregated events out.

Three steps, each a function of values so it is unit-tested without a kernel:

1. ``decode`` turns one ring buffer record (``struct guard_event``, bpf/guard.h)
   into a ``RawEvent``. A record shorter than the struct is rejected (and the
   caller counts it): it cannot come from our programs and must not be read past
   its end.
2. ``Enricher.enrich`` turns a ``RawEvent`` into an ``AuditEvent``: wall-clock
   time, the rule that decided (policy, label, file:line), the cgroup path, and
   what the kernel could not fill (ppid and executable, from /proc, best effort:
   the process may be gone by the time we read).
3. ``Aggregator`` folds identical events (same everything except time, tid and
   count) inside a window into one line with ``count=N``, so a process retrying a
   denied connect in a loop does not drown the operator.

The daemon runs step 3 first, on the records themselves (``Folder`` keyed by
``record_identity``): a repeat inside a window then costs a slice and a dict
lookup, and only the records that become lines are decoded, enriched and
formatted. That is what lets a flood of identical events go through at the rate
the kernel makes them. ``Aggregator`` is the same folding over ``AuditEvent``
values, for callers that already hold events.

Nothing is dropped without a count: ``LossTracker`` turns the kernel's
GUARD_STAT_EVENTS_LOST counter (events the ring buffer could not take) and the
reader's own drops (records rejected, queue overflow) into ``kind=lost`` events
that travel the same stream as everything else.
"""

from __future__ import annotations

import ctypes
import ipaddress
import operator
import os
import re
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar

from guard import layout
from guard.plan import RuleRef, Verdict

EVENT_SIZE = ctypes.sizeof(layout.Event)

ACTION_NAMES = {
    Verdict.ALLOW: "allow",  # never reported by the programs; named for completeness
    Verdict.AUDIT: "audit",
    Verdict.WOULD_DENY: "would-deny",
    Verdict.DENY: "deny",
}
# by the record's integer: building a Verdict per event costs more than the lookup
_ACTION_BY_VALUE = {int(verdict): name for verdict, name in ACTION_NAMES.items()}

PROTO_NAMES = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", 0: "any"}

KIND_LOST = "lost"
ACTION_LOST = "lost"

# Where lost events were lost; the ``source`` of a kind=lost event.
LOST_KERNEL = "ringbuf"  # the kernel's ring buffer was full
LOST_QUEUE = "reader"  # the reader's queue overflowed, or a record was malformed
LOST_SINK = "sink"  # the syslog target was down for longer than its queue lasts


class DecodeError(ValueError):
    """A ring buffer record that is not a ``struct guard_event``."""


class RawEvent(NamedTuple):
    """``struct guard_event`` as Python values; strings are still bytes.

    A NamedTuple rather than a frozen dataclass: ``decode`` builds it from the
    tuple ``struct`` unpacks in one step, where a frozen dataclass would set its
    21 fields one by one (five times slower, once per event of a flood). The
    fields are the C struct's, in its order (tests/unit/test_audit.py checks).
    """

    time_ns: int  # CLOCK_BOOTTIME
    cgroup_id: int
    pid: int
    tid: int
    ppid: int
    uid: int
    rule_id: int
    ruleset: int
    count: int  # type: ignore[assignment]  # the field, not tuple.count
    flags: int
    kind: int
    hook: int
    verdict: int
    access: int
    family: int
    proto: int
    port: int
    addr: bytes
    comm: bytes
    path: bytes
    exe: bytes


def _struct_format(ctype: type[ctypes.Structure]) -> str:
    """The ``struct`` format of a ctypes mirror, derived from its fields and
    offsets (native byte order, explicit padding), so the two cannot drift."""
    scalars: dict[object, str] = {ctypes.c_uint8: "B", ctypes.c_uint16: "H",
                                  ctypes.c_uint32: "I", ctypes.c_uint64: "Q"}
    out, at = ["="], 0
    for entry in ctype._fields_:
        field_type = entry[1]
        member = getattr(ctype, entry[0])
        if member.offset > at:
            out.append(f"{member.offset - at}x")
        out.append(f"{member.size}s" if issubclass(field_type, ctypes.Array)
                   else scalars[field_type])
        at = member.offset + member.size
    if ctypes.sizeof(ctype) > at:
        out.append(f"{ctypes.sizeof(ctype) - at}x")
    return "".join(out)


_RECORD = struct.Struct(_struct_format(layout.Event))
_COMM, _PATH, _EXE = (RawEvent._fields.index(n) for n in ("comm", "path", "exe"))
_COUNT = struct.Struct("=I")
_COUNT_AT = layout.Event.count.offset


def decode(data: bytes | bytearray | memoryview) -> RawEvent:
    """One record as the ring buffer hands it over; longer records are tolerated
    (a newer program may append fields), shorter ones are not."""
    if len(data) < EVENT_SIZE:
        raise DecodeError(f"event record of {len(data)} bytes, expected {EVENT_SIZE}")
    values = _RECORD.unpack_from(data)
    # C strings end at the first NUL (as ctypes' c_char arrays read them)
    return RawEvent._make((*values[:_COMM], values[_COMM].partition(b"\0")[0],
                           values[_PATH].partition(b"\0")[0],
                           values[_EXE].partition(b"\0")[0]))


def _identity_slices(varying: tuple[str, ...]) -> tuple[slice, ...]:
    """The byte ranges of a record outside the ``varying`` fields, merged."""
    ranges: list[list[int]] = []
    for entry in layout.Event._fields_:
        name = entry[0]
        if name in varying:
            continue
        member = getattr(layout.Event, name)
        if ranges and ranges[-1][1] == member.offset:
            ranges[-1][1] = member.offset + member.size
        else:
            ranges.append([member.offset, member.offset + member.size])
    return tuple(slice(a, b) for a, b in ranges)


# The folding key of a raw record: its bytes but time, tid and count (the fields
# identical events may differ in), taken by one C call. Two records with the same
# key decode to the same event but for those fields; padding after a string's
# NUL is part of the key, which can only keep apart what could have been folded,
# never fold what differs.
record_identity: Callable[[bytes], Hashable] = operator.itemgetter(
    *_identity_slices(("time_ns", "tid", "count")))


def record_count(data: bytes) -> int:
    """The events one record stands for (the kernel may have folded repeats)."""
    count: int = _COUNT.unpack_from(data, _COUNT_AT)[0]
    return count or 1


_PLAIN_ASCII = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")  # printable ASCII but the backslash


def printable(raw: bytes) -> str:
    """Kernel strings are bytes; make them one safe line of text.

    Valid UTF-8 stays as is. Invalid bytes, control characters (a newline in a
    file name must not start a forged log line) and the backslash itself become
    ``\\xNN``, so the text maps back to exactly one byte string.
    """
    if not raw:
        return ""
    if _PLAIN_ASCII.fullmatch(raw):  # the common case, and the cheap one
        return raw.decode("ascii")
    text = raw.decode("utf-8", errors="surrogateescape")
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F or ch == "\\":
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


class AuditEvent(NamedTuple):
    """One decision worth reporting, ready to format. Text fields are printable.

    ``kind`` is exec/file/connect, or ``lost`` for a report of events that never
    arrived (``count`` of them, lost at ``source``).

    Immutable like a frozen dataclass, but a NamedTuple: one is made per line
    of a flood, and a frozen dataclass sets its 23 fields one call at a time
    (twice the cost). ``_replace`` makes a changed copy.
    """

    time_ns: int  # wall clock, ns since the epoch (UTC)
    action: str  # deny | audit | would-deny | lost
    kind: str  # exec | file | connect | lost
    hook: str = ""
    policy: str = ""
    rule: str = ""  # RuleRef.label, e.g. web/exec.rules[0]
    location: str = ""  # FILE:LINE of the rule
    pid: int = 0
    tid: int = 0
    ppid: int = 0
    uid: int = 0
    comm: str = ""
    exe: str = ""
    cgroup: str = ""
    cgroup_id: int = 0
    path: str = ""  # exec: the file run; file: the file opened
    access: str = ""  # file: read | write | read,write
    addr: str = ""  # connect: destination address
    port: int = 0
    proto: str = ""  # connect: tcp | udp | any
    count: int = 1  # type: ignore[assignment]  # the field, not tuple.count
    undecided: bool = False  # the program hit a bound and decided by mode
    source: str = ""  # kind=lost: where they were lost: ringbuf | reader | sink

    @property
    def destination(self) -> str:
        """``ADDR:PORT/PROTO`` for connect events, IPv6 addresses bracketed."""
        if not self.addr:
            return ""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"{host}:{self.port}/{self.proto}"

    def identity(self) -> tuple[object, ...]:
        """Every field except those that may differ between identical events
        (time, tid, count): the aggregation key."""
        key: tuple[object, ...] = _identity(self)
        return key


# itemgetter builds the key tuple in C: this runs once per event of a flood
_identity = operator.itemgetter(
    *(i for i, name in enumerate(AuditEvent._fields) if name not in ("time_ns", "tid", "count")))


def lost_event(count: int, source: str, time_ns: int | None = None) -> AuditEvent:
    return AuditEvent(
        time_ns=time.time_ns() if time_ns is None else time_ns,
        action=ACTION_LOST,
        kind=KIND_LOST,
        count=count,
        source=source,
    )


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


def _tamper_object(raw: RawEvent) -> str:
    """A tamper event's object as a phrase (guard.tamper.tamper_object)."""
    from guard.tamper import tamper_object

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
            path = found
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
            action=_ACTION_BY_VALUE.get(raw.verdict) or f"verdict-{raw.verdict}",
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


# --- aggregation --------------------------------------------------------------


T = TypeVar("T")


@dataclass(slots=True)
class _Window(Generic[T]):
    closes_at: float
    repeats: int = 0  # events folded since the last line went out (sum of counts)
    last: T | None = None


@dataclass(frozen=True)
class AggregatorStats:
    seen: int  # events pushed (each counted by its own ``count``)
    emitted_lines: int  # lines that went out
    pending: int  # events counted in an open window, not yet in a line

    @property
    def aggregated(self) -> int:
        """Events that went out inside another event's line (seen = lines + these)."""
        return self.seen - self.pending - self.emitted_lines


class Folder(Generic[T]):
    """Folds identical items within ``window`` seconds into one line.

    The first item of a kind goes out at once (``add`` says so), so an operator
    sees an attack begin without delay. Identical items inside the window are
    only counted; when the window closes they go out as ONE line whose count is
    their sum (kernel-folded events add their own count), made from the last
    one (``closed``). If repeats went out, a new window opens for the same key,
    so a sustained flood costs one line per window rather than one per event; a
    window that closes with nothing folded ends the aggregation.

    The caller names each item's identity (``key``) and count, and turns an item
    and a count into a line; it calls ``closed`` before it adds what arrived
    after a window's end (the daemon does once per batch of records, so a window
    may take in a few milliseconds' more events than its second: counts stay
    exact). Pure apart from the injected clock; ``max_keys`` bounds memory: when
    that many distinct items are open, a new one goes out unaggregated (never
    lost).
    """

    def __init__(
        self,
        window: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 4096,
    ) -> None:
        if window < 0:
            raise ValueError("aggregation window must be >= 0 seconds")
        self.window = window
        self.clock = clock
        self.max_keys = max_keys if window > 0 else 0
        # Ordered by closing time: a window is appended when it opens and moved to
        # the end when it reopens, and every window is ``window`` long, so closed()
        # only looks at the front.
        self._open: OrderedDict[Hashable, _Window[T]] = OrderedDict()
        self.seen = 0
        self.emitted_lines = 0
        self._pending = 0

    def stats(self) -> AggregatorStats:
        return AggregatorStats(self.seen, self.emitted_lines, self._pending)

    def add(self, key: Hashable, item: T, count: int) -> bool:
        """Count one item; True when it must go out now, as a line of its own."""
        self.seen += count
        window = self._open.get(key)
        if window is not None:
            window.repeats += count
            window.last = item
            self._pending += count
            return False
        if len(self._open) < self.max_keys:
            self._open[key] = _Window(self.clock() + self.window)
        self.emitted_lines += 1
        return True

    def closed(self, force: bool = False) -> list[tuple[T, int]]:
        """The lines of the windows that have closed (all of them with ``force``):
        the last item folded in each, and how many events the line stands for."""
        out: list[tuple[T, int]] = []
        if not self._open:
            return out
        now = self.clock()
        reopened: list[tuple[Hashable, _Window[T]]] = []
        while self._open:
            key, window = next(iter(self._open.items()))
            if not force and window.closes_at > now:
                break
            del self._open[key]
            if window.repeats and window.last is not None:
                out.append((window.last, window.repeats))
                self._pending -= window.repeats
                if not force:
                    window.repeats, window.last = 0, None
                    window.closes_at = now + self.window
                    reopened.append((key, window))
        self._open.update(reopened)  # at the end: they close last
        self.emitted_lines += len(out)
        return out

    def next_deadline(self) -> float | None:
        """Clock time when the earliest open window closes."""
        for window in self._open.values():
            return window.closes_at
        return None

    @property
    def pending(self) -> int:
        """Events counted but not yet sent in a line."""
        return self._pending


class Aggregator(Folder[AuditEvent]):
    """``Folder`` over AuditEvents, keyed by ``AuditEvent.identity``: events in,
    lines out (a folded line is the last event with the window's count, stamped
    with its time). Lost-event reports are never folded."""

    def push(self, event: AuditEvent) -> list[AuditEvent]:
        """Take one event; return what must go out now (closed windows first)."""
        out = self.flush()
        if event.kind == KIND_LOST:
            self.seen += event.count
            self.emitted_lines += 1
            out.append(event)
        elif self.add(event.identity(), event, event.count):
            out.append(event)
        return out

    def flush(self, force: bool = False) -> list[AuditEvent]:
        """Lines of the windows that have closed (all of them with ``force``)."""
        return [last._replace(count=n) for last, n in self.closed(force)]


# --- loss accounting ----------------------------------------------------------


class LossTracker:
    """Turns lost-event counters into ``kind=lost`` events, each loss reported once.

    The kernel's counter is cumulative over the map's life. The maps are created
    by this daemon's loader, so the count starts at 0 with us and the first
    reading is reported in full; a daemon that adopts pinned maps (a later
    issue) passes the count the previous daemon reported as ``kernel_baseline``.
    """

    def __init__(self, kernel_baseline: int = 0) -> None:
        self._kernel_seen = kernel_baseline
        self.kernel_lost = 0  # reported so far
        self.reader_lost = 0  # counted by the reader: malformed records, queue overflow
        self._reader_reported = 0

    def kernel_reading(self, total: int, time_ns: int | None = None) -> AuditEvent | None:
        previous = self._kernel_seen
        self._kernel_seen = total
        if total <= previous:
            return None
        self.kernel_lost += total - previous
        return lost_event(total - previous, LOST_KERNEL, time_ns)

    def reader_dropped(self, n: int = 1) -> None:
        self.reader_lost += n

    def reader_report(self, time_ns: int | None = None) -> AuditEvent | None:
        new = self.reader_lost - self._reader_reported
        if new <= 0:
            return None
        self._reader_reported = self.reader_lost
        return lost_event(new, LOST_QUEUE, time_ns)
