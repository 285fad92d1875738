"""``guard events``: the daemon's events, live, over the control socket.

The daemon's side is ``EventHub``. The event reader hands it every event it
sends to the syslog target (``publish``, on the daemon's loop). Each connected
``guard events`` gets its own bounded queue and thread:

    reader.send --> EventHub.publish --(filter, put_nowait)--> client queue
        --(the client's thread: sendall)--> the client's socket

``publish`` never waits: a client whose queue is full (it reads too slowly,
or stopped reading) loses the event, counted, and is told how many it lost
(a ``kind=lost`` line, ``source=events-client``) before the next one it gets.
A client that is gone, or takes longer than SEND_TIMEOUT_S to take a line,
is disconnected. So a slow or dead client never blocks the loop that reads the
ring buffer and feeds syslog.

Each line is the JSON-lines record of the ``file:`` target
(guard.events.formats.format_json), so ``guard events --json`` and a
``--syslog file:PATH`` file are read by the same tools. The stream is
read-only (guard.service.control.READ_ONLY): any caller that can open the
socket (root: it is 0600) may watch.

The request: ``{"command": "events", "policy": P, "action": A, "kind": K}``
(each filter optional); the reply: one ``{"ok": true, "stream": "events"}``
line, then one line per event until either side closes.
"""

from __future__ import annotations

import contextlib
import json
import queue
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from guard.events.formats import event_record, format_json
from guard.events.records import AuditEvent

CLIENT_QUEUE = 1_000  # lines waiting for one client before its events are dropped
MAX_CLIENTS = 16
SEND_TIMEOUT_S = 5.0
FILTERS = ("policy", "action", "kind")


@dataclass
class _Client:
    conn: socket.socket
    filters: dict[str, str]
    lines: queue.Queue[str | None] = field(default_factory=lambda: queue.Queue(CLIENT_QUEUE))
    dropped: int = 0  # events this client lost, all time
    told: int = 0  # of those, already reported to it

    def wants(self, event: AuditEvent) -> bool:
        return all(getattr(event, name) == value for name, value in self.filters.items())


def filters_of(body: Mapping[str, Any]) -> dict[str, str]:
    """The request's filters; ValueError for one that is not a string."""
    found: dict[str, str] = {}
    for name in FILTERS:
        value = body.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise ValueError(f"filter {name} must be a string")
        found[name] = value
    return found


def lost_line(count: int, hostname: str, procid: int, time_ns: int) -> str:
    """The line that tells a client how many events its full queue dropped."""
    return json.dumps({"action": "lost", "kind": "lost", "count": count,
                       "source": "events-client", "host": hostname, "procid": procid,
                       "time_ns": time_ns,
                       "message": f"{count} event(s) not shown: this client read too slowly"},
                      separators=(",", ":"))


class EventHub:
    """The live tails: publish from the daemon's loop, one thread per client."""

    def __init__(self, hostname: str, procid: int) -> None:
        self.hostname = hostname
        self.procid = procid
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        self.dropped = 0  # over all clients, all time
        self.served = 0
        self._closed = False

    # -- the daemon's loop ------------------------------------------------------------

    def publish(self, event: AuditEvent) -> None:
        """Offer one event to every client that wants it; never blocks."""
        if not self._clients:  # the common case: nobody watches (a racy read is fine)
            return
        with self._lock:
            clients = [c for c in self._clients if c.wants(event)]
        if not clients:
            return
        line = format_json(event_record(event), self.hostname, self.procid)
        for client in clients:
            try:
                client.lines.put_nowait(line)
            except queue.Full:
                client.dropped += 1
                with self._lock:
                    self.dropped += 1

    # -- the control thread -------------------------------------------------------------

    def serve(self, conn: socket.socket, body: Mapping[str, Any], _caller: object) -> None:
        """Take over a control connection that asked for ``events``; returns at once."""
        try:
            filters = filters_of(body)
        except ValueError as error:
            self._refuse(conn, str(error))
            return
        with self._lock:
            if self._closed or len(self._clients) >= MAX_CLIENTS:
                busy = "the daemon is stopping" if self._closed else \
                    f"{MAX_CLIENTS} clients already watch"
                full = True
            else:
                full = False
                client = _Client(conn, filters)
                self._clients.append(client)
                self.served += 1
        if full:
            self._refuse(conn, busy)
            return
        threading.Thread(target=self._run, args=(client,), name="guard-events",
                         daemon=True).start()

    @staticmethod
    def _refuse(conn: socket.socket, error: str) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"ok": False, "error": error}).encode() + b"\n")
        conn.close()

    def _run(self, client: _Client) -> None:
        conn = client.conn
        try:
            conn.settimeout(SEND_TIMEOUT_S)
            conn.sendall(json.dumps({"ok": True, "stream": "events",
                                     "filters": client.filters}).encode() + b"\n")
            while True:
                try:
                    line = client.lines.get(timeout=1.0)
                except queue.Empty:
                    if _hung_up(conn):
                        return
                    continue
                if line is None:  # the daemon stops
                    return
                out = line + "\n"
                if client.dropped > client.told:
                    missed, client.told = client.dropped - client.told, client.dropped
                    out = lost_line(missed, self.hostname, self.procid, time.time_ns()) \
                        + "\n" + out
                conn.sendall(out.encode("utf-8", "surrogateescape"))
        except OSError:
            return  # gone, or too slow to take a line within SEND_TIMEOUT_S
        finally:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            with contextlib.suppress(OSError):
                conn.close()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"clients": len(self._clients), "served": self.served,
                    "dropped": self.dropped}

    def close(self) -> None:
        """At stop: every client's stream ends after what is queued for it."""
        with self._lock:
            self._closed = True
            clients = list(self._clients)
        for client in clients:
            try:
                client.lines.put_nowait(None)
            except queue.Full:  # it reads too slowly to reach the end: cut it off
                with contextlib.suppress(OSError):
                    client.conn.shutdown(socket.SHUT_RDWR)


def _hung_up(conn: socket.socket) -> bool:
    """The client closed its end (readable with nothing to read), or the socket failed."""
    try:
        readable, _, failed = select.select([conn], [], [conn], 0)
        if failed:
            return True
        if readable:
            return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (OSError, ValueError):
        return True
    return False


# --- the command's side: guard events ---------------------------------------------------


def readable(record: Mapping[str, Any]) -> str:
    """One event record (the JSON line) as one line for people."""
    extra = "".join(f" {name}={record[name]}" for name in ("ppid", "exe")
                    if record.get(name) not in (None, "", 0))
    when = record.get("time") or ""
    return f"{when} {record.get('message', '')}{extra}".strip()


def stream_events(path: str, filters: Mapping[str, str], timeout: float = 5.0
                  ) -> Iterator[dict[str, Any]]:
    """Connect to the daemon's control socket at ``path`` and yield its events as
    they come; OSError when no daemon answers, RuntimeError when it refuses."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({**filters, "command": "events"}).encode() + b"\n")
        reader = sock.makefile("rb")
        first = reader.readline()
        if not first:
            raise ConnectionError("the daemon closed the connection")
        reply = json.loads(first)
        if not reply.get("ok"):
            raise RuntimeError(str(reply.get("error")))
        sock.settimeout(None)  # events come when they come
        for raw in reader:
            with contextlib.suppress(ValueError):
                record = json.loads(raw)
                if isinstance(record, dict):
                    yield record
    finally:
        sock.close()


def events_command(args: Any) -> int:
    """``guard events [--json] [--policy P] [--action A] [--kind K] [--count N]``."""
    from pathlib import Path

    from guard.errors import ExitCode
    from guard.service.control import STATUS_SOCKET

    filters = {name: value for name in FILTERS if (value := getattr(args, name, None))}
    path = str(Path(args.state_dir) / STATUS_SOCKET)
    shown = 0
    try:
        for record in stream_events(path, filters):
            print(json.dumps(record, ensure_ascii=False, separators=(",", ":"))
                  if args.json else readable(record), flush=True)
            shown += 1
            if args.count and shown >= args.count:
                return ExitCode.OK
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"guard events: no daemon is running (state dir {args.state_dir})",
              file=sys.stderr)
        return ExitCode.RUNTIME
    except RuntimeError as error:
        print(f"guard events: the daemon refused: {error}", file=sys.stderr)
        return ExitCode.RUNTIME
    except OSError as error:
        print(f"guard events: {error}", file=sys.stderr)
        return ExitCode.RUNTIME
    print("guard events: the daemon ended the stream (it stopped)", file=sys.stderr)
    return ExitCode.RUNTIME


__all__ = ["CLIENT_QUEUE", "EventHub", "events_command", "filters_of", "lost_line",
           "readable", "stream_events"]
