"""Fixtures and helpers for the exec enforcement tests in the BPF-LSM guest.

One ``Kernel(families={"exec"})`` per pytest session (bcc compiles for 30-60 s
under TCG) with one ``Applier``; each test applies its own plan, compiled from
YAML by the real parser and compiler and scoped to cgroups the test creates,
and the fixture applies an empty plan when the test ends. Children run inside
a test cgroup: the forked child moves itself there before it execs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from guard.events.records import RawEvent, decode
from guard.kernel.cgroups import cgroup2_mount
from guard.policy.compile import compile_policies
from guard.policy.model import PolicySet
from guard.policy.parse import parse_text
from guard.policy.plan import Plan

RUN_TIMEOUT_S = 60
LOADER = "/lib64/ld-linux-x86-64.so.2"


def plan_from_yaml(*documents: str) -> Plan:
    """Parse and compile policy documents; any diagnostic fails the test."""
    policies = []
    for i, text in enumerate(documents):
        found, diagnostics = parse_text(text, f"test-{i}.yaml")
        assert not diagnostics, "\n".join(str(d) for d in diagnostics)
        policies += found
    return compile_policies(PolicySet(tuple(sorted(policies, key=lambda p: p.name))))


def policy_yaml(name: str, cgroups: Sequence[str], *, mode: str = "enforce",
                default: str = "allow", rules: Sequence[tuple[str, Sequence[str]]] = ()) -> str:
    """One policy document with an exec section, scoped to ``cgroups``."""
    lines = [
        "apiVersion: guard/v1",
        "kind: Policy",
        "metadata:",
        f"  name: {name}",
        "spec:",
        f"  mode: {mode}",
        "  scope:",
        f"    cgroups: [{', '.join(repr(c) for c in cgroups)}]",
        "  exec:",
        f"    default: {default}",
    ]
    if rules:
        lines.append("    rules:")
        for action, paths in rules:
            quoted = ", ".join('"' + p + '"' for p in paths)
            lines.append(f"      - {{action: {action}, paths: [{quoted}]}}")
    else:
        lines.append("    rules: []")
    return "\n".join(lines) + "\n"


@dataclass
class Cgroup:
    """A cgroup the test created; ``path`` is relative to the cgroup2 mount."""

    path: str
    directory: Path

    @property
    def id(self) -> int:
        return os.stat(self.directory).st_ino

    def child(self, name: str) -> Cgroup:
        directory = self.directory / name
        directory.mkdir()
        return Cgroup(f"{self.path}/{name}", directory)

    def enter(self) -> Callable[[], None]:
        """For ``preexec_fn``: the forked child moves itself here before exec."""
        procs = str(self.directory / "cgroup.procs")

        def move() -> None:
            with open(procs, "w") as f:
                f.write("0")

        return move

    def run(self, argv: Sequence[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this cgroup; PermissionError when the exec is refused."""
        return subprocess.run([str(a) for a in argv], preexec_fn=self.enter(),
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S, **kwargs)


def remove_cgroup_tree(directory: Path) -> None:
    """rmdir from the leaves up, once the test's children have exited."""
    for sub, _dirs, _files in sorted(os.walk(directory), key=lambda t: -len(t[0])):
        deadline = time.monotonic() + 10
        while True:
            try:
                os.rmdir(sub)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # a child is still exiting


@dataclass
class EventLog:
    """Every event the ring buffer delivered this session, decoded."""

    bpf: Any = field(repr=False)
    events: list[RawEvent] = field(default_factory=list, repr=False)

    def callback(self, _ctx: Any, data: Any, size: int) -> None:
        self.events.append(decode(ctypes.string_at(data, size)))

    def poll(self) -> None:
        self.bpf.ring_buffer_consume()

    def for_cgroup(self, cgroup_id: int, settle_s: float = 0.2) -> list[RawEvent]:
        """Events from one cgroup; submitted before the exec returned, so one poll finds them."""
        time.sleep(settle_s)
        self.poll()
        return [e for e in self.events if e.cgroup_id == cgroup_id]


@dataclass
class GuestGuard:
    """A session's loaded programs and the way tests drive them."""

    kernel: Any = field(repr=False)
    applier: Any = field(repr=False)
    log: EventLog = field(repr=False)

    def apply(self, plan: Plan) -> Any:
        result = self.applier.apply(plan)
        self.last_warnings = result.warnings
        return result

    def apply_yaml(self, *documents: str) -> Plan:
        plan = plan_from_yaml(*documents)
        self.apply(plan)
        return plan

    def clear(self) -> None:
        self.apply(plan_from_yaml())

    def stat(self, index: int) -> int:
        table = self.kernel.map("guard_stats")
        return int(sum(table[ctypes.c_uint32(index)]))

    last_warnings: tuple[str, ...] = ()


@contextlib.contextmanager
def loaded(family: str) -> Iterator[GuestGuard]:
    """One program family compiled, loaded and attached (once per session: bcc
    compiles for tens of seconds under emulation), its ring buffer read into an
    EventLog; every program detached at the end."""
    from guard.kernel.apply import Applier
    from guard.kernel.loader import Kernel

    kernel = Kernel(families={family})
    try:
        log = EventLog(kernel.bpf)
        kernel.map("guard_events").open_ring_buffer(log.callback)
        guard = GuestGuard(kernel, Applier(kernel, settle_s=0.0), log)
        yield guard
        guard.clear()
    finally:
        kernel.close()  # detaches every program


@pytest.fixture(scope="session")
def exec_session() -> Iterator[GuestGuard]:
    """The exec programs, compiled, loaded and attached once per session."""
    with loaded("exec") as guard:
        yield guard


@pytest.fixture
def guard(exec_session: GuestGuard) -> Iterator[GuestGuard]:
    """The session's programs, with no policy applied when the test ends."""
    try:
        yield exec_session
    finally:
        exec_session.clear()


@pytest.fixture
def cgroup() -> Iterator[Cgroup]:
    """A fresh cgroup under the cgroup2 root, removed with its children after the test."""
    name = f"guard-exec-test-{uuid.uuid4().hex[:8]}"
    directory = cgroup2_mount() / name
    directory.mkdir()
    try:
        yield Cgroup(f"/{name}", directory)
    finally:
        remove_cgroup_tree(directory)


def copy_binary(source: str, target: Path) -> Path:
    """An executable copy of a system binary (its own inode), parents created."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    os.chmod(target, 0o755)
    return target

