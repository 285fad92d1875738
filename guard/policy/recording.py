"""Recordings: decision events as JSON lines, read back as operations to decide again.

A recording is what ``guard run --syslog file:PATH`` appends (and ``guard
events --json`` prints): one JSON object a line, made by
guard.events.formats.format_json. Its format is defined here, once, for the
writer and for every reader (``guard replay``, ``guard diff --events``,
``guard suggest``).

A decision line carries, besides time, host and the actor's pid, uid, comm and exe:

    op       the operation: exec | map | open | connect (``operation_of``; it
             tells an exec from a PROT_EXEC mapping of the same kind=exec)
    kind     exec | file | connect;   hook: the kernel hook that decided
    action   the recorded verdict: deny | audit | would-deny
    rule     the deciding rule, ``POLICY/SECTION.rules[I]`` or ``.default``
    cgroup   the actor's cgroup v2 path (``cgroup-id:N`` when it could not be named)
    path     exec: the name the program was run by (the kernel's bprm->interp);
             map, open: the file; escaped by guard.events.records.printable
    access   open: read | write | read,write
    addr, port, proto   connect: the destination (proto tcp | udp | any)
    count    how many identical operations the line stands for (folded repeats)
    undecided  1 when a bounded kernel walk did not finish and the mode decided

Other lines are not operations and are passed over, counted: the daemon's own
lines (no ``kind``), ``kind=lost`` reports (events the recording misses) and
``kind=tamper`` events. A line that is not a JSON object, or a decision line
missing a field or carrying a bad value, is a ``Problem`` at FILE:LINE; the
reader goes on with the next line.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from guard.policy.plan import Verdict

# (kind, hook) -> op; a kind=exec event of these hooks is a mapping, not an exec
MAP_HOOKS = frozenset({"mmap_file", "file_mprotect"})
OPERATIONS = ("exec", "map", "open", "connect")
KINDS = {"exec": "exec", "file": "open", "connect": "connect"}
ACTIONS = {"audit": Verdict.AUDIT, "would-deny": Verdict.WOULD_DENY, "deny": Verdict.DENY,
           "allow": Verdict.ALLOW}
ACCESSES = ("read", "write")
PROTOCOLS = ("tcp", "udp", "any")
MAX_LINE = 1 << 20  # a longer line is not one guard wrote


def operation_of(kind: str, hook: str) -> str:
    """The ``op`` field of a decision event; "" for events that are not operations."""
    if kind == "exec" and hook in MAP_HOOKS:
        return "map"
    return KINDS.get(kind, "")


@dataclass(frozen=True)
class Recorded:
    """One recorded decision: the operation, who made it, and what the kernel said."""

    file: str
    line: int
    op: str  # exec | map | open | connect
    cgroup: str
    action: str  # deny | audit | would-deny
    rule: str  # label of the deciding rule, "" for none
    path: str = ""  # exec, map, open: unescaped
    access: tuple[str, ...] = ()  # open: ("read",), ("write",) or both
    addr: str = ""
    port: int = 0
    proto: str = ""
    count: int = 1
    undecided: bool = False
    time: str = ""
    comm: str = ""
    exe: str = ""
    hook: str = ""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def verdict(self) -> Verdict:
        return ACTIONS[self.action]

    @property
    def target(self) -> str:
        """The operation's object as the commands print it."""
        if self.op == "connect":
            host = f"[{self.addr}]" if ":" in self.addr else self.addr
            return f"{host}:{self.port}/{self.proto}"
        if self.op == "open":
            return f"{self.path} for {','.join(self.access)}"
        return self.path

    def key(self) -> tuple[object, ...]:
        """What makes two records the same operation (for grouping and samples)."""
        return (self.op, self.cgroup, self.path, self.access, self.addr, self.port, self.proto)


@dataclass(frozen=True, order=True)
class Problem:
    """A line of a recording that could not be read."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: error: {self.message}"


@dataclass(frozen=True)
class Recording:
    """A recording's operations, its bad lines, and what else it held."""

    operations: tuple[Recorded, ...]
    problems: tuple[Problem, ...] = ()
    lines: int = 0
    skipped: int = 0  # daemon lines and tamper events: not operations
    lost: int = 0  # events the daemon reported lost (kind=lost counts)
    files: tuple[str, ...] = field(default=())

    @property
    def count(self) -> int:
        """Operations, folded repeats counted."""
        return sum(r.count for r in self.operations)


_ESCAPE = re.compile(r"\\x([0-9a-f]{2})|\\u([0-9a-f]{4})")


def unescape(text: str) -> str:
    """The inverse of guard.events.records.printable: ``\\xNN`` a byte, ``\\uNNNN`` a
    character; bytes that are not UTF-8 come back as surrogate escapes."""
    if "\\" not in text:
        return text
    out = bytearray()
    at = 0
    for match in _ESCAPE.finditer(text):
        out += text[at:match.start()].encode("utf-8", "surrogateescape")
        if match.group(1) is not None:
            out.append(int(match.group(1), 16))
        else:
            out += chr(int(match.group(2), 16)).encode("utf-8", "surrogatepass")
        at = match.end()
    out += text[at:].encode("utf-8", "surrogateescape")
    return out.decode("utf-8", "surrogateescape")


class _Bad(ValueError):
    pass


def _text(body: dict[str, object], name: str, required: bool = True) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise _Bad(f"field {name!r} is missing or not a non-empty string")
    return value


def _int(body: dict[str, object], name: str, low: int, high: int, default: int | None = None
         ) -> int:
    value = body.get(name, default)
    if isinstance(value, str) and value.isdigit():  # tolerated: key=value forms carry text
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _Bad(f"field {name!r} is missing or not an integer in {low}..{high}")
    return value


def parse_line(text: str, file: str, line: int) -> Recorded | str | None:
    """One line: a Recorded operation, None for a line that is no operation (a
    daemon line), or the problem, as a message. ``kind=lost`` lines come back as
    the string ``"lost:N"`` for the caller to count."""
    if len(text) > MAX_LINE:
        return f"line longer than {MAX_LINE} bytes"
    try:
        body = json.loads(text)
    except ValueError as error:
        return f"not JSON: {error}"
    if not isinstance(body, dict):
        return "not a JSON object"
    kind = body.get("kind")
    if kind is None:
        return None  # the daemon's own line (start, reload, errors)
    try:
        if kind == "lost":
            return f"lost:{_int(body, 'count', 0, 1 << 62)}"
        if kind == "tamper":
            return None
        if kind not in KINDS:
            raise _Bad(f"unknown kind {kind!r} (exec, file, connect, lost, tamper)")
        return _decision(body, str(kind), file, line)
    except _Bad as error:
        return str(error)


def _decision(body: dict[str, object], kind: str, file: str, line: int) -> Recorded:
    hook = _text(body, "hook", required=False)
    op = _text(body, "op", required=False) or operation_of(kind, hook)
    if op not in OPERATIONS or KINDS[kind] != ("exec" if op == "map" else op):
        raise _Bad(f"op {op!r} does not go with kind {kind!r}")
    action = _text(body, "action")
    if action not in ACTIONS:
        raise _Bad(f"unknown action {action!r} (deny, audit, would-deny)")
    cgroup = unescape(_text(body, "cgroup"))
    if not cgroup.startswith("/"):
        raise _Bad(f"cgroup {cgroup!r} is not a cgroup path (the daemon could not name it)")
    common = dict(
        file=file, line=line, op=op, cgroup=cgroup, action=action,
        rule=_text(body, "rule", required=False), count=_int(body, "count", 1, 1 << 62, 1),
        undecided=bool(body.get("undecided")), time=_text(body, "time", required=False),
        comm=_text(body, "comm", required=False), exe=_text(body, "exe", required=False),
        hook=hook)
    if op == "connect":
        addr = _text(body, "addr")
        if not _is_address(addr):
            raise _Bad(f"addr {addr!r} is not an IP address")
        proto = _text(body, "proto")
        if proto not in PROTOCOLS:
            raise _Bad(f"proto {proto!r} is not one guard decides (tcp, udp, any)")
        return Recorded(addr=addr, port=_int(body, "port", 0, 65535), proto=proto,
                        **common)  # type: ignore[arg-type]
    # not always absolute: an exec is recorded by the name it was run by
    # (``./configure``), a file path too long for the event starts with "..."; the
    # evaluator refuses those, and replay says so per operation
    path = unescape(_text(body, "path"))
    access: tuple[str, ...] = ()
    if op == "open":
        access = tuple(_text(body, "access").split(","))
        if not access or any(a not in ACCESSES for a in access):
            raise _Bad(f"access {body.get('access')!r} is not read, write or read,write")
    return Recorded(path=path, access=access, **common)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=65536)
def _is_address(text: str) -> bool:
    # a recording names few destinations many times
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_recording(lines: Iterable[str], file: str) -> Recording:
    """Every line of one recording's text (blank lines are passed over)."""
    operations: list[Recorded] = []
    problems: list[Problem] = []
    total = skipped = lost = 0
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        total += 1
        got = parse_line(text, file, number)
        if isinstance(got, Recorded):
            operations.append(got)
        elif got is None:
            skipped += 1
        elif got.startswith("lost:"):
            lost += int(got[5:])
        else:
            problems.append(Problem(file, number, got))
    return Recording(tuple(operations), tuple(problems), total, skipped, lost, (file,))


def read_recording(paths: Iterable[str]) -> Recording:
    """The recordings in ``paths`` ("-" is standard input), in order; OSError when
    one cannot be read."""
    import sys

    parts: list[Recording] = []
    for name in paths:
        if name == "-":
            parts.append(parse_recording(sys.stdin, "<stdin>"))
            continue
        with Path(name).open(encoding="utf-8", errors="surrogateescape") as f:
            parts.append(parse_recording(f, name))
    return Recording(
        tuple(r for part in parts for r in part.operations),
        tuple(p for part in parts for p in part.problems),
        sum(p.lines for p in parts), sum(p.skipped for p in parts),
        sum(p.lost for p in parts), tuple(f for p in parts for f in p.files))
