"""The control socket: ``guard status`` and ``guard stop`` talk to the daemon here.

The daemon listens on STATE_DIR/status.sock (a unix stream socket, 0600, in a
0700 directory): one JSON line in, one JSON line out. ``ControlServer`` is the
daemon's side (a thread of its own that answers from counters only), ``query``
the commands' side, ``status`` and ``stop`` the two commands, and
``format_status`` the human-readable status.

Who may ask what is decided here, once, for every command (firewalld's
decorator idea, STYLE.md): the caller is identified by the kernel, not by
anything it says: SO_PEERCRED gives its pid and uid at connect time, and, where
the kernel has SO_PEERPIDFD (6.5+), a pidfd that pins that very process, so a
pid recycled after the caller exits cannot be mistaken for it. Its cgroup comes
from /proc/PID/cgroup. Commands in READ_ONLY are answered for anyone who can
open the socket; every other command (``stop``, and every command added later,
by default) is refused when the caller is not root or when ``authorize`` (the
daemon's scope rule: the deepest policy scope covering the caller's cgroup is
not the host cgroup) names a reason, and the refusal is reported through
``on_refused`` as a ``kind=tamper`` event naming the caller. A caller whose
identity cannot be established is refused (fail closed).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guard.errors import ExitCode
from guard.kernel.cgroups import cgroup_of_pid
from guard.kernel.pin import describe_pinned, pinned_summary, process_gone, remove_all
from guard.service import memory
from guard.service.report import format_families, format_policies

STATUS_SOCKET = "status.sock"
READ_ONLY = frozenset({"status", "events"})  # every other command changes something
SO_PEERPIDFD = 77  # include/uapi/asm-generic/socket.h (Linux 6.5); not in Python 3.11
REQUEST_LIMIT = 65_536


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of a control connection, as the kernel says."""

    pid: int
    ppid: int
    uid: int
    gid: int
    cgroup: str | None  # None: could not be read (the process is gone)
    comm: str
    exe: str
    # how the pid was tied to the connecting process: "pidfd" (SO_PEERPIDFD, and it
    # was still alive after the reads), "pid" (a kernel without SO_PEERPIDFD), or
    # "gone" (the pidfd's process exited: what was read may be a recycled pid's)
    identity: str


def _pidfd_of(conn: socket.socket) -> int | None:
    try:
        return int.from_bytes(conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4), "little",
                              signed=True)
    except OSError:
        return None  # before 6.5: the pid alone


def _alive(pidfd: int) -> bool:
    """The process the pidfd pins has not exited (pidfd_send_signal with signal 0)."""
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except OSError:
        return False
    return True


def peer_of(conn: socket.socket, proc: Path = Path("/proc")) -> Caller:
    """The caller of a unix-socket connection, read while it is pinned."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    pidfd = _pidfd_of(conn)
    try:
        cgroup = cgroup_of_pid(pid)
        comm = _read(proc / str(pid) / "comm").strip()
        stat = _read(proc / str(pid) / "stat")
        fields = stat[stat.rfind(")") + 2:].split()
        ppid = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
        try:
            exe = os.readlink(proc / str(pid) / "exe")
        except OSError:
            exe = ""
        # Read after the cgroup: if the pidfd's process is still alive now, the
        # pid was its own while we read, not a recycled one.
        identity = "pid" if pidfd is None else "pidfd" if _alive(pidfd) else "gone"
    finally:
        if pidfd is not None and pidfd >= 0:
            os.close(pidfd)
    return Caller(pid, ppid, uid, gid, cgroup, comm, exe, identity)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


Handler = Callable[[Mapping[str, Any], Caller], dict[str, Any]]
# a command that streams: it takes the connection over (and closes it when done)
StreamHandler = Callable[[socket.socket, Mapping[str, Any], Caller], None]
Authorize = Callable[[Caller], str | None]  # a reason to refuse, or None
OnRefused = Callable[[Caller, str, str], None]  # (caller, command, reason)


class ControlServer:
    """The daemon's end of the control socket."""

    def __init__(self, state_dir: Path, handlers: Mapping[str, Handler], *,
                 authorize: Authorize, on_refused: OnRefused,
                 streams: Mapping[str, StreamHandler] | None = None) -> None:
        self.state_dir = state_dir
        self.path = state_dir / STATUS_SOCKET
        self.handlers = dict(handlers)
        self.streams = dict(streams or {})
        self.authorize = authorize
        self.on_refused = on_refused
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def claim(self) -> None:
        """Bind the socket (RuntimeError when another daemon answers there) and
        start answering."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.path
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale: left by a daemon that died
            else:
                raise RuntimeError(f"another guard daemon answers on {path}; not starting")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the socket is born 0600: no window with wider rights
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(8)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="guard-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed at shutdown
            handed_over = False
            try:
                conn.settimeout(2.0)
                try:
                    request, caller = _read_line(conn), peer_of(conn)
                    stream = self._stream_for(request, caller)
                    if stream is not None:
                        stream[0](conn, stream[1], caller)
                        handed_over = True
                        continue
                    reply = self.answer(request, caller)
                except (OSError, ValueError) as error:
                    reply = {"ok": False, "error": str(error)}
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply, sort_keys=True).encode() + b"\n")
            finally:
                if not handed_over:
                    conn.close()

    def _stream_for(self, request: bytes, caller: Caller
                    ) -> tuple[StreamHandler, Mapping[str, Any]] | None:
        """The stream handler a request asks for and may have, with its body; None
        for any other request (``answer`` replies to it, refusals included)."""
        with contextlib.suppress(ValueError):
            body = json.loads(request or b"{}")
            command = body.get("command") if isinstance(body, dict) else None
            handler = self.streams.get(command) if isinstance(command, str) else None
            if handler is not None and (command in READ_ONLY or self.refusal(caller) is None):
                return handler, body
        return None

    def answer(self, request: bytes, caller: Caller) -> dict[str, Any]:
        """One request: {"command": NAME, ...}; the reply. Authorization first."""
        body = json.loads(request or b"{}")
        if not isinstance(body, dict):
            return {"ok": False, "error": "a request is one JSON object"}
        command = body.get("command", "status")
        handler = self.handlers.get(command) if isinstance(command, str) else None
        if handler is None and command in self.streams:
            handler = _not_a_stream
        if handler is None:
            return {"ok": False, "error": f"unknown command {command!r}"}
        if command not in READ_ONLY:
            reason = self.refusal(caller)
            if reason is not None:
                self.on_refused(caller, str(command), reason)
                return {"ok": False, "error": f"refused: {reason}"}
        return handler(body, caller)

    def refusal(self, caller: Caller) -> str | None:
        """Why a caller may not change anything, or None when it may."""
        if caller.uid != 0:
            return f"uid {caller.uid} is not root"
        if caller.cgroup is None or caller.identity == "gone":
            return f"pid {caller.pid} exited before its cgroup could be read"
        return self.authorize(caller)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def _not_a_stream(_body: Mapping[str, Any], _caller: Caller) -> dict[str, Any]:
    return {"ok": False, "error": "a streaming command (reached only for a refused caller)"}


def _read_line(conn: socket.socket, limit: int = REQUEST_LIMIT) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < limit:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


# --- the commands' side ------------------------------------------------------------------


def query(state_dir: str, command: str = "status", timeout: float = 5.0,
          extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Ask the running daemon; OSError when none answers."""
    path = Path(state_dir) / STATUS_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({**(extra or {}), "command": command}).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise ValueError("malformed reply")
    return reply


def status(args: Any) -> int:
    """``guard status [--json]``."""
    try:
        reply = query(args.state_dir)
    except (OSError, ValueError) as error:
        reason = "no daemon is running" if isinstance(error, FileNotFoundError | \
            ConnectionRefusedError) else str(error)
        print(f"guard status: {reason} (state dir {args.state_dir})", file=sys.stderr)
        pin_dir = Path(getattr(args, "pin_dir", "/sys/fs/bpf/guard"))
        pinned = describe_pinned(pin_dir, Path(args.state_dir))
        for line in pinned:
            print(f"guard status: {line}", file=sys.stderr)
        if getattr(args, "json", False):  # a script always gets JSON on stdout
            print(json.dumps({"running": False, "error": reason, "state_dir": args.state_dir,
                              "pin_dir": str(pin_dir), "pinned": pinned_summary(pin_dir)},
                             indent=2, sort_keys=True))
        return ExitCode.RUNTIME
    if not reply.get("ok"):
        print(f"guard status: {reply.get('error')}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"running": True, "error": str(reply.get("error"))}))
        return ExitCode.RUNTIME
    body = {"running": True, **reply["status"]}
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_status(body))
    return ExitCode.OK


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.05)
    return False


def stop(args: Any) -> int:
    """``guard stop [--unload]``: ask the daemon to stop (and unpin), then, with
    --unload, remove whatever else is pinned (daemons that died). Exit 0 when
    done, 3 when the daemon refused or did not exit in time, or a pin could not
    be removed."""
    pin_dir, state_dir = Path(args.pin_dir), Path(args.state_dir)
    try:
        reply = query(str(state_dir), "stop", extra={"unload": bool(args.unload)})
    except (OSError, ValueError):
        print(f"guard stop: no daemon is running (state dir {state_dir})")
    else:
        if not reply.get("ok"):
            print(f"guard stop: the daemon refused: {reply.get('error')}", file=sys.stderr)
            return ExitCode.RUNTIME
        pid = int(reply["pid"])
        if not _wait_gone(pid, args.timeout):
            print(f"guard stop: daemon pid {pid} did not exit within {args.timeout:g} s",
                  file=sys.stderr)
            return ExitCode.RUNTIME
        kept = reply.get("pins", {}).get("instance")
        print(f"guard stop: daemon pid {pid} stopped" + (
            "" if args.unload or not kept else
            f"; enforcement stays pinned in {pin_dir / str(kept)} (fail-closed)"))
    if not args.unload:
        left = pinned_summary(pin_dir)
        if left:
            print(f"guard stop: pinned (still enforcing): "
                  f"{', '.join(i['instance'] for i in left)}; `guard stop --unload` removes them")
        return ExitCode.OK
    try:
        removed = remove_all(pin_dir, state_dir)
    except OSError as error:
        print(f"guard stop: removing the pins in {pin_dir} failed: {error}", file=sys.stderr)
        return ExitCode.RUNTIME
    for item in removed:
        print(f"guard stop: removed {item.instance} ({len(item.pins)} pins)")
    if pin_dir.exists():
        print(f"guard stop: {pin_dir} is not empty", file=sys.stderr)
        return ExitCode.RUNTIME
    print(f"guard stop: unloaded; nothing is pinned under {pin_dir}")
    return ExitCode.OK


# --- the human-readable status --------------------------------------------------------------


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    text = f"{hours}h{minutes:02d}m{s:02d}s" if hours or days else f"{minutes}m{s:02d}s"
    return f"{days}d{text}" if days else text


def format_status(body: Mapping[str, Any]) -> str:
    """The human-readable ``guard status``."""
    lines = [
        f"guard: running, pid {body['pid']}, up {_duration(body['uptime_s'])}",
        f"revision: {body['revision']}  generation {body['generation']}  "
        f"({len(body['policies'])} policies, {body['rules']} rules) from {body['policies_dir']}",
    ]
    lines.extend(format_families(body))
    lines.extend(format_policies(body))
    ev = body["events"]
    lost = ev["lost"]
    lines.append(f"events: received {ev['received']}, lines {ev['lines']}, "
                 f"aggregated {ev['aggregated']}, pending {ev['pending']}")
    lines.append(f"lost: ring buffer {lost['ringbuf']}, reader {lost['reader']} "
                 f"(malformed {lost['malformed']}), syslog queue {lost['sink']}")
    sink = body["sink"]
    state = "connected" if sink["connected"] else "NOT connected"
    lines.append(f"syslog: {sink['target']} {state}, delivered {sink['delivered']}, "
                 f"queued {sink['queued']}" + (f", last error: {sink['last_error']}"
                                               if sink["last_error"] else ""))
    kernel = body.get("kernel") or {}
    if any(v is not None for v in kernel.values()):
        lines.append("kernel: " + ", ".join(f"{k} {v}" for k, v in kernel.items()
                                            if v is not None))
    watch = body.get("watch")
    if watch is not None:
        lines.append(f"watch: {'on' if watch['enabled'] else 'OFF'}"
                     + (f" ({watch['error']})" if watch.get("error") else "")
                     + ("" if not watch["enabled"] else f", {watch['bursts']} bursts"))
    pins = body.get("pins")
    if pins is not None:
        where = (f" in {pins['dir']}/{pins['instance']}" if pins.get("instance") else "")
        lines.append(f"pins: {pins['mode']}{where}"
                     + (f" (ERROR: {pins['error']})" if pins.get("error") else ""))
        for old in pins.get("taken_over", []):
            lines.append(f"  took over from {old['instance']} (pid {old['pid']}): "
                         f"{old['events_drained']} undelivered events, {old['lost']} lost")
    memory_line = memory.status_line(body.get("memory") or {})
    if memory_line:
        lines.append(memory_line)
    paths = body.get("paths")
    if paths:
        lines.append(f"ERROR: {paths['error']}" if paths.get("error")
                     else f"paths: resolved in the {paths['where']}")
    tamper = body.get("tamper")
    if tamper is not None:
        lines.append(f"tamper protection: {'on' if tamper['enabled'] else 'off'}"
                     + (f", {tamper['denied']} attempts refused" if tamper["enabled"] else "")
                     + (f" (ERROR: {tamper['error']})" if tamper.get("error") else ""))
    hits = body.get("rule_hits") or {}
    if hits:
        lines.append("rule hits (reported decisions): "
                     + ", ".join(f"{rule} {count}" for rule, count in hits.items()))
    last = body.get("last_reload")
    if last:
        verdict = "ok" if last["ok"] else "REJECTED"
        line = f"last reload: {verdict} at {last['time']} ({body['reloads']} reloads)"
        if last.get("summary"):
            line += f": {last['summary']}"
        lines.append(line)
    error = body.get("last_reload_error")
    if error:
        lines.append(f"last reload error at {error['time']} (the set above stays in force):")
        lines.extend(f"  {e}" for e in error["errors"])
    return "\n".join(lines) + "\n"
