"""A private cgroup v2 for a test, and processes started inside it.

    with TestCgroup.create() as cg:              # /guard-test-1a2b3c4d under the cgroup2 mount
        inside = cg.child("in")                  # /guard-test-1a2b3c4d/in
        proc = inside.spawn([sys.executable, "-c", "..."], netns="gt-...")

``spawn`` moves the child into the cgroup (and, when asked, into a network
namespace) between fork and exec, so the program runs there from its first
instruction and every socket it makes belongs to the cgroup.

Teardown only ever touches what the test made: it kills the processes it
spawned, then, should any process remain in one of its cgroups (a grandchild of
one of them), writes ``cgroup.kill`` of that cgroup, which only the test's own
processes can be in, and removes the directories deepest first.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from guard.kernel.cgroups import cgroup2_mount

CLONE_NEWNET = 0x40000000


def setns_net(name: str) -> None:
    """Join the network namespace /run/netns/NAME (between fork and exec)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class TestCgroup:
    path: str  # relative to the cgroup2 mount, e.g. /guard-test-1a2b3c4d/in
    directory: Path
    children: list[TestCgroup] = field(default_factory=list)
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    __test__ = False  # not a pytest test class

    @classmethod
    def create(cls, prefix: str = "guard-test") -> TestCgroup:
        name = f"{prefix}-{secrets.token_hex(4)}"
        directory = cgroup2_mount() / name
        directory.mkdir()
        return cls(path=f"/{name}", directory=directory)

    def child(self, name: str) -> TestCgroup:
        directory = self.directory / name
        directory.mkdir()
        made = TestCgroup(path=f"{self.path}/{name}", directory=directory)
        self.children.append(made)
        return made

    @property
    def id(self) -> int:
        return os.stat(self.directory).st_ino

    def spawn(self, argv: Sequence[str], netns: str | None = None,
              **popen: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this cgroup (and network namespace)."""
        procs = str(self.directory / "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
            if netns is not None:
                setns_net(netns)

        proc: subprocess.Popen[Any] = subprocess.Popen(list(argv), preexec_fn=enter, **popen)
        self.processes.append(proc)
        return proc

    def pids(self) -> list[int]:
        try:
            text = (self.directory / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(x) for x in text.split()]

    def remove(self) -> None:
        for child in reversed(self.children):
            child.remove()
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if not self.directory.exists():
            return
        if self.pids():  # only descendants of our own processes can be here
            with contextlib.suppress(OSError):
                (self.directory / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 5
        while True:
            try:
                self.directory.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> TestCgroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()


@contextlib.contextmanager
def test_cgroup(prefix: str = "guard-test") -> Iterator[TestCgroup]:
    cg = TestCgroup.create(prefix)
    try:
        yield cg
    finally:
        cg.remove()


test_cgroup.__test__ = False  # type: ignore[attr-defined]


def terminate(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """Stop one process the test started: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


BPF_SYSCALL_X86_64 = 321
BPF_PROG_QUERY = 16


def attached_programs(directory: Path, attach_type: int) -> int:
    """How many BPF programs are attached to a cgroup for one attach type.

    BPF_PROG_QUERY through the raw syscall (bcc has no wrapper), so a test can
    prove it left nothing attached. x86_64 only; -1 elsewhere.
    """
    import platform

    if platform.machine() != "x86_64":
        return -1
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # union bpf_attr, query part: target_fd, attach_type, query_flags,
        # attach_flags, prog_ids (u64 pointer), prog_cnt
        attr = (ctypes.c_uint8 * 128)()
        ctypes.c_uint32.from_buffer(attr, 0).value = fd
        ctypes.c_uint32.from_buffer(attr, 4).value = attach_type
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        res = libc.syscall(ctypes.c_long(BPF_SYSCALL_X86_64), ctypes.c_long(BPF_PROG_QUERY),
                           ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
        if res != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"BPF_PROG_QUERY: {os.strerror(err)}")
        return int(ctypes.c_uint32.from_buffer(attr, 24).value)
    finally:
        os.close(fd)
