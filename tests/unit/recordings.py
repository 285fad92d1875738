"""Recordings for unit tests, made as the daemon makes them: real AuditEvents
formatted by guard.events.formats.format_json (the ``file:PATH`` target's lines)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from guard.events.formats import event_record, format_json, log_record
from guard.events.records import AuditEvent, lost_event

T0 = 1_764_000_000 * 10**9
NGINX = "/system.slice/nginx.service"


def event(kind: str, action: str = "audit", cgroup: str = NGINX, rule: str = "learn/x.default",
          **fields: object) -> AuditEvent:
    hook = {"exec": "bprm_check", "file": "file_open", "connect": "connect4"}[kind]
    values: dict[str, object] = dict(
        time_ns=T0, action=action, kind=kind, hook=hook, policy=rule.split("/")[0], rule=rule,
        location="learn.yaml:1", pid=10, tid=10, ppid=1, uid=33, comm="app",
        exe="/usr/bin/app", cgroup=cgroup, cgroup_id=7)
    values.update(fields)
    return AuditEvent(**values)  # type: ignore[arg-type]


def exec_event(path: str, action: str = "audit", **fields: object) -> AuditEvent:
    return event("exec", action, path=path, **fields)


def open_event(path: str, access: str = "read", action: str = "audit",
               **fields: object) -> AuditEvent:
    return event("file", action, path=path, access=access, **fields)


def connect_event(addr: str, port: int, proto: str = "tcp", action: str = "audit",
                  **fields: object) -> AuditEvent:
    return event("connect", action, addr=addr, port=port, proto=proto, **fields)


def lines(events: Iterable[AuditEvent]) -> list[str]:
    return [format_json(event_record(e), "host1", 4242) for e in events]


def write(path: Path, events: Iterable[AuditEvent], *, daemon_lines: bool = True,
          lost: int = 0) -> Path:
    """A recording as a daemon leaves it: its start line, the events, a lost report."""
    text = []
    if daemon_lines:
        text.append(format_json(log_record(6, "start", "guard: started", (("policies", "p"),),
                                           time_ns=T0), "host1", 4242))
    text += lines(events)
    if lost:
        text += lines([lost_event(lost, "ringbuf", time_ns=T0)])
    path.write_text("\n".join(text) + "\n")
    return path
