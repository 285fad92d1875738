"""Kernel event records: decoding ``struct guard_event`` and the event values.

``decode`` turns one ring buffer record (``struct guard_event``, bpf/guard.h)
into a ``RawEvent``. A record shorter than the struct is rejected (and the
caller counts it): it cannot come from guard's programs and must not be read
past its end. ``record_identity`` and ``record_count`` read a record's bytes
without decoding it, so that repeats are folded before any work is done on them
(guard.events.fold). ``AuditEvent`` is an event as the sinks format it
(guard.events.enrich makes it); ``lost_event`` is the ``kind=lost`` line that
reports what the kernel, the reader or the sink could not deliver.
"""

from __future__ import annotations

import ctypes
import operator
import re
import socket
import struct
import time
from collections.abc import Callable, Hashable
from typing import NamedTuple

from guard import layout
from guard.policy.plan import Verdict

EVENT_SIZE = ctypes.sizeof(layout.Event)

ACTION_NAMES = {
    Verdict.ALLOW: "allow",  # never reported by the programs; named for completeness
    Verdict.AUDIT: "audit",
    Verdict.WOULD_DENY: "would-deny",
    Verdict.DENY: "deny",
}
# by the record's integer: building a Verdict per event costs more than the lookup
ACTION_BY_VALUE = {int(verdict): name for verdict, name in ACTION_NAMES.items()}

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

# What must never reach a log line raw, whoever chose the text (a file name, a
# comm, a delegated cgroup's name): C0 controls and DEL (a newline starts a
# forged line, ESC drives terminals), C1 controls (U+0080-U+009F: CSI and NEL
# in some viewers), the line and paragraph separators U+2028/U+2029 (line
# breaks to JSON and JavaScript consumers), and the bidirectional controls
# (U+061C, U+200E/F, U+202A-U+202E, U+2066-U+2069) that reorder what a reader
# sees. The formatter (guard.events.formats) applies the same set to every
# line as a last line of defence.
UNSAFE_CHARS = r"\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE_OR_BACKSLASH = re.compile(f"[{UNSAFE_CHARS}\\\\]")


def escape_char(ch: str) -> str:
    """One character as text that names it: ``\\xNN`` below U+0100, else ``\\uNNNN``."""
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _escape(match: re.Match[str]) -> str:
    return escape_char(match.group(0))


def printable(raw: bytes) -> str:
    """Kernel strings are bytes; make them one safe line of text.

    Valid UTF-8 stays as is but for UNSAFE_CHARS. Invalid bytes, those
    characters and the backslash itself become ``\\xNN`` (``\\uNNNN`` above
    U+00FF), so the text maps back to exactly one byte string and shows the
    reader every character it stands for.
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
        elif _UNSAFE_OR_BACKSLASH.match(ch):
            out.append(escape_char(ch))
        else:
            out.append(ch)
    return "".join(out)


def printable_text(text: str) -> str:
    """``printable`` for text that did not come from the kernel as bytes (/proc,
    cgroupfs names, a control-socket caller): the same escapes, the same result
    for the same bytes."""
    if _UNSAFE_OR_BACKSLASH.search(text) is None and text.isascii():
        return text
    return printable(text.encode("utf-8", "surrogateescape"))


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
