"""``guard run`` as a real daemon on the host: the network family, real syscalls.

The daemon runs as a subprocess with ``--host-cgroup`` set to a cgroup this
module created, so its programs are attached there and judge nothing else on
the machine; the policies (whole-host, i.e. that cgroup) deny TCP to one
loopback port where the test itself listens. The test listens on NOTIFY_SOCKET
(an abstract socket, as systemd uses) and runs a real rsyslogd as the syslog
target.

    /guard-test-XXXX            --host-cgroup: programs attached here
    /guard-test-XXXX/in         the client processes run here

What is shown: READY=1 only once a connect from the cgroup already fails with
EPERM; the deny line reaches rsyslogd with its fields; repeats are aggregated;
SIGHUP applies a changed policy and keeps the old one when the new one is
broken; a broken policy at start exits 1 with FILE:LINE:COL and attaches
nothing; SIGTERM exits 0 with nothing left attached; ``guard status``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import need, need_root
from support.cgroup import TestCgroup, attached_programs
from support.daemon import GuardDaemon, running_daemon, start_daemon
from support.rsyslog import Rsyslog, Syslog5424, guard_messages

pytestmark = pytest.mark.host

REPO = Path(__file__).resolve().parents[2]

# --- attached programs, asked of the kernel (BPF_PROG_QUERY) ------------------------------

CGROUP_ATTACH_TYPES = {"inet_egress": 1, "inet4_connect": 10, "inet6_connect": 11,
                       "udp4_sendmsg": 14, "udp6_sendmsg": 15}


def attached(directory: Path) -> dict[str, int]:
    """How many programs are attached to a cgroup, per network attach type."""
    return {name: attached_programs(directory, attach_type)
            for name, attach_type in CGROUP_ATTACH_TYPES.items()}


# --- the client: connects from inside the test cgroup -----------------------------------

CLIENT = textwrap.dedent("""\
    import json, socket, sys
    port, count = int(sys.argv[1]), int(sys.argv[2])
    if len(sys.argv) > 3:  # armed: started early, connects the moment it reads a line
        sys.stdin.readline()
    results = []
    for _ in range(count):
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
            results.append(0)
        except OSError as error:
            results.append(error.errno)
        finally:
            s.close()
    print(json.dumps(results), flush=True)
    if len(sys.argv) > 3:  # armed: alive (its /proc readable) until stdin closes
        sys.stdin.read()
    """)


@dataclass
class Lab:
    top: TestCgroup
    inside: TestCgroup
    syslog: Rsyslog
    work: Path
    listeners: dict[int, socket.socket] = field(default_factory=dict)

    def port(self) -> int:
        """A loopback port where the test listens (so an allowed connect succeeds)."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(512)
        port: int = sock.getsockname()[1]
        self.listeners[port] = sock
        return port

    def connect(self, port: int, count: int = 1) -> tuple[int, list[int]]:
        """(pid, errno of each connect) for a client run inside the cgroup."""
        proc = self.inside.spawn([sys.executable, "-c", CLIENT, str(port), str(count)],
                                 stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=60)
        for sock in self.listeners.values():  # empty the backlogs
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    sock.accept()[0].close()
        return proc.pid, json.loads(out)

    def armed_client(self, port: int) -> subprocess.Popen[bytes]:
        """A client already running in the cgroup that connects once told to: the
        time from 'go' to connect() is microseconds, not an interpreter start. It
        stays alive until its stdin is closed: the daemon reads ppid and exe of a
        connect's process from /proc (best effort), which a process that has
        exited no longer has."""
        proc = self.inside.spawn([sys.executable, "-c", CLIENT, str(port), "1", "armed"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return proc

    def policy_dir(self, name: str) -> Path:
        directory = self.work / name
        directory.mkdir()
        return directory


def egress_policy(name: str, port: int) -> str:
    """A whole-host policy (whole host = the daemon's --host-cgroup) denying one port."""
    return textwrap.dedent(f"""\
        apiVersion: guard/v1
        kind: Policy
        metadata:
          name: {name}
          description: loopback port {port} is off limits
        spec:
          mode: enforce
          network:
            egress:
              default: allow
              rules:
                - {{action: deny, to: [127.0.0.1/32], ports: [{port}], protocol: tcp}}
        """)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    need_root()
    need(shutil.which("rsyslogd") is not None, "rsyslogd is not installed (scripts/setup)")
    from guard.kernel.loader import probe_family

    feature = probe_family("net")
    need(feature.available, f"cgroup network programs: {feature.reason}")
    work = tmp_path_factory.mktemp("daemon")
    syslog = Rsyslog(work / "rsyslog", unix=True)
    syslog.start()
    try:
        with TestCgroup.create() as top:
            inside = top.child("in")
            built = Lab(top, inside, syslog, work)
            try:
                yield built
            finally:
                for sock in built.listeners.values():
                    sock.close()
    finally:
        syslog.stop()


# --- one daemon (support.daemon) -------------------------------------------------------


def start_guard(lab: Lab, policies: Path, name: str) -> GuardDaemon:
    return start_daemon(policies, lab.top.path, f"unix:{lab.syslog.unix_path}", lab.work, name)


@contextlib.contextmanager
def running_guard(lab: Lab, policies: Path, name: str) -> Iterator[GuardDaemon]:
    """Ready on entry; on exit stopped, exit code 0 and nothing left attached."""
    with running_daemon(policies, lab.top, f"unix:{lab.syslog.unix_path}", lab.work,
                        name) as guard:
        yield guard


def lines_of(lab: Lab, predicate: Callable[[Syslog5424], bool], count: int = 1,
             timeout: float = 15.0) -> list[Syslog5424]:
    lines = lab.syslog.wait_for(
        lambda lines: len([m for m in guard_messages(lines) if predicate(m)]) >= count, timeout)
    return [m for m in guard_messages(lines) if predicate(m)]


# --- the tests --------------------------------------------------------------------------


def test_broken_policy_refuses_to_start_and_attaches_nothing(lab: Lab) -> None:
    port = lab.port()
    policies = lab.policy_dir("broken")
    text = egress_policy("broken", port).replace("protocol: tcp", "protocol: tcp, color: red")
    (policies / "broken.yaml").write_text(text)
    guard = start_guard(lab, policies, "broken")
    try:
        code = guard.proc.wait(timeout=60)
    finally:
        guard.stop()
    stderr = guard.stderr_text()
    assert code == 1, stderr
    # FILE:LINE:COL: error: ... pointing at the unknown key
    assert f"{policies / 'broken.yaml'}:12:" in stderr and ": error: " in stderr, stderr
    assert "nothing was loaded" in stderr
    assert sum(attached(lab.top.directory).values()) == 0
    assert lab.connect(port)[1] == [0]  # the port the broken file meant to deny: open
    assert not guard.notify.messages  # never READY
    assert not (guard.state_dir / "status.sock").exists()


def test_ready_only_once_enforcing_and_the_deny_reaches_syslog(lab: Lab) -> None:
    denied, allowed = lab.port(), lab.port()
    policies = lab.policy_dir("ready")
    (policies / "lock.yaml").write_text(egress_policy("lock", denied))
    client = lab.armed_client(denied)
    with running_guard(lab, policies, "ready") as guard:
        # The very first thing after READY=1: the connect is already refused.
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(b"go\n")
        client.stdin.flush()
        pid, results = client.pid, json.loads(client.stdout.readline())
        assert results == [errno.EPERM]
        assert lab.connect(allowed)[1] == [0]
        counts = attached(lab.top.directory)
        assert counts["inet4_connect"] >= 1 and counts["inet_egress"] >= 1
        print(f"guard run -> READY=1 in {guard.ready_after:.2f} s")

        [start] = lines_of(lab, lambda m: m.msgid == "start" and m.procid == str(guard.proc.pid))
        assert start.msg.startswith("guard: enforcing 1 policy, revision ")
        assert start.fields["policies"] == "1" and "net" in start.fields["families"]

        [line] = lines_of(lab, lambda m: m.fields.get("pid") == str(pid))
        assert (line.facility, line.severity) == (10, 4)
        fields = line.fields
        assert (fields["action"], fields["kind"]) == ("deny", "connect")
        assert (fields["addr"], fields["port"], fields["proto"]) == ("127.0.0.1", str(denied),
                                                                      "tcp")
        assert fields["hook"] == "connect4"
        assert (fields["policy"], fields["rule"]) == ("lock", "lock/egress.rules[0]")
        assert fields["location"] == f"{policies / 'lock.yaml'}:12"
        assert fields["cgroup"] == lab.inside.path
        assert fields["comm"] == Path(sys.executable).name[:15]
        assert fields["ppid"] == str(os.getpid())
        assert fields["uid"] == "0" and fields["count"] == "1"
        assert fields["exe"] == os.path.realpath(sys.executable)
        client.communicate(timeout=30)


def test_repeated_denials_are_aggregated_with_a_count(lab: Lab) -> None:
    denied = lab.port()
    policies = lab.policy_dir("aggregate")
    (policies / "lock.yaml").write_text(egress_policy("lock", denied))
    with running_guard(lab, policies, "aggregate") as guard:
        pid, results = lab.connect(denied, count=50)
        assert results == [errno.EPERM] * 50
        mine = lines_of(lab, lambda m: m.fields.get("pid") == str(pid))
        deadline = time.monotonic() + 10
        while sum(int(m.fields["count"]) for m in mine) < 50 and time.monotonic() < deadline:
            time.sleep(0.1)
            mine = [m for m in guard_messages(lab.syslog.lines())
                    if m.fields.get("pid") == str(pid)]
        counts = [int(m.fields["count"]) for m in mine]
        assert sum(counts) == 50, counts
        assert counts[0] == 1  # the first went out at once
        assert len(counts) <= 3 and max(counts) > 1, counts
        status = guard.status_cli()
        assert status["events"]["received"] >= 50
        assert status["events"]["aggregated"] >= 50 - len(counts)


def test_sighup_applies_a_changed_policy_and_keeps_it_on_a_broken_one(lab: Lab) -> None:
    first, second = lab.port(), lab.port()
    policies = lab.policy_dir("reload")
    policy = policies / "lock.yaml"
    policy.write_text(egress_policy("lock", first))
    with running_guard(lab, policies, "reload") as guard:
        assert lab.connect(first)[1] == [errno.EPERM]
        assert lab.connect(second)[1] == [0]
        generation = guard.status_cli()["generation"]

        policy.write_text(egress_policy("lock", second))
        guard.proc.send_signal(signal.SIGHUP)
        guard.notify.wait_for(lambda m: "RELOADING=1" in m, 30, guard.proc)
        guard.notify.wait_for(lambda m: "READY=1" in m, 30, guard.proc)
        assert lab.connect(first)[1] == [0]
        assert lab.connect(second)[1] == [errno.EPERM]
        status = guard.status_cli()
        assert status["generation"] == generation + 1
        assert status["last_reload"]["ok"] and status["last_reload_error"] is None

        # A broken edit: rejected with its position, the previous policy stays.
        policy.write_text(egress_policy("lock", first).replace("ports: [", "ports: [70000, "))
        guard.proc.send_signal(signal.SIGHUP)
        guard.notify.wait_for(lambda m: "READY=1" in m, 30, guard.proc)
        assert lab.connect(second)[1] == [errno.EPERM]
        assert lab.connect(first)[1] == [0]
        errors = lines_of(lab, lambda m: m.msgid == "reload" and f"{policy}:" in m.msg)
        assert any(": error: " in m.msg and m.severity == 3 for m in errors)
        rejected = lines_of(lab, lambda m: m.msgid == "reload" and "rejected" in m.msg)
        assert rejected
        status = guard.status_cli()
        assert status["generation"] == generation + 1
        assert not status["last_reload"]["ok"]
        assert any(f"{policy}:12:" in e for e in status["last_reload_error"]["errors"])


def test_status_json_and_text(lab: Lab) -> None:
    denied = lab.port()
    policies = lab.policy_dir("status")
    (policies / "lock.yaml").write_text(egress_policy("lock", denied))
    with running_guard(lab, policies, "status") as guard:
        socket_path = guard.state_dir / "status.sock"
        assert oct(socket_path.stat().st_mode & 0o777) == "0o600"
        lab.connect(denied, count=3)
        deadline = time.monotonic() + 10
        status = guard.status_cli()
        while status["events"]["received"] < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
            status = guard.status_cli()
        assert status["pid"] == guard.proc.pid
        assert status["policies_dir"] == str(policies)
        assert status["host_cgroup"] == lab.top.path
        assert status["revision"].startswith(("sha256:", "git:"))
        assert [p["name"] for p in status["policies"]] == ["lock"]
        assert status["policies"][0]["sections"] == ["egress"]
        assert status["policies"][0]["rules"] == status["rules"] == 1  # as written: no default
        assert status["policies"][0]["enforced"] is True
        assert status["generation"] >= 1
        assert "net" in status["families"]["enforced"]
        assert status["events"]["received"] == 3
        assert status["events"]["lost"] == {"ringbuf": 0, "reader": 0, "malformed": 0,
                                            "sink": 0}
        assert status["kernel"]["denied"] == 3 and status["kernel"]["lost"] == 0
        assert status["sink"]["target"] == f"unix:{lab.syslog.unix_path}"
        assert status["uptime_s"] > 0
        text = subprocess.run(
            [sys.executable, "-m", "guard", "status", "--state-dir", str(guard.state_dir)],
            cwd=REPO, capture_output=True, text=True, timeout=30)
        assert text.returncode == 0
        assert "revision: " in text.stdout and "lock" in text.stdout
        assert "enforced: " in text.stdout and "net" in text.stdout


def test_sigterm_exits_zero_and_detaches_everything(lab: Lab) -> None:
    denied = lab.port()
    policies = lab.policy_dir("sigterm")
    (policies / "lock.yaml").write_text(egress_policy("lock", denied))
    guard = start_guard(lab, policies, "sigterm")
    try:
        guard.wait_ready()
        assert lab.connect(denied)[1] == [errno.EPERM]
        assert sum(attached(lab.top.directory).values()) >= 5
        guard.proc.send_signal(signal.SIGTERM)
        guard.notify.wait_for(lambda m: "STOPPING=1" in m, 30)
        code = guard.proc.wait(timeout=30)
    finally:
        guard.stop()
    assert code == 0, guard.stderr_text()
    assert sum(attached(lab.top.directory).values()) == 0
    assert lab.connect(denied)[1] == [0]
    assert not (guard.state_dir / "status.sock").exists()
    assert any(m.msgid == "stop" and m.procid == str(guard.proc.pid)
               for m in guard_messages(lab.syslog.lines()))


def test_status_without_daemon_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "guard", "status", "--state-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 3
    assert "no daemon is running" in done.stderr


def test_a_family_the_kernel_cannot_run_is_a_loud_error_and_the_rest_is_enforced(
        lab: Lab) -> None:
    """This host refuses BPF-LSM: an exec section cannot be enforced. The daemon says
    so (stderr, syslog at err, status) naming the section, and enforces egress."""
    from guard.kernel.loader import probe_family

    need(not probe_family("exec").available,
         "this kernel runs BPF-LSM: the exec family is available here")
    denied = lab.port()
    policies = lab.policy_dir("mixed")
    policy = policies / "mixed.yaml"
    exec_section = ("  exec:\n    default: allow\n    rules:\n"
                    "      - {action: deny, paths: [/usr/bin/wget]}\n")
    policy.write_text(egress_policy("mixed", denied).replace(
        "  network:\n", exec_section + "  network:\n"))
    with running_guard(lab, policies, "mixed") as guard:
        assert lab.connect(denied)[1] == [errno.EPERM]
        where = f"policy mixed section exec at {policy}:9:"
        assert "NOT ENFORCED" in guard.stderr_text() and where in guard.stderr_text()
        [line] = lines_of(lab, lambda m: m.msgid == "unenforced"
                          and m.procid == str(guard.proc.pid))
        assert line.severity == 3 and where in line.msg and "exec programs" in line.msg
        status = guard.status_cli()
        assert "exec" in status["families"]["unavailable"]
        assert "exec" not in status["families"]["enforced"]
        assert any(where in message for message in status["families"]["unenforced"])


def test_ring_buffer_overflow_is_counted_and_reported(lab: Lab) -> None:
    """The daemon is stopped (SIGSTOP) while 10,000 connects are denied: more
    events than the 4 MiB ring buffer holds. After SIGCONT, every denial is
    either inside a deny line's count or inside the kind=lost line's count."""
    denied = lab.port()
    total = 10_000
    policies = lab.policy_dir("overflow")
    (policies / "lock.yaml").write_text(egress_policy("lock", denied))
    with running_guard(lab, policies, "overflow") as guard:
        os.kill(guard.proc.pid, signal.SIGSTOP)
        try:
            pid, results = lab.connect(denied, count=total)
        finally:
            os.kill(guard.proc.pid, signal.SIGCONT)
        assert results == [errno.EPERM] * total
        mine = str(guard.proc.pid)

        def accounted(lines: list[str]) -> int:
            messages = guard_messages(lines)
            denies = sum(int(m.fields["count"]) for m in messages
                         if m.fields.get("pid") == str(pid))
            lost = sum(int(m.fields["count"]) for m in messages
                       if m.procid == mine and m.fields.get("kind") == "lost")
            return denies + lost

        lab.syslog.wait_for(lambda lines: accounted(lines) >= total, timeout=30)
        time.sleep(1.5)  # anything more would be a double count
        lines = lab.syslog.lines()
        assert accounted(lines) == total
        [lost] = [m for m in guard_messages(lines)
                  if m.procid == mine and m.fields.get("kind") == "lost"]
        assert lost.fields["source"] == "ringbuf" and int(lost.fields["count"]) > 0
        status = guard.status_cli()
        assert status["kernel"]["denied"] == total
        assert status["kernel"]["lost"] == status["events"]["lost"]["ringbuf"] \
            == int(lost.fields["count"])
        assert status["events"]["received"] + status["kernel"]["lost"] == total
        print(f"{total} denials while stopped: {status['events']['received']} through the "
              f"ring buffer, {lost.fields['count']} counted lost")
