"""``guard run`` as a real daemon in a test, and a client that connects on request.

    with running_daemon(policies, host_cgroup=top, syslog=f"unix:{path}", work=tmp) as guard:
        guard.status()["generation"]            # the status socket, asked in-process
        guard.sighup(); guard.wait_reloaded()   # RELOADING=1 then READY=1, as systemd hears them

The daemon runs as a subprocess (``python -m guard run``) with NOTIFY_SOCKET set
to an abstract socket the test listens on, its programs attached to a cgroup
the test made (``--host-cgroup``), so it judges nothing else on the machine.
Leaving the context stops it (SIGTERM, SIGKILL after a timeout) and checks
that no program stays attached to that cgroup.

``ConnectProbe`` is one long-lived process inside a test cgroup that owns
loopback listeners and, on each request, makes one real connect() to one of
them and answers its errno: a probe costs a pipe round trip, not an
interpreter start, so a test can poll for a new verdict every few
milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from support import sdnotify
from support.cgroup import TestCgroup, attached_programs
from support.sdnotify import REPO

START_TIMEOUT = 120.0  # bcc compiles every program family at start
NET_ATTACH_TYPES = (1, 10, 11, 14, 15)  # inet egress, connect4/6, udp sendmsg4/6


def attached_total(directory: Path) -> int:
    """Programs attached to a cgroup, over the network attach types guard uses."""
    return sum(attached_programs(directory, t) for t in NET_ATTACH_TYPES)


class NotifyListener(sdnotify.NotifyListener):
    """The sd_notify socket, heard the way systemd hears it (support.sdnotify); a
    message ``wait_for`` returned is taken, so the next call finds the next one."""

    def wait_for(self, predicate: Callable[[str], bool], timeout: float,
                 proc: subprocess.Popen[bytes] | None = None) -> tuple[float, str]:
        """The first message heard and not yet taken that matches ``predicate``; takes it."""
        index = self.first(predicate, timeout, alive=sdnotify.running(proc), take=True)
        return self.history[index]

    def wait_sequence(self, mark: int, first: str, then: str, timeout: float,
                      proc: subprocess.Popen[bytes] | None = None) -> None:
        """A message containing ``first`` heard after ``mark``, and ``then`` after it."""
        deadline = time.monotonic() + timeout
        alive = sdnotify.running(proc)
        found = self.first(lambda m: first in m, timeout, after=mark, alive=alive, what=first)
        self.first(lambda m: then in m, deadline - time.monotonic(), after=found + 1,
                   alive=alive, what=f"{then} after {first}")


@dataclass
class GuardDaemon:
    proc: subprocess.Popen[bytes]
    notify: NotifyListener
    state_dir: Path
    policies: Path
    stderr: Path
    started: float
    ready_after: float = 0.0

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        try:
            heard, _ = self.notify.wait_for(lambda m: "READY=1" in m, timeout, self.proc)
        except (AssertionError, TimeoutError) as error:
            raise AssertionError(f"{error}; its stderr ends:\n{self.stderr_text()[-6000:]}"
                                 ) from None
        self.ready_after = heard - self.started

    def status(self) -> dict[str, Any]:
        """``guard status`` through the status socket, from this process (fast)."""
        from guard.service.control import query

        reply = query(str(self.state_dir))
        assert reply.get("ok"), reply
        body: dict[str, Any] = reply["status"]
        return body

    def status_cli(self) -> dict[str, Any]:
        """``guard status --json``, the command a user runs."""
        done = subprocess.run(
            [sys.executable, "-m", "guard", "status", "--json", "--state-dir",
             str(self.state_dir)], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        body: dict[str, Any] = json.loads(done.stdout)
        return body

    def sighup(self) -> int:
        """Send SIGHUP; the notify mark to pass to ``wait_reloaded``."""
        mark = self.notify.mark()
        self.proc.send_signal(signal.SIGHUP)
        return mark

    def wait_reloaded(self, mark: int, timeout: float = 30.0) -> None:
        """A RELOADING=1 heard after ``mark``, and the READY=1 after it (the reload ended)."""
        self.notify.wait_sequence(mark, "RELOADING=1", "READY=1", timeout, self.proc)

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool],
                    timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = self.status()
            if predicate(body):
                return body
            if time.monotonic() > deadline:
                raise TimeoutError(f"status never matched; last: {json.dumps(body)[:2000]}")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        code = sdnotify.stop(self.proc, timeout, dump_stacks=True)
        self.notify.close()
        return code

    def stderr_text(self) -> str:
        return self.stderr.read_text(errors="replace")


def start_daemon(policies: Path, host_cgroup: str, syslog: str, work: Path, name: str,
                 extra: Sequence[str] = ()) -> GuardDaemon:
    notify = NotifyListener()
    state_dir = work / f"state-{name}"
    stderr = work / f"guard-{name}.stderr"
    proc = sdnotify.spawn(
        [sys.executable, "-m", "guard", "run", "--policies", str(policies), "--syslog", syslog,
         "--host-cgroup", host_cgroup, "--state-dir", str(state_dir), *extra],
        notify, stderr, env={"PYTHONFAULTHANDLER": "1"})
    return GuardDaemon(proc, notify, state_dir, policies, stderr, time.monotonic())


@contextlib.contextmanager
def running_daemon(policies: Path, host: TestCgroup, syslog: str, work: Path, name: str,
                   extra: Sequence[str] = (), ready_timeout: float = START_TIMEOUT,
                   check_detached: bool = True) -> Iterator[GuardDaemon]:
    guard = start_daemon(policies, host.path, syslog, work, name, extra)
    try:
        guard.wait_ready(ready_timeout)
        yield guard
    except BaseException:
        guard.stop()  # the test's own failure is the one to report
        raise
    code = guard.stop()
    # nothing may stay attached to the test's cgroup, and the daemon stops cleanly
    left = attached_total(host.directory) if check_detached else 0
    assert left == 0 and code == 0, (f"guard exited with {code}, {left} programs left "
                                     f"attached:\n{guard.stderr_text()[-4000:]}")


# --- a client that connects on request -------------------------------------------------

PROBE = textwrap.dedent("""\
    import json, socket, sys
    listeners = []
    for _ in range(int(sys.argv[1])):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.setblocking(False)
        listeners.append(listener)
    print(json.dumps([l.getsockname()[1] for l in listeners]), flush=True)
    for line in sys.stdin:
        i = int(line)
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", listeners[i].getsockname()[1]))
            result = 0
        except OSError as error:
            result = error.errno or -1
        finally:
            s.close()
        try:
            while True:
                listeners[i].accept()[0].close()
        except BlockingIOError:
            pass
        print(result, flush=True)
    """)


@dataclass
class ConnectProbe:
    """A process in a test cgroup with ``count`` loopback listeners; connects on request."""

    proc: subprocess.Popen[str]
    ports: list[int]
    _stdin: IO[str] = field(repr=False)
    _stdout: IO[str] = field(repr=False)

    @classmethod
    def start(cls, cgroup: TestCgroup, count: int) -> ConnectProbe:
        proc = cgroup.spawn([sys.executable, "-c", PROBE, str(count)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1)
        assert proc.stdin is not None and proc.stdout is not None
        ports = json.loads(proc.stdout.readline())
        return cls(proc, ports, proc.stdin, proc.stdout)

    def connect(self, port: int) -> int:
        """errno of one real connect() to ``port`` (one of ours) from the cgroup; 0: connected."""
        self._stdin.write(f"{self.ports.index(port)}\n")
        self._stdin.flush()
        line = self._stdout.readline()
        if not line:
            raise AssertionError(f"the probe exited ({self.proc.poll()})")
        return int(line)

    def verdicts(self) -> dict[int, int]:
        return {port: self.connect(port) for port in self.ports}

    def wait_for(self, expected: dict[int, int], timeout: float = 5.0,
                 since: float | None = None, interval: float = 0.005) -> float:
        """Poll until every port gets its expected errno; seconds since ``since``
        (or since the call). AssertionError with the last verdicts after ``timeout``."""
        start = time.monotonic() if since is None else since
        deadline = time.monotonic() + timeout
        while True:
            seen = {port: self.connect(port) for port in expected}
            if seen == expected:
                return time.monotonic() - start
            if time.monotonic() > deadline:
                raise AssertionError(f"after {timeout} s: {seen}, expected {expected}")
            time.sleep(interval)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            self._stdout.close()
