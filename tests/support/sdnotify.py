"""A guard process a test started, and its sd_notify socket heard as systemd hears it.

One place for what ``support.daemon`` (``guard run`` as a plain subprocess) and
``support.service`` (the daemon as the unit runs it) both need: the listener on
NOTIFY_SOCKET, starting the process with NOTIFY_SOCKET pointing at it, and
stopping it. Each of those modules keeps its own ``NotifyListener.wait_for``
(a predicate that takes the message it matched; a text and an index), built on
``NotifyListener.first`` here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def running(proc: subprocess.Popen[bytes] | None) -> Callable[[], bool]:
    """``alive`` for ``NotifyListener.first``: is ``proc`` (if any) still running."""
    return (lambda: True) if proc is None else (lambda: proc.poll() is None)


class NotifyListener:
    """The sd_notify socket (abstract, datagrams), read by a thread all the time.

    Read continuously as systemd reads it: a sender blocked on a full queue, or
    dropping what does not fit, would be a test artifact. Every message is kept
    in ``history`` in arrival order with its time; ``first`` waits for one.
    """

    def __init__(self, prefix: str = "guard-test-notify") -> None:
        self.name = f"@{prefix}-{secrets.token_hex(6)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.sock.settimeout(0.2)
        self.history: list[tuple[float, str]] = []  # (time.monotonic(), message), in order
        self.count: dict[str, int] = {}  # messages per first line
        self._taken: set[int] = set()  # indices in history that first(take=True) returned
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, name="notify-listener", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            message = data.decode()
            first = message.split("\n", 1)[0]
            with self._cond:
                self.count[first] = self.count.get(first, 0) + 1
                self.history.append((time.monotonic(), message))
                self._cond.notify_all()

    @property
    def messages(self) -> list[str]:
        """Every message heard so far, in order (``len`` of it is a mark)."""
        with self._cond:
            return [message for _, message in self.history]

    @property
    def heard(self) -> list[tuple[float, str]]:
        """The messages not yet taken by ``first(take=True)``."""
        with self._cond:
            return [h for i, h in enumerate(self.history) if i not in self._taken]

    def mark(self) -> int:
        with self._cond:
            return len(self.history)

    def first(self, match: Callable[[str], bool], timeout: float, *, after: int = 0,
              alive: Callable[[], bool] = lambda: True, take: bool = False,
              what: str = "matching sd_notify message") -> int:
        """Index in ``history`` of the first message from ``after`` on that ``match``es
        (and, with ``take``, that no earlier ``take`` returned; it is taken now).
        AssertionError once ``alive()`` is false, TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.history)):
                    if not (take and i in self._taken) and match(self.history[i][1]):
                        if take:
                            self._taken.add(i)
                        return i
                if not alive():
                    raise AssertionError(f"guard exited before {what}; heard {self.history}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {what} within {timeout} s after message {after}; "
                                       f"heard {self.history}")
                self._cond.wait(min(left, 0.2))

    def drain(self) -> None:
        """Take everything heard so far (``history`` and ``count`` stay)."""
        with self._cond:
            self._taken.update(range(len(self.history)))

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        self.sock.close()


def spawn(argv: Sequence[str], notify: NotifyListener, stderr_path: Path,
          env: Mapping[str, str] | None = None,
          preexec: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    """``argv`` from the repository, NOTIFY_SOCKET at ``notify``, stderr to a file;
    ``env`` is added to this process's environment."""
    full = dict(os.environ, **(env or {}), NOTIFY_SOCKET=notify.name)
    with stderr_path.open("wb") as err:
        return subprocess.Popen(argv, cwd=REPO, env=full, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, preexec_fn=preexec)


def stop(proc: subprocess.Popen[bytes], timeout: float, dump_stacks: bool = False) -> int:
    """SIGTERM, SIGKILL after ``timeout``; the exit code. With ``dump_stacks`` a hung
    process first gets SIGABRT, which makes faulthandler (PYTHONFAULTHANDLER) print
    every thread's stack to its stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if dump_stacks:
                proc.send_signal(signal.SIGABRT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode
