"""A real ``guard run`` gives back the compile's memory after start, and still enforces.

One daemon (network family) with one policy that denies one loopback port to a
cgroup the test made. Measured from outside, in /proc/PID of the daemon:

- the resident set falls well below its peak once the release after load has
  run (VmHWM - VmRSS): without it the two are equal (163 / 163 MB measured),
  and the anonymous part (RssAnon) well below the daemon's reading just before
  the release (malloc_trim);
- none of the compiler libraries' read-only file pages stays resident.
  MADV_PAGEOUT leaves alone a page another process maps too, and every bcc
  user on the machine (this test process included: it probes the network
  family) maps the same libLLVM: so the daemon is given copies of its own
  (LD_LIBRARY_PATH), which no other process maps, and the test proves that
  the release emptied them (~80 MB resident without it);
- the release is in the log (a syslog line at a real rsyslogd) and in
  ``guard status`` (the "memory" field and its text line);

and afterwards the policy is still enforced by real connect() calls from the
cgroup: right after the release, after a burst of denied connects, and after a
reload that moves the denial to the other port, without the compiler pages
coming back.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.cgroup import TestCgroup
from support.daemon import ConnectProbe, GuardDaemon, running_daemon
from support.lab import syslog_and_cgroup
from support.policies import egress, policy_text, tcp_rule
from support.rsyslog import Rsyslog, guard_messages

from guard.service.control import format_status

GIVEN_BACK_MB = 20.0  # at least: glibc's free heap alone was 34 MB of the 10-rule start
HEAP_BACK_MB = 10.0  # at least, of the anonymous memory
COMPILER_RESIDENT_MB = 2.0  # what may be read back by the time the test looks
BURST = 500


@dataclass
class Lab:
    top: TestCgroup
    inside: TestCgroup
    probe: ConnectProbe
    syslog: Rsyslog
    work: Path


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with syslog_and_cgroup(tmp_path) as (top, syslog):
        inside = top.child("in")
        probe = ConnectProbe.start(inside, 2)
        try:
            yield Lab(top, inside, probe, syslog, tmp_path)
        finally:
            probe.close()


def deny(port: int, cgroup: str) -> str:
    return policy_text("one-port", egress(tcp_rule("deny", port)), scope=cgroup)


def proc_status_mb(pid: int) -> dict[str, float]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {name: int(kb) / 1024 for name, kb in
            re.findall(r"^(VmRSS|VmHWM|RssAnon|RssFile):\s+(\d+) kB", text, re.MULTILINE)}


def compiler_libraries() -> list[Path]:
    """The libLLVM/libclang files bcc loads here, as the dynamic loader resolves them."""
    maps = subprocess.run([sys.executable, "-c", "import bcc; print(open('/proc/self/maps')"
                           ".read())"], capture_output=True, text=True, timeout=60, check=True)
    return sorted({Path(p) for p in re.findall(r"(/\S*/lib(?:LLVM|clang)[-.]\S*)$",
                                                maps.stdout, re.MULTILINE)})


def compiler_file_pages(pid: int) -> tuple[float, set[str]]:
    """(MB of file pages resident, paths) over the read-only mappings of libLLVM/libclang
    in ``pid``; pages the dynamic linker relocated are anonymous and not counted."""
    kb = 0
    paths: set[str] = set()
    chosen = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = re.match(r"^[0-9a-f]+-[0-9a-f]+ (\S{4}) \S+ \S+ \d+\s*(.*)$", line)
        if head:
            perms, path = head.groups()
            chosen = "w" not in perms and re.match(r"lib(LLVM|clang)[-.]",
                                                   Path(path).name) is not None
            if chosen:
                paths.add(path)
        elif chosen and line.startswith("Rss:"):
            kb += int(line.split()[1])
        elif chosen and line.startswith("Anonymous:"):
            kb -= int(line.split()[1])
    return kb / 1024, paths


def released(guard: GuardDaemon) -> dict[str, Any]:
    body = guard.wait_status(lambda s: (s.get("memory") or {}).get("release") is not None)
    memory: dict[str, Any] = body["memory"]
    return memory


def check_compiler_pages_out(pid: int, copies: Path, when: str) -> None:
    resident, paths = compiler_file_pages(pid)
    assert paths and all(p.startswith(f"{copies}/") for p in paths), paths
    assert resident < COMPILER_RESIDENT_MB, (
        f"{when}: {resident:.1f} MB of the compiler libraries' file pages are resident")


@pytest.fixture
def own_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Copies of the compiler libraries that only the daemon started next will map."""
    copies = tmp_path / "compiler-libs"
    copies.mkdir()
    libraries = compiler_libraries()
    assert {p.name.split(".")[0].split("-")[0] for p in libraries} == {"libLLVM", "libclang"}, \
        libraries
    try:
        for library in libraries:
            shutil.copyfile(library, copies / library.name)
            with open(copies / library.name, "rb") as f:
                os.fsync(f.fileno())  # clean pages, as an installed library's are
        monkeypatch.setenv("LD_LIBRARY_PATH", str(copies))
        yield copies
    finally:
        shutil.rmtree(copies, ignore_errors=True)


def test_memory_released_after_start_and_enforcement_unchanged(
        lab: Lab, own_compiler: Path) -> None:
    a, b = lab.probe.ports
    policies = lab.work / "policies"
    policies.mkdir()
    (policies / "one-port.yaml").write_text(deny(a, lab.inside.path))
    with running_daemon(policies, lab.top, f"unix:{lab.syslog.unix_path}", lab.work,
                        "memory", extra=["--no-watch"]) as guard:
        pid = guard.proc.pid
        memory = released(guard)
        steps = {s["name"]: s for s in memory["release"]["steps"]}
        assert set(steps) == {"gc", "malloc_trim", "pageout"}
        assert all(s["ok"] for s in steps.values()), steps
        mb = proc_status_mb(pid)
        assert mb["VmHWM"] - mb["VmRSS"] >= GIVEN_BACK_MB, mb
        # the heap part: anonymous memory now, from outside, against the daemon's own
        # reading just before the release (glibc's free heap: 34 MB at 10 rules)
        before_anon = memory["release"]["before_mb"]["anon"]
        assert mb["RssAnon"] <= before_anon - HEAP_BACK_MB, (before_anon, mb)
        check_compiler_pages_out(pid, own_compiler, "after start")
        assert memory["release"]["released_mb"] >= GIVEN_BACK_MB

        # still enforcing, right after the release
        assert lab.probe.verdicts() == {a: errno.EPERM, b: 0}

        # a burst of events through the ring buffer and the reader
        for _ in range(BURST):
            assert lab.probe.connect(a) == errno.EPERM
        guard.wait_status(lambda s: s["events"]["received"] >= BURST + 1, timeout=30)
        check_compiler_pages_out(pid, own_compiler, "after a burst of events")

        # a reload: the denial moves to the other port
        (policies / "one-port.yaml").write_text(deny(b, lab.inside.path))
        guard.wait_reloaded(guard.sighup())
        lab.probe.wait_for({a: 0, b: errno.EPERM}, timeout=10)
        check_compiler_pages_out(pid, own_compiler, "after a reload")
        after = proc_status_mb(pid)
        assert after["VmHWM"] - after["VmRSS"] >= GIVEN_BACK_MB, after

        # what an operator sees
        shown = guard.status_cli()
        now = shown["memory"]["now_mb"]
        assert now["rss"] > 0 and now["pss"] <= now["rss"] and now["private"] <= now["pss"]
        assert "memory: resident" in format_status(shown)
        lab.syslog.wait_for(lambda lines: any(
            m.msg.startswith("guard: memory after load: resident")
            for m in guard_messages(lines)), timeout=10)
    # running_daemon: stopped cleanly (exit 0) and nothing left attached to the cgroup
