"""Where event lines go: targets, transports and the queueing ``Sink``.

Targets (``parse_target``): ``/dev/log`` (the default), ``unix:PATH`` (a
datagram socket, or a stream socket if that is what listens there),
``udp://HOST:PORT``, ``tcp://HOST:PORT`` (RFC 6587 octet-counting framing, also
used on a unix stream socket), and ``file:PATH`` (JSON lines appended, for
machines and tests).

Delivery (``Sink``): every line is queued first and sent from the queue, so a
target that is down, slow or restarting costs a bounded queue, never the event
loop. While the target is down the daemon retries with backoff; when the queue
is full new lines are counted, not kept (the oldest lines of an incident are
the ones an investigator needs first), and the count goes out as a ``kind=lost``
line before anything else once delivery resumes. UDP cannot tell whether a
datagram arrived: a datagram sent before the ICMP error of a dead receiver came
back is lost without a count, which is why tcp:// or a unix socket is the
target to use when every event matters.

"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from guard.events.formats import (
    FACILITY_AUTHPRIV,
    EventFormatter,
    Record,
    event_record,
    format_json,
    format_rfc5424,
)
from guard.events.records import LOST_SINK, AuditEvent, lost_event

# --- targets ---------------------------------------------------------------------


class TargetError(ValueError):
    """A --syslog TARGET that names no transport guard knows."""


@dataclass(frozen=True)
class Target:
    scheme: str  # unix | udp | tcp | file
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme in ("udp", "tcp"):
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{self.scheme}://{host}:{self.port}"
        return f"{self.scheme}:{self.path}"


TARGET_HELP = "/dev/log, unix:PATH, udp://HOST:PORT, tcp://HOST:PORT or file:PATH"


def parse_target(text: str) -> Target:
    if not text:
        raise TargetError(f"empty syslog target; expected {TARGET_HELP}")
    if text.startswith("/"):
        return Target("unix", path=text)
    if text.startswith(("unix:", "file:")):
        scheme, path = text.split(":", 1)
        if path.startswith("//"):  # unix:///run/x.sock
            path = path[2:]
        if not path.startswith("/"):
            raise TargetError(f"syslog target {text!r}: {scheme}: wants an absolute path")
        return Target(scheme, path=path)
    if text.startswith(("udp://", "tcp://")):
        parts = urlsplit(text)
        try:
            port = parts.port
        except ValueError as error:
            raise TargetError(f"syslog target {text!r}: {error}") from None
        if not parts.hostname or port is None:
            raise TargetError(f"syslog target {text!r}: wants {parts.scheme}://HOST:PORT")
        if port == 0:
            raise TargetError(f"syslog target {text!r}: port 0 is not a port to send to")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise TargetError(f"syslog target {text!r}: only {parts.scheme}://HOST:PORT")
        return Target(parts.scheme, host=parts.hostname, port=port)
    raise TargetError(f"unknown syslog target {text!r}; expected {TARGET_HELP}")


# --- transports ------------------------------------------------------------------

# errnos that mean "not now, try the same frame again later"
_AGAIN = {errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS}


class Transport:
    """One connection to a target. ``send`` returns the bytes it took (possibly 0
    when the peer is momentarily full) and raises OSError when the connection is
    broken; the Sink then closes it and reconnects later.

    A ``datagram`` transport takes one frame per ``send``, whole or not at all
    (the syslog datagram protocol: one line per datagram); the others take bytes,
    so the Sink hands them many frames joined in one ``send``.
    """

    stream = False

    @property
    def datagram(self) -> bool:
        return not self.stream

    def open(self) -> None:
        raise NotImplementedError

    def ready(self) -> bool:
        """True once connected (a TCP connect completes asynchronously)."""
        return True

    def send(self, frame: bytes) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def frame(self, data: bytes) -> bytes:
        """One encoded line as this connection carries it."""
        if self.stream:
            # RFC 6587 3.4.1 octet counting: a newline inside a message cannot split it
            return b"%d " % len(data) + data
        return data

    def fileno(self) -> int | None:
        """The descriptor to wait on for room to write, if there is one."""
        return None


class _SocketTransport(Transport):
    def __init__(self) -> None:
        self.sock: socket.socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    def fileno(self) -> int | None:
        return self.sock.fileno() if self.sock is not None else None

    def _send(self, frame: bytes) -> int:
        if self.sock is None:
            raise ConnectionError(errno.ENOTCONN, "not connected")
        if self.stream:
            self._check_alive(self.sock)
        try:
            return self.sock.send(frame)
        except OSError as error:
            if error.errno in _AGAIN:
                return 0
            raise

    @staticmethod
    def _check_alive(sock: socket.socket) -> None:
        """A syslog receiver never writes to us: readable means it closed (or
        reset) the connection. Checking before each write keeps lines from being
        written into a connection that is already dead, where they would vanish."""
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return
        try:
            data = sock.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if not data:
            raise ConnectionResetError(errno.ECONNRESET, "the receiver closed the connection")


class UnixTransport(_SocketTransport):
    """A unix socket: datagram like /dev/log, or stream if that is what listens."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def open(self) -> None:
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(self.path)
            self.stream = False
        except OSError as error:
            sock.close()
            if error.errno != errno.EPROTOTYPE:
                raise
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            self.stream = True
        sock.setblocking(False)
        self.sock = sock

    def send(self, frame: bytes) -> int:
        return self._send(frame)


class UdpTransport(_SocketTransport):
    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.host, self.port = host, port

    def open(self) -> None:
        self.close()
        info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
        sock = socket.socket(info[0], socket.SOCK_DGRAM)
        try:
            sock.connect(info[4])  # connected: ICMP errors come back as ECONNREFUSED
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock

    def send(self, frame: bytes) -> int:
        return self._send(frame)


class TcpTransport(_SocketTransport):
    """Non-blocking connect, so a dead or slow target never stalls the daemon."""

    stream = True

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.host, self.port = host, port
        self._connected = False

    def open(self) -> None:
        self.close()
        info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(info[4])
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            raise ConnectionRefusedError(code, os.strerror(code))
        self.sock = sock
        self._connected = code == 0

    def ready(self) -> bool:
        if self._connected:
            return True
        if self.sock is None:
            return False
        _, writable, _ = select.select([], [self.sock], [], 0)
        if not writable:
            return False
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise ConnectionRefusedError(code, os.strerror(code))
        self._connected = True
        return True

    def close(self) -> None:
        super().close()
        self._connected = False

    def send(self, frame: bytes) -> int:
        return self._send(frame)


class FileTransport(Transport):
    """JSON lines appended to a file (opened per write burst: rotation-safe)."""

    @property
    def datagram(self) -> bool:
        return False  # a write may be short: the sink resumes from where it stopped

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def open(self) -> None:
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o600)

    def frame(self, data: bytes) -> bytes:
        return data + b"\n"

    def send(self, frame: bytes) -> int:
        if self._fd is None:
            raise OSError(errno.EBADF, "not open")
        # O_APPEND writes of one line are atomic for regular files; a short write
        # is retried by the sink from the offset it returned
        return os.write(self._fd, frame)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def transport_for(target: Target) -> Transport:
    if target.scheme == "unix":
        return UnixTransport(target.path)
    if target.scheme == "udp":
        return UdpTransport(target.host, target.port)
    if target.scheme == "tcp":
        return TcpTransport(target.host, target.port)
    if target.scheme == "file":
        return FileTransport(target.path)
    raise TargetError(f"no transport for {target}")


# --- the sink: queue, delivery, reconnect --------------------------------------------


@dataclass(frozen=True)
class SinkStats:
    target: str
    connected: bool
    delivered: int  # lines fully handed to the target
    queued: int  # lines waiting
    overflow: int  # lines never kept because the queue was full (all time)
    overflow_unreported: int  # of those, not yet reported in the stream
    reconnects: int
    last_error: str


class Sink:
    """A bounded queue in front of one transport. Not thread-safe: the daemon's
    main loop owns it. Call ``pump`` from the loop; ``retry_in`` says when, and
    ``wait_fd`` what to wait on when the peer was full.

    ``submit`` queues a line and delivers at once; ``queue``/``queue_event`` only
    queue, for a caller that makes many lines and then calls ``pump`` once (the
    daemon, per batch of records): a stream target then gets them in a few large
    writes rather than one system call per line.
    """

    # a write to a byte transport carries up to this much (whole lines)
    BATCH_BYTES = 64 * 1024

    def __init__(
        self,
        target: Target,
        *,
        queue_size: int = 10_000,
        hostname: str | None = None,
        procid: int | None = None,
        facility: int = FACILITY_AUTHPRIV,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
        clock: Callable[[], float] | None = None,
        transport: Transport | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.target = target
        self.transport = transport or transport_for(target)
        self.queue_size = queue_size
        self.hostname = hostname or socket.gethostname()
        self.procid = procid if procid is not None else os.getpid()
        self.facility = facility
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self.clock = clock or time.monotonic
        self.json = target.scheme == "file"
        self._events = EventFormatter(self.hostname, self.procid, facility)
        # Lines encoded, framed only when sent: whether a unix target is a stream
        # (and so wants octet counting) is known only once it is connected.
        self._queue: deque[bytes] = deque()
        # Byte transports: the queue's first lines framed and joined for this
        # connection, where each one ends in it, and how much of it went out.
        self._batch: bytes | None = None
        self._batch_ends: list[int] = []
        self._batch_done = 0  # lines of the batch already written (and popped)
        self._offset = 0
        self._open = False
        self._peer_full = False  # the last send found no room
        self._next_try = 0.0
        self._backoff = retry_initial
        self.delivered = 0
        self.overflow = 0
        self._overflow_reported = 0
        self.reconnects = 0
        self.last_error = ""
        self._ever_opened = False

    def format(self, record: Record) -> str:
        if self.json:
            return format_json(record, self.hostname, self.procid, self.facility)
        return format_rfc5424(record, self.hostname, self.procid, self.facility)

    def format_event(self, event: AuditEvent) -> str:
        if self.json:
            return self.format(event_record(event))
        return self._events.line(event)

    def _append(self, line: str) -> None:
        if len(self._queue) >= self.queue_size:
            self.overflow += 1
        else:
            self._queue.append(line.encode("utf-8", "surrogateescape"))

    def queue(self, record: Record) -> None:
        """Queue one line; ``pump`` delivers it."""
        self._append(self.format(record))

    def queue_event(self, event: AuditEvent) -> None:
        """Queue one event's line; ``pump`` delivers it."""
        if len(self._queue) >= self.queue_size:
            self.overflow += 1  # counted before any formatting: a flood's cheap path
        else:
            self._append(self.format_event(event))

    def submit(self, record: Record) -> None:
        """Queue one line and try to deliver what is queued."""
        self.queue(record)
        self.pump()

    def stats(self) -> SinkStats:
        return SinkStats(
            target=str(self.target),
            connected=self._open,
            delivered=self.delivered,
            queued=len(self._queue),
            overflow=self.overflow,
            overflow_unreported=self.overflow - self._overflow_reported,
            reconnects=self.reconnects,
            last_error=self.last_error,
        )

    @property
    def queued(self) -> int:
        return len(self._queue)

    def retry_in(self) -> float | None:
        """Seconds until ``pump`` has work it could not do now; None: nothing waits."""
        if not self._queue and self.overflow == self._overflow_reported:
            return None
        if not self._open:
            return max(0.0, self._next_try - self.clock())
        return 0.05  # connected but the peer was full or connecting: poll again soon

    def wait_fd(self) -> int | None:
        """The descriptor that becomes writable when the peer that was full has
        room again (wait for POLLOUT on it), or None."""
        if self._open and self._peer_full and self._queue:
            return self.transport.fileno()
        return None

    def room(self) -> int | None:
        """Lines the queue takes before it overflows, while connected; None when
        the target is not connected (lines are then queued or counted)."""
        return self.queue_size - len(self._queue) if self._open else None

    def congested(self, high_water: int) -> bool:
        """Connected, the peer full, and at least ``high_water`` lines waiting:
        a producer should make no more lines until the peer reads."""
        return self._open and self._peer_full and len(self._queue) >= high_water

    def pump(self) -> None:
        """Deliver as much of the queue as the target takes right now."""
        if not self._queue and self.overflow == self._overflow_reported:
            return
        if not self._ensure_open():
            return
        try:
            if not self.transport.ready():
                return
            self._report_overflow()
            if self.transport.datagram:
                self._pump_datagrams()
            else:
                self._pump_bytes()
        except OSError as error:
            if error.errno == errno.EMSGSIZE and self._queue and self.transport.datagram:
                # this one line can never go as a datagram: count it, keep the rest
                self._queue.popleft()
                self.overflow += 1
                return
            self._failed(error)

    def _pump_datagrams(self) -> None:
        queue, send, frame = self._queue, self.transport.send, self.transport.frame
        sent = 0
        try:
            while queue:
                if send(frame(queue[0])) <= 0:
                    self._peer_full = True  # keep the line, try again when there is room
                    return
                queue.popleft()
                sent += 1
            self._peer_full = False
        finally:
            self.delivered += sent

    def _pump_bytes(self) -> None:
        """Whole lines joined in writes of up to BATCH_BYTES. A line counts as
        delivered once its last byte is written; a connection that breaks in the
        middle of one sends that line again whole after the reconnect."""
        queue = self._queue
        while queue:
            if self._batch is None:
                frames: list[bytes] = []
                size = 0
                for data in queue:
                    framed = self.transport.frame(data)
                    frames.append(framed)
                    size += len(framed)
                    if size >= self.BATCH_BYTES:
                        break
                self._batch = b"".join(frames)
                self._batch_ends = list(itertools.accumulate(map(len, frames)))
                self._batch_done, self._offset = 0, 0
            batch = self._batch
            sent = self.transport.send(batch[self._offset:] if self._offset else batch)
            if sent <= 0:
                self._peer_full = True
                return  # the peer is full: keep the lines, try again later
            self._peer_full = False
            self._offset += sent
            ends, done = self._batch_ends, self._batch_done
            while done < len(ends) and ends[done] <= self._offset:
                queue.popleft()
                done += 1
            self.delivered += done - self._batch_done
            self._batch_done = done
            if done == len(ends):
                self._drop_batch()  # written whole: nothing of it is pending

    def _drop_batch(self) -> None:
        self._batch, self._batch_ends, self._batch_done, self._offset = None, [], 0, 0

    def _report_overflow(self) -> None:
        """Before the backlog: say how many lines the full queue turned away."""
        pending = self.overflow - self._overflow_reported
        if pending <= 0:
            return
        if self._offset:
            return  # finish the half-sent batch first; its stream must stay framed
        self._drop_batch()  # made from the queue's old head
        line = self.format(event_record(lost_event(pending, LOST_SINK)))
        self._queue.appendleft(line.encode("utf-8", "surrogateescape"))
        self._overflow_reported += pending

    def _ensure_open(self) -> bool:
        if self._open:
            return True
        now = self.clock()
        if now < self._next_try:
            return False
        try:
            self.transport.open()
        except OSError as error:
            self._failed(error)
            return False
        self._open = True
        self._peer_full = False
        if self._ever_opened:
            self.reconnects += 1
        self._ever_opened = True
        self._backoff = self.retry_initial
        # a line half-written on the broken connection is sent again whole
        self._drop_batch()
        return True

    def _failed(self, error: OSError) -> None:
        self.last_error = f"{self.target}: {error.strerror or error}"
        self.transport.close()
        self._open = False
        self._peer_full = False
        self._drop_batch()
        self._next_try = self.clock() + self._backoff
        self._backoff = min(self._backoff * 2, self.retry_max)

    def close(self, timeout: float = 2.0) -> None:
        """Deliver what is queued for up to ``timeout`` seconds, then close."""
        deadline = self.clock() + timeout
        while (self._queue or self.overflow != self._overflow_reported) \
                and self.clock() < deadline:
            self.pump()
            if self._queue:
                time.sleep(min(0.05, max(0.0, self.retry_in() or 0.0)))
        self.transport.close()
        self._open = False
