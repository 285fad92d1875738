"""Event lines: one formatter for syslog (RFC 5424) and JSON lines.

Formatting happens in one place (``format_rfc5424`` and ``format_json`` over a
``Record``), whatever the target. The JSON-lines form is the recording format
guard.policy.recording defines and reads (``guard replay``). A line looks like::

    <84>1 2026-11-25T09:41:00.123456Z host guard 4242 exec [guard@32473
    action="deny" kind="exec" hook="bprm_check" policy="web" rule="web/exec.rules[0]"
    location="/etc/guard/web.yaml:12" pid="311" ppid="300" uid="33" comm="sh"
    exe="/usr/bin/dash" cgroup="/system.slice/nginx.service" count="1"
    path="/usr/bin/curl"] deny exec /usr/bin/curl by pid 311 (sh) ...

(one line; wrapped here). Facility is **authpriv** (10): these are
authorization decisions about named users' processes, and authpriv is the
facility syslog daemons keep private (Debian writes it to /var/log/auth.log,
readable by root and adm only), whereas ``auth`` is, on some systems, routed to
world-readable files. Severity is warning for a deny and for lost events,
notice for audit and would-deny, err for daemon errors, info for the daemon's
own lifecycle. The SD-ID ``guard@32473`` uses the enterprise number RFC 5612
reserves for documentation and examples; a registered number replaces it when
guard has one.
"""

from __future__ import annotations

import datetime
import functools
import json
import operator
import re
from dataclasses import dataclass

from guard.events.records import ACTION_LOST, UNSAFE_CHARS, AuditEvent, escape_char
from guard.policy.recording import operation_of

# --- records and formatting -------------------------------------------------------

FACILITY_AUTHPRIV = 10
FACILITY_AUTH = 4

SEV_ERR, SEV_WARNING, SEV_NOTICE, SEV_INFO = 3, 4, 5, 6
SEVERITY_NAMES = {0: "emerg", 1: "alert", 2: "crit", 3: "err", 4: "warning", 5: "notice",
                  6: "info", 7: "debug"}

APP_NAME = "guard"
SD_ID = "guard@32473"

ParamValue = str | int


@dataclass(frozen=True)
class Record:
    """One log line before formatting: what every target format is made from."""

    time_ns: int  # wall clock
    severity: int
    msgid: str
    params: tuple[tuple[str, ParamValue], ...]
    message: str
    # fields only the JSON form carries (a decision's ``op``, see guard.policy.recording):
    # what machines need to decide the operation again, which a syslog reader has
    # in kind and hook already
    json_params: tuple[tuple[str, ParamValue], ...] = ()


def _severity(event: AuditEvent) -> int:
    if event.action in ("deny", ACTION_LOST):
        return SEV_WARNING
    return SEV_NOTICE


def event_params(event: AuditEvent) -> tuple[tuple[str, ParamValue], ...]:
    """The structured fields of an event, in a fixed order; empty ones left out
    except the ones every decision has."""
    params: list[tuple[str, ParamValue]] = [("action", event.action), ("kind", event.kind)]
    if event.kind == "lost":
        params += [("count", event.count), ("source", event.source)]
        return tuple(params)
    params += [
        ("hook", event.hook),
        ("policy", event.policy),
        ("rule", event.rule),
        ("location", event.location),
        ("pid", event.pid),
        ("ppid", event.ppid),
        ("uid", event.uid),
        ("comm", event.comm),
        ("exe", event.exe),
        ("cgroup", event.cgroup),
        ("count", event.count),
    ]
    if event.path:
        params.append(("path", event.path))
    if event.access:
        params.append(("access", event.access))
    if event.addr:
        params += [("addr", event.addr), ("port", event.port), ("proto", event.proto)]
    if event.undecided:
        params.append(("undecided", 1))
    return tuple(params)


def event_message(event: AuditEvent) -> str:
    """The human half of the line: one sentence, fields already in the SD."""
    if event.kind == "lost":
        where = {
            "ringbuf": "the kernel ring buffer was full",
            "reader": "the reader's queue overflowed or a record was malformed",
            "sink": "the syslog target was unreachable and the queue was full",
        }.get(event.source, event.source)
        return f"{event.count} event(s) lost: {where}"
    rule = f"rule {event.rule}" if event.rule else "no rule"
    return (f"{event.action} {_object(event)} by pid {event.pid} ({event.comm}) "
            f"uid {event.uid} in {event.cgroup}: {rule}{_remarks(event)}")


def _object(event: AuditEvent) -> str:
    """What a decision event was about, as its message says it."""
    if event.kind == "connect":
        return f"connect to {event.destination}"
    if event.kind == "file":
        return f"{event.access or 'access'} of {event.path}"
    return f"{event.kind} of {event.path}"


def _remarks(event: AuditEvent) -> str:
    """The end of a decision event's message: an undecided walk, the fold count."""
    text = " (undecided: a bounded walk did not finish)" if event.undecided else ""
    return text + (f" (x{event.count})" if event.count > 1 else "")


def event_record(event: AuditEvent) -> Record:
    op = operation_of(event.kind, event.hook)
    return Record(event.time_ns, _severity(event), event.kind, event_params(event),
                  event_message(event), (("op", op),) if op else ())


def log_record(severity: int, msgid: str, message: str,
               params: tuple[tuple[str, ParamValue], ...] = (),
               time_ns: int | None = None) -> Record:
    """A line about the daemon itself (start, reload, errors)."""
    return Record(time_ns if time_ns is not None else _now_ns(), severity, msgid, params,
                  message)


def _now_ns() -> int:
    return int(datetime.datetime.now(datetime.UTC).timestamp() * 1_000_000_000)


def escape_param_value(value: str) -> str:
    """RFC 5424 section 6.3.3: '"', '\\' and ']' are escaped with a backslash."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_token(text: str, limit: int) -> str:
    """HOSTNAME/APP-NAME/MSGID: printable US-ASCII without spaces, or NILVALUE."""
    clean = "".join(ch for ch in text if 33 <= ord(ch) <= 126)[:limit]
    return clean or "-"


_UNSAFE = re.compile(f"[{UNSAFE_CHARS}]")


def _one_line(text: str) -> str:
    """Text with no character of UNSAFE_CHARS left raw (guard.events.records):
    whatever reached the formatter unescaped (a daemon message quoting a policy
    path, a name read from /proc) cannot break or disguise the line."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape_match, text)


def _escape_match(match: re.Match[str]) -> str:
    return escape_char(match.group(0))


@functools.lru_cache(maxsize=16)
def _second(seconds: int) -> str:
    # the lines of a flood share their second: strftime once per second, not per line
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def timestamp(time_ns: int) -> str:
    """RFC 3339 in UTC with microseconds, as RFC 5424 allows (TIME-SECFRAC 6)."""
    seconds, rest = divmod(time_ns, 1_000_000_000)
    return f"{_second(seconds)}.{rest // 1000:06d}Z"


def format_rfc5424(record: Record, hostname: str, procid: int,
                   facility: int = FACILITY_AUTHPRIV) -> str:
    pri = facility * 8 + record.severity
    if record.params:
        inner = " ".join(f'{name}="{escape_param_value(_one_line(str(value)))}"'
                         for name, value in record.params)
        sd = f"[{SD_ID} {inner}]"
    else:
        sd = "-"
    header = (f"<{pri}>1 {timestamp(record.time_ns)} {_header_token(hostname, 255)} "
              f"{APP_NAME} {procid} {_header_token(record.msgid, 32)}")
    return f"{header} {sd} {_one_line(record.message)}"


def format_json(record: Record, hostname: str, procid: int,
                facility: int = FACILITY_AUTHPRIV) -> str:
    body: dict[str, object] = {
        "time": timestamp(record.time_ns),
        "host": hostname,
        "app": APP_NAME,
        "procid": procid,
        "facility": "authpriv" if facility == FACILITY_AUTHPRIV else facility,
        "severity": SEVERITY_NAMES.get(record.severity, record.severity),
        "msgid": record.msgid,
    }
    body.update((name, _one_line(value) if isinstance(value, str) else value)
                for name, value in record.params + record.json_params)
    body["message"] = _one_line(record.message)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


_SD_SPECIAL = re.compile(f'["\\\\\\]{UNSAFE_CHARS}]')  # what escape_param_value or _one_line change


def _sd_text(value: str) -> str:
    """``escape_param_value(_one_line(value))``, without the five passes when
    there is nothing to change (nearly always)."""
    if _SD_SPECIAL.search(value) is None:
        return value
    return escape_param_value(_one_line(value))


# The fields of an event a flood's lines share: everything format_rfc5424 puts
# before ``count`` in the structured data, and the message's tail.
_shared_fields = operator.attrgetter("action", "kind", "hook", "policy", "rule", "location",
                                     "pid", "ppid", "uid", "comm", "exe", "cgroup")


class EventFormatter:
    """``format_rfc5424(event_record(event), ...)`` for decision events, made
    fast for floods: the header, the structured data up to ``count`` and the
    message's tail depend only on fields the events of one process and rule
    share, so they are rendered once per such group (a bounded cache) and each
    line adds its time, count and object. tests/unit/test_sinks.py checks the
    lines are the generic formatter's, byte for byte. Lost-event reports go
    through the generic formatter.
    """

    MAX_GROUPS = 4096

    def __init__(self, hostname: str, procid: int, facility: int = FACILITY_AUTHPRIV) -> None:
        self.hostname, self.procid, self.facility = hostname, procid, facility
        self._groups: dict[tuple[object, ...], tuple[str, str, str]] = {}

    def _group(self, event: AuditEvent) -> tuple[str, str, str]:
        pri = self.facility * 8 + _severity(event)
        # params up to cgroup, exactly as event_params lists them
        shared = event_params(event)[:12]
        inner = " ".join(f'{name}="{_sd_text(str(value))}"' for name, value in shared)
        middle = (f" {_header_token(self.hostname, 255)} {APP_NAME} {self.procid} "
                  f"{_header_token(event.kind, 32)} [{SD_ID} {inner}")
        rule = f"rule {event.rule}" if event.rule else "no rule"
        tail = _one_line(f" by pid {event.pid} ({event.comm}) uid {event.uid} "
                         f"in {event.cgroup}: {rule}")
        return f"<{pri}>1 ", middle, tail

    def line(self, event: AuditEvent) -> str:
        if event.kind == "lost":
            return format_rfc5424(event_record(event), self.hostname, self.procid,
                                  self.facility)
        key = _shared_fields(event)
        group = self._groups.get(key)
        if group is None:
            if len(self._groups) >= self.MAX_GROUPS:
                self._groups.clear()
            group = self._groups[key] = self._group(event)
        head, middle, tail = group
        params = [f' count="{event.count}"']
        if event.path:
            params.append(f' path="{_sd_text(event.path)}"')
        if event.access:
            params.append(f' access="{_sd_text(event.access)}"')
        if event.addr:
            params.append(f' addr="{_sd_text(event.addr)}" port="{event.port}" '
                          f'proto="{_sd_text(event.proto)}"')
        if event.undecided:
            params.append(' undecided="1"')
        return (f"{head}{timestamp(event.time_ns)}{middle}{''.join(params)}] "
                f"{_one_line(event.action)} {_one_line(_object(event))}{tail}"
                f"{_remarks(event)}")
