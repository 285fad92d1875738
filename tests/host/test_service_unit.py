"""systemd/guard.service: valid for systemd, parsed by guard's CLI, installable, and
livable: the daemon enforces, restarts without a gap and unloads under its restrictions.

systemd is not PID 1 here, so the unit is checked offline (``systemd-analyze
verify``) and its restrictions are reproduced from the unit file itself
(tests/support/service.py: capability bounding set, no_new_privs, the syscall
filter and address families as seccomp, a read-only file system but for
ReadWritePaths) around the real daemon, on the host's network programs.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import need, need_root
from support.cgroup import TestCgroup
from support.daemon import NET_ATTACH_TYPES, attached_total
from support.lab import syslog_and_cgroup
from support.policies import egress, policy_text, tcp_rule
from support.rsyslog import Rsyslog, guard_messages
from support.service import (
    ENV_TEMPLATE,
    REPO,
    UNIT,
    GuardService,
    capability_mask,
    env_file,
    expand_exec,
    guard_cli,
    no_new_privs,
    proc_capabilities,
    seccomp_mode,
    service_command,
    start_guard,
    unit_environment,
    unit_settings,
)

from guard.cli import build_parser
from guard.events.transports import parse_target

INSTALL = REPO / "scripts" / "install-service"
READY_TIMEOUT = 120.0


def _need_analyze() -> None:
    need(shutil.which("systemd-analyze") is not None,
         "systemd-analyze is not installed (scripts/setup installs systemd)")


# --- the unit file, offline ------------------------------------------------------------


def _staged(tmp_path: Path) -> Path:
    """scripts/install-service --root TMP: the files as they would be installed."""
    root = tmp_path / "root"
    done = subprocess.run([str(INSTALL), "--root", str(root), "--no-setup"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return root


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))


def _verifiable(root: Path, text: str, work: Path) -> Path:
    """The installed unit with its two absolute install paths pointing into the staging
    tree (verify checks that ExecStart's binary and the environment file exist)."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("ExecStart="):
            lines[i] = line.replace("/usr/local/bin/guard", str(root / "usr/local/bin/guard"))
        elif line.startswith("EnvironmentFile="):
            lines[i] = line.replace("/etc/guard/guard.env", str(root / "etc/guard/guard.env"))
    assert "".join(lines) != text
    text = "".join(lines)
    unit = work / "guard.service"
    unit.write_text(text)
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    _need_analyze()
    root = _staged(tmp_path)
    installed = root / "etc/systemd/system/guard.service"
    assert installed.read_text() == UNIT.read_text()
    unit = _verifiable(root, installed.read_text(), tmp_path)
    done = _verify(unit)
    # Not only the exit code: unknown or misspelled settings are warnings with exit 0.
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr


def test_verify_here_does_report_a_bad_setting(tmp_path: Path) -> None:
    """The check above would notice a mistake: verify complains about one."""
    _need_analyze()
    root = _staged(tmp_path)
    text = UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    done = _verify(_verifiable(root, text, tmp_path))
    assert "NoNewPrivilege" in done.stderr, done.stderr


def _exec_args(env: dict[str, str]) -> list[str]:
    settings = unit_settings()
    [command] = settings["ExecStart"]
    argv = expand_exec(command, unit_environment(settings, env))
    assert argv[0] == "/usr/local/bin/guard"
    return argv[1:]


def test_exec_start_parses_with_guards_cli() -> None:
    template = env_file(ENV_TEMPLATE)
    assert set(template) == {"GUARD_POLICIES", "GUARD_SYSLOG", "GUARD_OPTS"}
    args = build_parser().parse_args(_exec_args(template))
    assert (args.command, args.policies, args.syslog) == ("run", "/etc/guard/policies",
                                                          "/dev/log")
    assert (args.state_dir, args.pin_dir, args.fail_open) == ("/run/guard",
                                                              "/sys/fs/bpf/guard", False)
    assert (args.host_cgroup, args.no_watch) == ("/", False)
    parse_target(args.syslog)

    # Settings left out of the file fall back to the unit's Environment= defaults.
    args = build_parser().parse_args(_exec_args({"GUARD_OPTS": ""}))
    assert (args.policies, args.syslog) == ("/etc/guard/policies", "/dev/log")

    # GUARD_OPTS is split into options; the others stay one argument each.
    args = build_parser().parse_args(_exec_args({
        "GUARD_POLICIES": "/srv/policy repo", "GUARD_SYSLOG": "udp://10.0.0.5:514",
        "GUARD_OPTS": "--fail-open  --host-cgroup /system.slice --no-watch"}))
    assert args.policies == "/srv/policy repo" and args.syslog == "udp://10.0.0.5:514"
    assert args.fail_open and args.no_watch and args.host_cgroup == "/system.slice"
    parse_target(args.syslog)

    settings = unit_settings()
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["Type"] == ["notify"] and settings["Restart"] == ["on-failure"]


def test_install_is_idempotent_and_keeps_the_site_settings(tmp_path: Path) -> None:
    root = _staged(tmp_path)
    env_path = root / "etc/guard/guard.env"
    assert env_path.read_text() == ENV_TEMPLATE.read_text()
    assert (root / "etc/guard/policies").is_dir()
    wrapper = root / "usr/local/bin/guard"
    assert os.access(wrapper, os.X_OK)
    assert (root / "usr/local/share/doc/guard/service.md").exists()

    env_path.write_text(env_path.read_text().replace("GUARD_OPTS=", "GUARD_OPTS=--fail-open"))
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    again = subprocess.run([str(INSTALL), "--root", str(root), "--no-setup"],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before  # nothing rewritten, the operator's edit kept
    assert "installed" not in again.stdout and "kept" in again.stdout, again.stdout

    # The installed command is this checkout's guard.
    policies = tmp_path / "policies"
    policies.mkdir()
    done = subprocess.run([str(wrapper), "check", str(policies)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "0 policies" in done.stdout, done.stderr


# --- the daemon under the unit's restrictions ----------------------------------------------


def egress_policy(name: str, cgroup: str, port: int) -> str:
    return policy_text(name, egress(tcp_rule("deny", port)), scope=cgroup)


CLIENT = textwrap.dedent("""\
    import socket, sys
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", int(sys.argv[1])))
        print(0)
    except OSError as error:
        print(error.errno)
    """)


@dataclass
class Site:
    top: TestCgroup
    inside: TestCgroup
    syslog: Rsyslog
    policies: Path
    state_dir: Path
    pin_dir: Path
    work: Path
    listener: socket.socket

    @property
    def port(self) -> int:
        port: int = self.listener.getsockname()[1]
        return port

    def connect(self, port: int) -> int:
        proc = self.inside.spawn([sys.executable, "-c", CLIENT, str(port)],
                                 stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=60)
        self.listener.setblocking(False)
        try:
            while True:
                self.listener.accept()[0].close()
        except BlockingIOError:
            pass
        return int(out)

    def attached(self) -> int:
        return attached_total(self.top.directory)

    def start(self, name: str) -> GuardService:
        command = service_command(
            {"GUARD_POLICIES": str(self.policies),
             "GUARD_SYSLOG": f"unix:{self.syslog.unix_path}",
             "GUARD_OPTS": f"--host-cgroup {self.top.path} --no-watch"},
            replace={"/run/guard": str(self.state_dir), "/sys/fs/bpf/guard": str(self.pin_dir)})
        guard = start_guard(command.guard_args, self.state_dir,
                            self.work / f"guard-{name}.stderr", command=command)
        guard.extra["command"] = command
        guard.wait_ready(READY_TIMEOUT)
        return guard


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    need_root()
    need(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    _need_analyze()
    from guard.kernel.pin import on_bpffs

    need(on_bpffs(Path("/sys/fs/bpf")), "bpffs is not mounted at /sys/fs/bpf")
    pin_dir = Path("/sys/fs/bpf") / f"guard-test-{os.getpid()}-{tmp_path.name[-12:]}"
    with syslog_and_cgroup(tmp_path) as (top, syslog), socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        inside = top.child("in")
        state_dir = tmp_path / "state"
        state_dir.mkdir(mode=0o700)
        built = Site(top, inside, syslog, tmp_path / "policies", state_dir, pin_dir,
                     tmp_path, listener)
        built.policies.mkdir()
        try:
            yield built
        finally:
            # whatever happened: no daemon, no pin, nothing attached
            guard_cli(["stop", "--unload", "--state-dir", str(state_dir),
                       "--pin-dir", str(pin_dir), "--timeout", "30"])
            assert not pin_dir.exists()
            assert built.attached() == 0


def test_the_service_enforces_restarts_without_a_gap_reloads_and_unloads(site: Site) -> None:
    """As the unit runs it: exactly its capabilities, its syscall filter, a read-only
    system; pinned (fail-closed). SIGKILL keeps enforcement; the next start takes over;
    SIGHUP reloads; `guard stop --unload` leaves nothing."""
    denied, other = site.port, socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen(8)
    second = other.getsockname()[1]
    policy = site.policies / "lock.yaml"
    policy.write_text(egress_policy("lock", site.inside.path, denied))
    first = site.start("first")
    try:
        caps = proc_capabilities(first.pid)
        wanted = capability_mask(first.extra["command"].capabilities)
        assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == wanted, caps
        assert no_new_privs(first.pid) and seccomp_mode(first.pid) == 2
        assert site.connect(denied) == errno.EPERM
        assert site.connect(second) == 0
        assert site.attached() == len(NET_ATTACH_TYPES)
        status = first.status()
        assert status["pins"]["mode"] == "fail-closed" and status["pins"]["error"] == ""
        instance = status["pins"]["instance"]
        assert (site.pin_dir / instance).is_dir()

        first.kill()  # SIGKILL: nothing of guard's own cleanup runs
        assert site.connect(denied) == errno.EPERM  # the pinned programs still decide
        assert site.connect(denied) == errno.EPERM
        done = guard_cli(["status", "--state-dir", str(site.state_dir), "--pin-dir",
                          str(site.pin_dir)])
        assert done.returncode == 3 and "no daemon is running" in done.stderr
        assert f"still enforcing: {site.pin_dir / instance} (pid {first.pid} is gone; " \
            "revision sha256:" in done.stderr, done.stderr
    finally:
        first.stop()

    second_daemon = site.start("second")
    try:
        status = second_daemon.status()
        [taken] = status["pins"]["taken_over"]
        assert taken["pid"] == first.pid and taken["instance"] == instance
        assert taken["events_drained"] == 2  # the two denials while no daemon ran
        assert taken["lost"] == 0
        assert not (site.pin_dir / instance).exists()
        assert site.attached() == len(NET_ATTACH_TYPES)  # the old links are gone
        assert site.connect(denied) == errno.EPERM

        # The drained events reached syslog with their rule (same revision).
        lines = site.syslog.wait_for(lambda ls: sum(
            1 for m in guard_messages(ls) if m.procid == str(second_daemon.pid)
            and m.fields.get("kind") == "connect") >= 3, timeout=30)
        mine = [m for m in guard_messages(lines) if m.procid == str(second_daemon.pid)
                and m.fields.get("kind") == "connect"]
        assert {m.fields["rule"] for m in mine} == {"lock/egress.rules[0]"}
        assert any(m.msgid == "takeover" for m in guard_messages(lines))
        # With CAP_SYS_PTRACE (docs/service.md) the daemon reads /proc/PID/exe of a
        # process with more capabilities (this root client), unless it has exited by then.
        assert all(m.fields["exe"] in ("", os.path.realpath(sys.executable))
                   and m.fields["comm"] for m in mine), [m.fields for m in mine]

        # ExecReload: SIGHUP applies the edited policy.
        mark = len(second_daemon.notify.messages)
        policy.write_text(egress_policy("lock", site.inside.path, second))
        os.kill(second_daemon.pid, signal.SIGHUP)
        second_daemon.notify.wait_for("READY=1", 60, after=mark)
        assert site.connect(second) == errno.EPERM
        assert site.connect(denied) == 0

        done = guard_cli(["stop", "--unload", "--state-dir", str(site.state_dir),
                          "--pin-dir", str(site.pin_dir)])
        assert done.returncode == 0, done.stderr
        assert second_daemon.proc.wait(timeout=30) == 0
        errors = [line for line in second_daemon.stderr().splitlines() if "error" in line]
        assert not errors, second_daemon.stderr()
        assert not site.pin_dir.exists()
        assert site.attached() == 0
        assert site.connect(second) == 0 and site.connect(denied) == 0
    finally:
        second_daemon.stop()
        other.close()


def test_fail_open_pins_nothing_and_sigkill_ends_enforcement(site: Site) -> None:
    policy = site.policies / "lock.yaml"
    policy.write_text(egress_policy("lock", site.inside.path, site.port))
    command = service_command(
        {"GUARD_POLICIES": str(site.policies), "GUARD_SYSLOG": f"unix:{site.syslog.unix_path}",
         "GUARD_OPTS": f"--host-cgroup {site.top.path} --no-watch --fail-open"},
        replace={"/run/guard": str(site.state_dir), "/sys/fs/bpf/guard": str(site.pin_dir)})
    guard = start_guard(command.guard_args, site.state_dir, site.work / "open.stderr",
                        command=command)
    try:
        guard.wait_ready(READY_TIMEOUT)
        assert site.connect(site.port) == errno.EPERM
        status = guard.status()
        assert status["pins"]["mode"] == "fail-open" and status["pins"]["instance"] is None
        assert not site.pin_dir.exists() or not any(site.pin_dir.iterdir())
        guard.kill()
        deadline = time.monotonic() + 10  # the kernel releases the links
        while site.attached() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert site.attached() == 0
        assert site.connect(site.port) == 0
    finally:
        guard.stop()


def test_status_and_stop_without_a_daemon(site: Site) -> None:
    done = guard_cli(["stop", "--state-dir", str(site.state_dir), "--pin-dir",
                      str(site.pin_dir)])
    assert done.returncode == 0 and "no daemon is running" in done.stdout
    done = guard_cli(["stop", "--unload", "--state-dir", str(site.state_dir), "--pin-dir",
                      str(site.pin_dir)])
    assert done.returncode == 0 and "unloaded" in done.stdout, done.stdout + done.stderr


def big_policy(cgroup: str, port: int, filler: int) -> str:
    """Deny ``port`` on loopback, plus ``filler`` /32s elsewhere: a slow apply."""
    addresses = ", ".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32"
                          for i in range(1, filler + 1))
    return egress_policy("lock", cgroup, port) + (
        f"        - {{action: deny, to: [{addresses}], ports: [9], protocol: tcp}}\n")


def test_a_daemon_killed_during_a_reload_leaves_one_whole_policy_pinned(site: Site) -> None:
    """SIGKILL at points spread over a reload (parse, compile, apply of 1,000 entries):
    what stays pinned always enforces the old policy or the new one, never a mix,
    never nothing; the next daemon takes over and enforces the directory's policy."""
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen(8)
    port_a, port_b = site.port, other.getsockname()[1]
    policy = site.policies / "lock.yaml"
    old, new = (errno.EPERM, 0), (0, errno.EPERM)
    try:
        guard = site.start("measure")
        policy.write_text(big_policy(site.inside.path, port_b, 1_000))
        began = time.monotonic()
        mark = len(guard.notify.messages)
        os.kill(guard.pid, signal.SIGHUP)
        guard.notify.wait_for("READY=1", 120, after=mark)
        reload_s = time.monotonic() - began
        assert (site.connect(port_a), site.connect(port_b)) == new
        outcomes = []
        for i, fraction in enumerate((0.5, 0.9, 0.97, 0.99, 0.995)):
            # flip the directory between the two policies: each kill interrupts a
            # reload from the one in force to the other
            target = old if i % 2 == 0 else new
            text = (egress_policy("lock", site.inside.path, port_a) if target == old
                    else big_policy(site.inside.path, port_b, 1_000))
            policy.write_text(text)
            os.kill(guard.pid, signal.SIGHUP)
            time.sleep(reload_s * fraction)
            guard.kill()
            seen = (site.connect(port_a), site.connect(port_b))
            assert seen in (old, new), (fraction, seen)
            outcomes.append((fraction, "old" if seen == old else "new", seen == target))
            guard = site.start(f"after-{i}")  # takes over, applies the directory's policy
            assert (site.connect(port_a), site.connect(port_b)) == target
            assert site.attached() == len(NET_ATTACH_TYPES)
        print(f"reload of 1,000 entries: {reload_s:.2f} s; killed at (fraction, pinned "
              f"policy, already the new one): {outcomes}")
        guard.stop()
    finally:
        other.close()
