"""Fail-closed pinning of the LSM programs, in the BPF-LSM guest, through real execs.

Two daemons, one after the other, on the same pin and state directories:

1. daemon A enforces "deny exec of true-a in TOP/in", then is SIGKILLed: no
   cleanup of its own runs, its file descriptors close;
2. the exec stays refused: the pinned links hold the LSM programs;
3. daemon B starts, loads and applies its own programs, then takes over: it
   drains what A's ring buffer kept (the denials while no daemon ran, named by
   their rule), removes A's pins, and A's programs are gone from the kernel;
4. a reload of B works (SIGHUP: now true-b is refused, true-a runs);
5. ``guard stop --unload`` leaves nothing: no pin, B's programs gone, exec allowed.
"""

from __future__ import annotations

import ctypes
import errno
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import need
from support.cgroup import TestCgroup
from support.policies import exec_section, policy_text
from support.rsyslog import Rsyslog, guard_messages
from support.service import GuardService, guard_cli, start_guard

pytestmark = pytest.mark.guest

READY_TIMEOUT = 900.0  # bcc compiles every family under TCG: minutes
RUN = "import subprocess, sys\ntry:\n    subprocess.run([sys.argv[1]], check=True)\n" \
      "    print(0)\nexcept OSError as e:\n    print(e.errno)\n"


def exec_policy(name: str, cgroup: str, denied: Path) -> str:
    return policy_text(name, exec_section(f'{{action: deny, paths: ["{denied}"]}}'), scope=cgroup)


# --- BPF objects, asked of the kernel -----------------------------------------------------


class _LinkInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("_rest", ctypes.c_uint8 * 64)]


def _libbpf() -> ctypes.CDLL:
    from bcc.libbcc import lib

    lib.bpf_obj_get.restype, lib.bpf_obj_get.argtypes = ctypes.c_int, [ctypes.c_char_p]
    lib.bpf_prog_get_fd_by_id.restype = ctypes.c_int
    lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
    return lib  # type: ignore[no-any-return]


def pinned_prog_ids(instance: Path) -> set[int]:
    """The program behind every pinned link of an instance."""
    import os

    lib = _libbpf()
    ids: set[int] = set()
    for pin in instance.iterdir():
        if not pin.name.startswith("link_"):
            continue
        fd = lib.bpf_obj_get(str(pin).encode())
        assert fd >= 0, f"{pin}: {os.strerror(-fd)}"
        try:
            info = _LinkInfo()
            size = ctypes.c_uint32(ctypes.sizeof(info))
            assert lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) == 0
            ids.add(info.prog_id)
        finally:
            os.close(fd)
    return ids


def live_programs(ids: set[int], settle_s: float = 10.0) -> set[int]:
    """Those of ``ids`` the kernel still has, after waiting a moment for them to go
    (a released link is detached and its program freed by deferred kernel work)."""
    import os

    lib = _libbpf()
    deadline = time.monotonic() + settle_s
    while True:
        alive = set()
        for prog_id in ids:
            fd = lib.bpf_prog_get_fd_by_id(prog_id)
            if fd >= 0:
                os.close(fd)
                alive.add(prog_id)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


# --- the site ------------------------------------------------------------------------------


@dataclass
class Site:
    top: TestCgroup
    inside: TestCgroup
    syslog: Rsyslog
    work: Path
    policies: Path
    state_dir: Path
    pin_dir: Path
    true_a: Path
    true_b: Path

    def run(self, binary: Path) -> int:
        """errno of exec'ing ``binary`` inside the scope (0: it ran)."""
        proc = self.inside.spawn([sys.executable, "-c", RUN, str(binary)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        return int(out)

    def start(self, name: str) -> GuardService:
        guard = start_guard(
            ["run", "--policies", str(self.policies), "--syslog",
             f"unix:{self.syslog.unix_path}", "--host-cgroup", self.top.path, "--state-dir",
             str(self.state_dir), "--pin-dir", str(self.pin_dir), "--no-watch"],
            self.state_dir, self.work / f"guard-{name}.stderr")
        try:
            guard.wait_ready(READY_TIMEOUT)
        except BaseException:
            guard.stop()
            print(guard.stderr()[-6000:])
            raise
        print(f"daemon {name}: READY after {guard.ready_after:.0f} s")
        return guard


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    need(shutil.which("rsyslogd") is not None, "rsyslogd is not installed")
    true_a, true_b = tmp_path / "true-a", tmp_path / "true-b"
    for copy in (true_a, true_b):
        shutil.copy2("/usr/bin/true", copy)
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    pin_dir = Path("/sys/fs/bpf/guard-pinning-test")
    syslog = Rsyslog(tmp_path / "rsyslog", unix=True)
    syslog.start()
    try:
        with TestCgroup.create("guard-pinning") as top:
            inside = top.child("in")
            policies = tmp_path / "policies"
            policies.mkdir()
            yield Site(top, inside, syslog, tmp_path, policies, state_dir, pin_dir,
                       true_a, true_b)
    finally:
        done = guard_cli(["stop", "--unload", "--state-dir", str(state_dir), "--pin-dir",
                          str(pin_dir), "--timeout", "120"])
        syslog.stop()
        assert done.returncode == 0, done.stdout + done.stderr
        assert not pin_dir.exists()


def test_sigkill_keeps_enforcement_and_the_next_daemon_takes_over(site: Site) -> None:
    policy = site.policies / "lock.yaml"
    policy.write_text(exec_policy("lock", site.inside.path, site.true_a))
    first = site.start("a")
    try:
        assert site.run(site.true_a) == errno.EPERM
        assert site.run(site.true_b) == 0
        status = first.status()
        assert status["pins"]["mode"] == "fail-closed"
        instance = site.pin_dir / status["pins"]["instance"]
        old_programs = pinned_prog_ids(instance)
        assert len(old_programs) >= 3  # bprm_check, mmap_file, file_mprotect at least

        first.kill()
        for _ in range(3):  # nobody runs guard now: the kernel still refuses
            assert site.run(site.true_a) == errno.EPERM
        assert site.run(site.true_b) == 0
        assert pinned_prog_ids(instance) == old_programs
    finally:
        first.stop()

    second = site.start("b")
    try:
        status = second.status()
        [taken] = status["pins"]["taken_over"]
        assert (taken["pid"], taken["instance"]) == (first.pid, instance.name)
        assert taken["events_drained"] == 3 and taken["lost"] == 0
        assert not instance.exists()
        assert live_programs(old_programs) == set()  # A's programs left the kernel
        assert site.run(site.true_a) == errno.EPERM
        new_instance = site.pin_dir / status["pins"]["instance"]
        new_programs = pinned_prog_ids(new_instance)

        # The three denials nobody read while no daemon ran, delivered by B, with their rule.
        def drained(lines: list[str]) -> list[dict[str, str]]:
            return [m.fields for m in guard_messages(lines) if m.procid == str(second.pid)
                    and m.fields.get("kind") == "exec" and m.fields.get("path", "")
                    .endswith("true-a")]

        lines = site.syslog.wait_for(lambda ls: sum(int(f["count"]) for f in drained(ls)) >= 4,
                                     timeout=120)
        assert {f["rule"] for f in drained(lines)} == {"lock/exec.rules[0]"}

        # A reload works on the programs B loaded.
        mark = len(second.notify.messages)
        policy.write_text(exec_policy("lock", site.inside.path, site.true_b))
        second.proc.send_signal(signal.SIGHUP)
        second.notify.wait_for("READY=1", 300, after=mark)
        assert site.run(site.true_b) == errno.EPERM
        assert site.run(site.true_a) == 0

        done = guard_cli(["stop", "--unload", "--state-dir", str(site.state_dir),
                          "--pin-dir", str(site.pin_dir), "--timeout", "120"])
        assert done.returncode == 0, done.stdout + done.stderr
        assert second.proc.wait(timeout=120) == 0
        assert not site.pin_dir.exists()
        assert live_programs(new_programs) == set()
        assert site.run(site.true_b) == 0 and site.run(site.true_a) == 0
    finally:
        second.stop()
