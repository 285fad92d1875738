"""Tamper resistance, in the BPF-LSM guest, through real syscalls.

One daemon for the module, run as systemd/guard.service runs it (its capability
bounding set, syscall filter, read-only file system; pinned, fail-closed), so
this also proves that the unit's four capabilities are enough for the LSM
families. Two policies:

* ``confined``: scope ``TOP/in``, denies exec of a copy of /usr/bin/true;
* ``everywhere``: no scope (the whole host, i.e. ``--host-cgroup TOP``).

A process in ``TOP/in`` is protected: each way of switching guard off that the
kernel mediates is refused with EPERM, and each refusal is a kind=tamper event
at a real rsyslogd. A process in ``TOP`` (covered by the whole-host policy only)
and the test itself (outside every scope) are not protected: they can still
call bpf(), which is how ``guard stop --unload`` works at the end.
"""

from __future__ import annotations

import ctypes
import errno
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import need
from support.cgroup import TestCgroup
from support.rsyslog import Rsyslog, Syslog5424, guard_messages
from support.service import GuardService, guard_cli, service_command, start_guard

pytestmark = pytest.mark.guest

READY_TIMEOUT = 900.0  # bcc compiles every family under TCG: minutes
SYS_BPF, SYS_PTRACE = 321, 101  # x86_64
BPF_PROG_GET_NEXT_ID = 11

# One action in a fresh process, its errno (0: it worked) on stdout as JSON.
ACTOR = textwrap.dedent("""\
    import ctypes, json, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    action, arg = sys.argv[1], sys.argv[2]

    def oserror(fn):
        try:
            fn()
            return 0
        except OSError as error:
            return error.errno

    if action == "bpf_next_id":
        attr = (ctypes.c_uint8 * 128)()
        r = libc.syscall(ctypes.c_long(321), ctypes.c_long(11), ctypes.byref(attr),
                         ctypes.c_uint(128))
        # ENOENT: no program after id 0, which cannot be here: guard's are loaded
        print(json.dumps(0 if r == 0 else ctypes.get_errno()))
    elif action.startswith("kill"):
        print(json.dumps(oserror(lambda: os.kill(int(arg), int(action[4:])))))
    elif action == "ptrace":
        r = libc.syscall(ctypes.c_long(101), ctypes.c_long(16), ctypes.c_long(int(arg)), 0, 0)
        err = 0 if r == 0 else ctypes.get_errno()
        if r == 0:
            libc.syscall(ctypes.c_long(101), ctypes.c_long(17), ctypes.c_long(int(arg)), 0, 0)
        print(json.dumps(err))
    elif action == "mem":
        print(json.dumps(oserror(lambda: open(f"/proc/{arg}/mem", "rb").close())))
    elif action == "unlink":
        print(json.dumps(oserror(lambda: os.unlink(arg))))
    elif action == "rename":
        print(json.dumps(oserror(lambda: os.rename(arg, arg + "_moved"))))
    elif action == "rmdir":
        print(json.dumps(oserror(lambda: os.rmdir(arg))))
    elif action == "umount":
        # in a mount namespace of its own: were it allowed, only this copy goes
        CLONE_NEWNS = 0x00020000
        if libc.unshare(CLONE_NEWNS) != 0:
            print(json.dumps(-ctypes.get_errno()))
        else:
            libc.mount(b"none", b"/", None, ctypes.c_ulong((1 << 18) | 16384), None)
            r = libc.umount2(arg.encode(), 0)
            print(json.dumps(0 if r == 0 else ctypes.get_errno()))
    elif action == "exec":
        import subprocess
        print(json.dumps(oserror(lambda: subprocess.run([arg], check=True))))
    """)


@dataclass(frozen=True)
class Act:
    pid: int
    errno: int


@dataclass
class Site:
    top: TestCgroup
    inside: TestCgroup
    syslog: Rsyslog
    guard: GuardService
    pin_dir: Path
    state_dir: Path
    denied: Path
    instance: Path

    def act(self, where: TestCgroup, action: str, arg: str | Path | int) -> Act:
        """Run one action in a fresh process inside ``where``: its pid and errno."""
        proc = where.spawn([sys.executable, "-c", ACTOR, action, str(arg)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        return Act(proc.pid, int(json.loads(out)))

    def tamper_lines(self, pid: int, hook: str, count: int = 1) -> list[Syslog5424]:
        """The kind=tamper lines of one actor and hook, once ``count`` have arrived."""
        def mine(m: Syslog5424) -> bool:
            return (m.fields.get("kind") == "tamper" and m.fields.get("hook") == hook
                    and m.fields.get("pid") == str(pid))

        lines = self.syslog.wait_for(
            lambda ls: len([m for m in guard_messages(ls) if mine(m)]) >= count, timeout=120)
        return [m for m in guard_messages(lines) if mine(m)]


def policies(directory: Path, inside: str, denied: Path, elsewhere: Path) -> None:
    directory.mkdir()
    (directory / "confined.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: guard/v1
        kind: Policy
        metadata:
          name: confined
        spec:
          mode: enforce
          scope:
            cgroups: [{inside}]
          exec:
            default: allow
            rules:
              - {{action: deny, paths: ["{denied}"]}}
        """))
    (directory / "everywhere.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: guard/v1
        kind: Policy
        metadata:
          name: everywhere
        spec:
          mode: enforce
          exec:
            default: allow
            rules:
              - {{action: deny, paths: ["{elsewhere}"]}}
        """))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    need(shutil.which("rsyslogd") is not None, "rsyslogd is not installed")
    need(shutil.which("setpriv") is not None, "setpriv is not installed")
    work = tmp_path_factory.mktemp("tamper")
    denied, elsewhere = work / "true-denied", work / "true-elsewhere"
    for copy in (denied, elsewhere):
        shutil.copy2("/usr/bin/true", copy)
    pin_dir = Path("/sys/fs/bpf/guard-tamper-test")
    state_dir = work / "state"
    state_dir.mkdir(mode=0o700)
    syslog = Rsyslog(work / "rsyslog", unix=True)
    syslog.start()
    guard: GuardService | None = None
    try:
        with TestCgroup.create("guard-tamper") as top:
            inside = top.child("in")
            policies(work / "policies", inside.path, denied, elsewhere)
            command = service_command(
                {"GUARD_POLICIES": str(work / "policies"),
                 "GUARD_SYSLOG": f"unix:{syslog.unix_path}",
                 "GUARD_OPTS": f"--host-cgroup {top.path} --no-watch"},
                replace={"/run/guard": str(state_dir), "/sys/fs/bpf/guard": str(pin_dir)})
            guard = start_guard(command.guard_args, state_dir, work / "guard.stderr",
                                command=command)
            try:
                guard.wait_ready(READY_TIMEOUT)
            except BaseException:
                print(guard.stderr()[-6000:])
                raise
            print(f"guard as the unit runs it: READY after {guard.ready_after:.0f} s")
            status = guard.status()
            assert {"exec", "tamper"} <= set(status["families"]["enforced"]), status
            assert status["tamper"] == {"enabled": True, "error": "", "denied": 0}
            # A mount namespace of its own, the unit's capabilities (CAP_SYS_PTRACE):
            # policy paths are resolved in the host's, through PID 1's root.
            assert status["paths"] == {
                "where": "host's mount namespace (PID 1's, through /proc/1/root)",
                "error": ""}, status["paths"]
            instance = pin_dir / status["pins"]["instance"]
            yield Site(top, inside, syslog, guard, pin_dir, state_dir, denied, instance)
    finally:
        done = guard_cli(["stop", "--unload", "--state-dir", str(state_dir), "--pin-dir",
                          str(pin_dir), "--timeout", "120"])
        if guard is not None:
            guard.stop()
        syslog.stop()
        assert done.returncode == 0, done.stdout + done.stderr
        assert not pin_dir.exists()


def test_the_policy_is_live_in_the_scope(site: Site) -> None:
    assert site.act(site.inside, "exec", site.denied).errno == errno.EPERM
    assert site.act(site.top, "exec", site.denied).errno == 0


def test_bpf_syscall_is_refused_in_a_scope_and_works_outside(site: Site) -> None:
    refused = site.act(site.inside, "bpf_next_id", 0)
    assert refused.errno == errno.EPERM
    # Covered only by a whole-host policy, or by nothing: not protected.
    assert site.act(site.top, "bpf_next_id", 0).errno == 0
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint8 * 128)()
    assert libc.syscall(SYS_BPF, BPF_PROG_GET_NEXT_ID, ctypes.byref(attr), 128) == 0
    [line] = site.tamper_lines(refused.pid, "bpf")
    assert line.fields["path"] == "bpf(BPF_PROG_GET_NEXT_ID)"
    assert line.fields["action"] == "deny" and line.fields["cgroup"] == site.inside.path


def test_signals_to_the_daemon_are_refused(site: Site) -> None:
    pid = site.guard.pid
    tries = {sig: site.act(site.inside, f"kill{sig}", pid) for sig in (9, 15, 19)}
    assert {sig: a.errno for sig, a in tries.items()} == {9: errno.EPERM, 15: errno.EPERM,
                                                          19: errno.EPERM}
    assert site.act(site.inside, "kill0", pid).errno == 0  # existence probe: allowed
    assert site.guard.proc.poll() is None
    assert site.guard.status()["pid"] == pid
    [line] = site.tamper_lines(tries[9].pid, "task_kill")
    assert line.fields["path"].startswith(f"SIGKILL to the guard daemon, pid {pid} (")


def test_ptrace_and_memory_of_the_daemon_are_refused(site: Site) -> None:
    pid = site.guard.pid
    attach = site.act(site.inside, "ptrace", pid)
    assert attach.errno == errno.EPERM
    # /proc/PID/mem: the kernel turns the refusal into EACCES
    assert site.act(site.inside, "mem", pid).errno in (errno.EPERM, errno.EACCES)
    [line] = site.tamper_lines(attach.pid, "ptrace")
    assert line.fields["path"].startswith(f"ptrace of the guard daemon, pid {pid} (")
    assert site.guard.proc.poll() is None


def test_pins_cannot_be_removed_renamed_or_unmounted(site: Site) -> None:
    pins = sorted(site.instance.iterdir())
    target = site.instance / "link_lsm__bprm_check_security"
    assert target in pins, pins
    unlink = site.act(site.inside, "unlink", target)
    assert unlink.errno == errno.EPERM
    assert site.act(site.inside, "rename", target).errno == errno.EPERM
    assert site.act(site.inside, "rmdir", site.instance).errno == errno.EPERM
    umount = site.act(site.inside, "umount", "/sys/fs/bpf")
    assert umount.errno == errno.EPERM
    assert sorted(site.instance.iterdir()) == pins
    [line] = site.tamper_lines(unlink.pid, "bpffs_unlink")
    assert line.fields["path"] == "bpffs link_lsm__bprm_check_security"
    site.tamper_lines(umount.pid, "bpffs_umount")
    # Enforcement is intact after all of it.
    assert site.act(site.inside, "exec", site.denied).errno == errno.EPERM


def test_status_counts_every_refusal(site: Site) -> None:
    status = site.guard.status()
    lines = [m for m in guard_messages(site.syslog.lines()) if m.fields.get("kind") == "tamper"]
    counted = sum(int(m.fields["count"]) for m in lines)
    assert status["tamper"]["denied"] >= counted > 0
    assert status["kernel"]["tamper"] == status["tamper"]["denied"]
    hooks = {m.fields["hook"] for m in lines}
    assert {"bpf", "task_kill", "ptrace", "bpffs_unlink", "bpffs_rename", "bpffs_rmdir",
            "bpffs_umount"} <= hooks, hooks
