"""A real rsyslogd for the audit-stream tests, and a strict RFC 5424 parser.

``Rsyslog`` runs rsyslogd as a child in the foreground (``-n -f CONF -i PIDFILE``)
with a config of its own in a temporary directory: inputs on a unix datagram
socket, a unix stream socket, UDP and TCP on 127.0.0.1, each only when asked
for, and every message written raw (``%rawmsg%``, exactly the bytes guard sent,
minus the octet-count framing) one per line to ``messages``. Ports are chosen
once, so a restart listens where the sender still sends.

    with Rsyslog(tmp_path, udp=True, tcp=True) as syslog:
        ...send...
        lines = syslog.wait_for(lambda lines: len(guard_lines(lines)) >= 3, timeout=10)

``parse_rfc5424`` is strict on purpose: the tests read back what guard wrote
with a parser that rejects anything RFC 5424 does not allow, so a formatting
bug cannot hide behind a lenient reader.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"

# --- the parser -----------------------------------------------------------------------

_HEADER = re.compile(
    r"<(?P<pri>\d{1,3})>1 "
    r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) "
    r"(?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) "
    r"(?P<msgid>[!-~]{1,32}) "
)
_NAME = r'[!#-<>-\\^-~]{1,32}'  # printable US-ASCII except '=', ' ', ']', '"'
# strict: guard escapes every backslash, so a lone one is a formatting bug
_VALUE = r'(?:[^"\\\]]|\\["\\\]])*'
_PARAM = re.compile(rf' (?P<name>{_NAME})="(?P<value>{_VALUE})"')
_ELEMENT = re.compile(rf'\[(?P<id>{_NAME})(?P<params>(?: {_NAME}="{_VALUE}")*)\]')


class ParseError(ValueError):
    pass


@dataclass(frozen=True)
class Syslog5424:
    pri: int
    time: str
    host: str
    app: str
    procid: str
    msgid: str
    sd: dict[str, dict[str, str]]
    msg: str

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8

    @property
    def fields(self) -> dict[str, str]:
        """The guard@32473 element's params."""
        return self.sd.get("guard@32473", {})


def _unescape(value: str) -> str:
    return re.sub(r'\\(["\\\]])', r"\1", value)


def parse_rfc5424(line: str) -> Syslog5424:
    """Parse one RFC 5424 line strictly; ParseError says where it went wrong."""
    head = _HEADER.match(line)
    if head is None:
        raise ParseError(f"bad RFC 5424 header: {line[:120]!r}")
    rest = line[head.end():]
    sd: dict[str, dict[str, str]] = {}
    if rest.startswith("-"):
        rest = rest[1:]
    else:
        if not rest.startswith("["):
            raise ParseError(f"no structured data: {rest[:80]!r}")
        while rest.startswith("["):
            element = _ELEMENT.match(rest)
            if element is None:
                raise ParseError(f"bad SD-ELEMENT: {rest[:160]!r}")
            params: dict[str, str] = {}
            for param in _PARAM.finditer(element.group("params")):
                if param.group("name") in params:
                    raise ParseError(f"duplicate SD-PARAM {param.group('name')}")
                params[param.group("name")] = _unescape(param.group("value"))
            sd[element.group("id")] = params
            rest = rest[element.end():]
    if rest and not rest.startswith(" "):
        raise ParseError(f"no space before MSG: {rest[:80]!r}")
    if "\n" in rest:
        raise ParseError("a newline inside one message")
    return Syslog5424(
        pri=int(head.group("pri")), time=head.group("time"), host=head.group("host"),
        app=head.group("app"), procid=head.group("procid"), msgid=head.group("msgid"),
        sd=sd, msg=rest[1:],
    )


def guard_messages(lines: list[str]) -> list[Syslog5424]:
    """The lines guard sent, parsed (rsyslog's own lines and probes left out)."""
    found = []
    for line in lines:
        if " guard " in line and line.startswith("<"):
            found.append(parse_rfc5424(line))
    return found


@dataclass(frozen=True)
class RsyslogView:
    """One message as rsyslogd's RFC 5424 parser saw it (its property names)."""

    protocol_version: str  # "1" only when rsyslogd parsed the line as RFC 5424
    pri: str
    timereported: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    msg: str


# --- the daemon -----------------------------------------------------------------------


def free_port(kind: int) -> int:
    """A port nothing listens on right now on 127.0.0.1 (rsyslog binds it at once)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Rsyslog:
    directory: Path
    unix: bool = False  # datagram socket at ``unix_path``
    unix_stream: bool = False  # stream socket at ``unix_stream_path`` (imptcp)
    udp: bool = False
    tcp: bool = False
    udp_port: int = 0
    tcp_port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _probes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.udp and not self.udp_port:
            self.udp_port = free_port(socket.SOCK_DGRAM)
        if self.tcp and not self.tcp_port:
            self.tcp_port = free_port(socket.SOCK_STREAM)

    # paths of the instance
    @property
    def unix_path(self) -> Path:
        return self.directory / "log.sock"

    @property
    def unix_stream_path(self) -> Path:
        return self.directory / "stream.sock"

    @property
    def messages(self) -> Path:
        return self.directory / "messages"

    @property
    def parsed(self) -> Path:
        """rsyslogd's own parse of each message (see ``parsed_lines``)."""
        return self.directory / "parsed"

    @property
    def pidfile(self) -> Path:
        return self.directory / "rsyslogd.pid"

    @property
    def config(self) -> Path:
        return self.directory / "rsyslog.conf"

    @property
    def log(self) -> Path:
        return self.directory / "rsyslogd.log"

    def config_text(self) -> str:
        work = self.directory / "work"
        work.mkdir(exist_ok=True)
        lines = [
            f'global(workDirectory="{work}" maxMessageSize="64k")',
            # %rawmsg%: the bytes as received, so the test parses what guard wrote
            'template(name="raw" type="string" string="%rawmsg%\\n")',
            # rsyslog's own reading of each message, fields joined by a tab: proves
            # a real syslog daemon parses the line as RFC 5424, not only that the
            # bytes passed through
            'template(name="parsed" type="string" string="%protocol-version%\\t%pri%\\t'
            '%timereported:::date-rfc3339%\\t%hostname%\\t%app-name%\\t%procid%\\t'
            '%msgid%\\t%structured-data%\\t%msg%\\n")',
        ]
        if self.unix:
            lines += [
                'module(load="imuxsock" SysSock.Use="off")',
                f'input(type="imuxsock" Socket="{self.unix_path}" CreatePath="on" '
                'RateLimit.Interval="0" UseSpecialParser="off" IgnoreTimestamp="off")',
            ]
        if self.unix_stream:
            lines += [
                'module(load="imptcp")',
                f'input(type="imptcp" path="{self.unix_stream_path}" unlink="on" '
                'SupportOctetCountedFraming="on")',
            ]
        if self.udp:
            lines += ['module(load="imudp")',
                      f'input(type="imudp" address="127.0.0.1" port="{self.udp_port}")']
        if self.tcp:
            lines += ['module(load="imtcp")',
                      f'input(type="imtcp" address="127.0.0.1" port="{self.tcp_port}" '
                      'SupportOctetCountedFraming="on")']
        lines.append(f'*.* action(type="omfile" file="{self.messages}" template="raw" '
                     'flushOnTXEnd="on" asyncWriting="off")')
        lines.append(f'*.* action(type="omfile" file="{self.parsed}" template="parsed" '
                     'flushOnTXEnd="on" asyncWriting="off")')
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> None:
        if self.process is not None:
            raise RuntimeError("rsyslogd already running")
        self.config.write_text(self.config_text())
        self.pidfile.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [RSYSLOGD, "-n", "-f", str(self.config), "-i", str(self.pidfile)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Every input answers: a probe sent to each shows up in the output file."""
        deadline = time.monotonic() + timeout
        for name, send in self._probe_senders().items():
            self._probes += 1
            tag = f"guard-test-probe-{name}-{os.getpid()}-{self._probes}"
            while True:
                if self.process is None or self.process.poll() is not None:
                    raise RuntimeError(f"rsyslogd exited at start: {self.log.read_text()}")
                with contextlib.suppress(OSError):
                    send(tag)
                if any(tag in line for line in self.lines()):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rsyslogd input {name} not ready: {self.log.read_text()}")
                time.sleep(0.05)

    def _probe_senders(self) -> dict[str, Callable[[str], None]]:
        def message(tag: str) -> bytes:
            return f"<13>1 - - probe - - - {tag}".encode()

        senders: dict[str, Callable[[str], None]] = {}
        if self.unix:
            def unix(tag: str) -> None:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                    s.sendto(message(tag), str(self.unix_path))
            senders["unix"] = unix
        if self.unix_stream:
            def unix_stream(tag: str) -> None:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(self.unix_stream_path))
                    data = message(tag)
                    s.sendall(f"{len(data)} ".encode() + data)
            senders["unix_stream"] = unix_stream
        if self.udp:
            def udp(tag: str) -> None:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(message(tag), ("127.0.0.1", self.udp_port))
            senders["udp"] = udp
        if self.tcp:
            def tcp(tag: str) -> None:
                with socket.create_connection(("127.0.0.1", self.tcp_port), timeout=1) as s:
                    data = message(tag)
                    s.sendall(f"{len(data)} ".encode() + data)
            senders["tcp"] = tcp
        return senders

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def lines(self) -> list[str]:
        try:
            data = self.messages.read_bytes()
        except FileNotFoundError:
            return []
        return [line for line in data.decode("utf-8", "replace").split("\n") if line]

    def parsed_lines(self) -> list[RsyslogView]:
        """What rsyslogd itself made of each message it received."""
        try:
            data = self.parsed.read_bytes()
        except FileNotFoundError:
            return []
        views = []
        for line in data.decode("utf-8", "replace").split("\n"):
            parts = line.split("\t", 8)
            if len(parts) == 9:
                views.append(RsyslogView(*parts))
        return views

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 10.0,
                 interval: float = 0.05) -> list[str]:
        """Poll the output file until ``predicate(lines)``; TimeoutError with the lines."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            if predicate(lines):
                return lines
            if time.monotonic() > deadline:
                tail = "\n".join(lines[-20:])
                raise TimeoutError(f"rsyslogd did not receive what was expected; got:\n{tail}")
            time.sleep(interval)

    def __enter__(self) -> Rsyslog:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
