"""The daemon's pure parts and sd_notify, without a kernel (tests/host/test_daemon.py
runs the real daemon)."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.policies import egress, exec_section, policy_text, tcp_rule
from support.rsyslog import parse_rfc5424

from guard import layout
from guard.errors import Location
from guard.events.enrich import Enricher
from guard.events.fold import Folder
from guard.events.formats import log_record
from guard.events.reader import CONGESTED_READ_S, GATHER_S, RECORD_BATCH
from guard.events.transports import Sink, Target, Transport
from guard.kernel.loader import families_to_load, needed_sections, unenforced
from guard.policy.load import PolicyLoad, load_policies
from guard.policy.plan import RuleRef
from guard.service import notify
from guard.service.control import format_status
from guard.service.daemon import Daemon


def mail_policy(name: str) -> str:
    return policy_text(name, exec_section("{action: deny, paths: [/usr/bin/wget]}")
                  + egress(tcp_rule("deny", 25, to="10.0.0.0/8")))


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


# --- sd_notify --------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[tuple[str, socket.socket]]:
    name = f"@guard-unit-notify-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name[1:].encode())
    sock.settimeout(2)
    try:
        yield name, sock
    finally:
        sock.close()


def test_notify_abstract_socket(listener: tuple[str, socket.socket]) -> None:
    name, sock = listener
    assert notify.notify("READY=1\nSTATUS=enforcing", {"NOTIFY_SOCKET": name})
    assert sock.recv(4096) == b"READY=1\nSTATUS=enforcing"


def test_notify_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        assert notify.notify("STOPPING=1", {"NOTIFY_SOCKET": str(path)})
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_helpers_use_the_environment(listener: tuple[str, socket.socket],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    name, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    assert notify.ready("enforcing 2 policies")
    assert sock.recv(4096) == b"READY=1\nSTATUS=enforcing 2 policies"
    assert notify.reloading()
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].split("=")[1]) > 0
    assert notify.status("x") and sock.recv(4096) == b"STATUS=x"
    assert notify.stopping() and sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("value", ["", "relative/path", "/nonexistent/guard-notify.sock"])
def test_notify_without_a_manager_is_a_quiet_no(value: str) -> None:
    assert notify.notify("READY=1", {"NOTIFY_SOCKET": value}) is False


def test_notify_unset() -> None:
    assert notify.notify("READY=1", {}) is False


# --- loading a directory ------------------------------------------------------------------


def test_load_policies_valid(tmp_path: Path) -> None:
    write(tmp_path, "mail", mail_policy("mail"))
    loaded = load_policies(str(tmp_path), "/", unit_lookup=lambda units: {})
    assert isinstance(loaded, PolicyLoad)
    assert [p.name for p in loaded.policy_set.policies] == ["mail"]
    assert loaded.files == (str(tmp_path / "mail.yaml"),)
    assert str(loaded.revision).startswith(("sha256:", "git:"))
    assert len(loaded.plan.rules) == 4  # two rules and two defaults


def test_load_policies_errors_are_positioned(tmp_path: Path) -> None:
    path = write(tmp_path, "bad", mail_policy("bad").replace("ports: [25]",
                                                                     "ports: [99999]"))
    diagnostics = load_policies(str(tmp_path), "/", unit_lookup=lambda units: {})
    assert not isinstance(diagnostics, PolicyLoad)
    errors = [d for d in diagnostics if d.severity == "error"]
    assert errors and all(d.location.file == str(path) for d in errors)
    assert errors[0].location.line == 15
    assert str(errors[0]).startswith(f"{path}:15:")


def test_unenforced_names_each_section(tmp_path: Path) -> None:
    write(tmp_path, "a", mail_policy("a"))
    write(tmp_path, "b", mail_policy("b"))
    loaded = load_policies(str(tmp_path), "/", unit_lookup=lambda units: {})
    assert isinstance(loaded, PolicyLoad)
    assert [(f, p) for f, p, _ in needed_sections(loaded.policy_set)] == [
        ("exec", "a"), ("net", "a"), ("exec", "b"), ("net", "b")]
    [message] = unenforced(loaded.policy_set, {"exec": "no BPF-LSM", "files": "no source"})
    assert message.startswith("the kernel cannot run the exec programs (no BPF-LSM); "
                              "NOT ENFORCED: ")
    assert f"policy a section exec at {tmp_path / 'a.yaml'}:8:" in message
    assert f"policy b section exec at {tmp_path / 'b.yaml'}:8:" in message
    assert unenforced(loaded.policy_set, {}) == []


def test_families_to_load() -> None:
    load, unavailable = families_to_load({"net": (True, "ok"), "exec": (False, "EPERM"),
                                          "files": (False, "no source")})
    assert load == {"net"}
    assert unavailable == {"exec": "EPERM", "files": "no source"}


# --- guard status, for people ----------------------------------------------------------------


def status_body() -> dict[str, object]:
    return {
        "pid": 42, "uptime_s": 3725.5, "started": "2026-11-25T09:00:00Z",
        "policies_dir": "/etc/guard/policies", "host_cgroup": "/", "revision": "git:0123abcd",
        "generation": 3, "active_slot": 1, "rules": 4,
        "policies": [{"name": "mail", "mode": "enforce", "file": "/etc/guard/policies/m.yaml",
                      "sections": ["exec", "egress"], "scope": ["(host)"], "rules": 4}],
        "families": {"enforced": ["net"], "unavailable": {"exec": "EPERM"},
                     "unenforced": ["the kernel cannot run the exec programs (EPERM); ..."]},
        "events": {"received": 10, "lines": 3, "aggregated": 7, "pending": 0, "delivered": 3,
                   "lost": {"ringbuf": 1, "reader": 0, "malformed": 0, "sink": 2}},
        "kernel": {"events": 10, "lost": 1, "undecided": 0, "denied": 11, "audited": 0,
                   "suppressed": 0},
        "sink": {"target": "unix:/dev/log", "connected": False, "delivered": 3, "queued": 5,
                 "overflow": 2, "overflow_unreported": 2, "reconnects": 0,
                 "last_error": "unix:/dev/log: No such file or directory"},
        "reloads": 2,
        "last_reload": {"time": "2026-11-25T10:00:00Z", "ok": False, "reason": "SIGHUP",
                        "revision": "", "changed": False,
                        "errors": ["/etc/guard/policies/m.yaml:3:1: error: bad"]},
        "last_reload_error": {"time": "2026-11-25T10:00:00Z", "ok": False, "reason": "SIGHUP",
                              "revision": "", "changed": False,
                              "errors": ["/etc/guard/policies/m.yaml:3:1: error: bad"]},
    }


def test_format_status() -> None:
    text = format_status(status_body())
    assert text.startswith("guard: running, pid 42, up 1h02m05s\n")
    assert "revision: git:0123abcd  generation 3  (1 policies, 4 rules)" in text
    assert "enforced: net" in text and "not available [R1]: exec: EPERM" in text
    assert "mail" in text and "exec,egress" in text  # a row of an earlier guard
    assert "lost: ring buffer 1, reader 0 (malformed 0), syslog queue 2" in text
    assert "syslog: unix:/dev/log NOT connected, delivered 3, queued 5" in text
    assert "last reload: REJECTED" in text
    assert "  /etc/guard/policies/m.yaml:3:1: error: bad" in text
    assert "paths:" not in text  # no path rules: nothing resolved


def test_format_status_says_where_paths_are_resolved() -> None:
    body = status_body()
    body["paths"] = {"where": "host's mount namespace (PID 1's, through /proc/1/root)",
                     "error": ""}
    assert ("paths: resolved in the host's mount namespace (PID 1's, through /proc/1/root)\n"
            in format_status(body))
    body["paths"] = {"where": "guard's own mount namespace",
                     "error": "policy paths are resolved in guard's own mount namespace, "
                              "which is not the host's: cannot read /proc/1/root"}
    assert ("ERROR: policy paths are resolved in guard's own mount namespace, which is not "
            "the host's: cannot read /proc/1/root\n" in format_status(body))


# --- guard run: refusals before anything is touched -------------------------------------------


def run_args(policies: str, syslog: str, state_dir: str) -> argparse.Namespace:
    from guard.cli import build_parser

    return build_parser().parse_args(["run", "--policies", policies, "--syslog", syslog,
                                      "--state-dir", state_dir])


@pytest.mark.parametrize("target", ["syslog.example:514", "tcp://host", "unix:relative"])
def test_run_refuses_a_bad_syslog_target(tmp_path: Path, target: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from guard.service.daemon import run

    assert run(run_args(str(tmp_path), target, str(tmp_path / "state"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("guard run: ") and "syslog target" in err
    assert not (tmp_path / "state").exists()


def test_run_refuses_a_missing_policy_directory(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from guard.service.daemon import run

    missing = str(tmp_path / "nope")
    assert run(run_args(missing, "/dev/log", str(tmp_path / "state"))) == 2
    assert "no such directory" in capsys.readouterr().err


# --- the event path of the loop, without a kernel ------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Peer(Transport):
    """A datagram receiver the test reads, and fills (``room`` datagrams)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.room: int | None = None

    def open(self) -> None:
        pass

    def send(self, frame: bytes) -> int:
        if self.room is not None:
            if self.room <= 0:
                return 0
            self.room -= 1
        self.frames.append(frame)
        return len(frame)

    def close(self) -> None:
        pass

    def fields(self) -> list[dict[str, str]]:
        return [parse_rfc5424(f.decode()).fields for f in self.frames]


RULE = RuleRef(3, "audit", "egress", 0, Location("/etc/guard/audit.yaml", 9, 11))


def connect_record(port: int, time_ns: int = 1, count: int = 1) -> bytes:
    event = layout.Event(time_ns=time_ns, cgroup_id=7, pid=50, tid=50, ppid=1, uid=0,
                         rule_id=3, ruleset=1, count=count, kind=layout.KIND_CONNECT, hook=8,
                         verdict=2, family=socket.AF_INET, proto=socket.IPPROTO_UDP, port=port,
                         comm=b"flood", exe=b"/bin/flood")
    event.addr[:4] = [127, 0, 0, 1]
    return bytes(event)


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[tuple[Daemon, Peer, Clock]]:
    """A daemon's event path with no kernel: records go in its queue by hand."""
    peer, clock = Peer(), Clock()
    sink = Sink(Target("unix", path="/nonexistent"), transport=peer, hostname="h", procid=1,
                queue_size=40)
    daemon = Daemon(str(tmp_path / "policies"), "/", str(tmp_path / "state"), sink)
    daemon.events.folder = Folder(window=1.0, clock=clock)
    daemon.events.enricher = Enricher(rules=lambda _rs, rule: RULE if rule == 3 else None,
                                cgroups=lambda _id: "/flood", proc=tmp_path / "proc",
                                wall_offset=lambda: 0)
    sink.submit(log_record(6, "start", "connected"))  # as the daemon's start does
    peer.frames.clear()
    try:
        yield daemon, peer, clock
    finally:
        for fd in (daemon._wake_r, daemon._wake_w):
            with contextlib.suppress(OSError):  # shutdown() closes them
                os.close(fd)


def drain(daemon: Daemon) -> None:
    for _ in range(1000):
        if not daemon.events.records:
            return
        daemon.step()
    raise AssertionError("records left after 1000 rounds")


def test_first_event_out_at_once_repeats_folded_counts_exact(
        loop: tuple[Daemon, Peer, Clock]) -> None:
    daemon, peer, clock = loop
    daemon.events.records.extend(connect_record(20000, time_ns=t) for t in range(1, 6))
    daemon.events.records.append(connect_record(20000, time_ns=6, count=10))  # kernel-folded
    daemon.events.records.append(connect_record(20001))
    daemon.step()
    assert [(f["port"], f["count"]) for f in peer.fields()] == [("20000", "1"), ("20001", "1")]
    assert daemon.events.folder.pending == 14
    clock.now += 1.0
    daemon.step()  # the window closed: one line with the repeats
    assert [(f["port"], f["count"]) for f in peer.fields()][2:] == [("20000", "14")]
    assert peer.fields()[0]["rule"] == "audit/egress.rules[0]"
    assert peer.fields()[0]["cgroup"] == "/flood"
    status = daemon.status()["events"]
    assert (status["received"], status["lines"], status["aggregated"], status["pending"]) == (
        7, 3, 13, 0)
    assert daemon.events.rule_hits == {"audit/egress.rules[0]": 16}


def test_shutdown_sends_what_is_still_folded(loop: tuple[Daemon, Peer, Clock]) -> None:
    daemon, peer, _ = loop
    daemon.events.records.extend(connect_record(20000) for _ in range(4))
    daemon.step()
    daemon.shutdown()
    assert [(f.get("port"), f.get("count")) for f in peer.fields()
            if f.get("kind") == "connect"] == [("20000", "1"), ("20000", "3")]


def test_a_short_record_is_counted_and_reported_lost(loop: tuple[Daemon, Peer, Clock]) -> None:
    daemon, peer, _ = loop
    daemon.events.records.append(connect_record(20000)[:-1])
    daemon.events.records.append(connect_record(20001))
    daemon.step()
    assert daemon.events.malformed == 1
    kinds = [(f["kind"], f.get("source"), f["count"]) for f in peer.fields()]
    assert kinds == [("connect", None, "1"), ("lost", "reader", "1")]


def test_a_round_takes_a_bounded_batch(loop: tuple[Daemon, Peer, Clock]) -> None:
    daemon, peer, _ = loop
    daemon.sink.queue_size = 10 * RECORD_BATCH
    daemon.events.records.extend(connect_record(20000 + i) for i in range(RECORD_BATCH + 5))
    daemon.step()
    assert len(daemon.events.records) == 5 and len(peer.frames) == RECORD_BATCH
    assert daemon.events.wait_ms() == 0  # a backlog: the loop does not wait
    daemon.step()
    assert not daemon.events.records and len(peer.frames) == RECORD_BATCH + 5


def test_a_full_target_pauses_the_records_without_losing_any(
        loop: tuple[Daemon, Peer, Clock]) -> None:
    daemon, peer, _ = loop
    peer.room = 0  # the receiver stops reading
    daemon.events.records.extend(connect_record(20000 + i) for i in range(100))
    daemon.step()  # takes what the syslog queue has room for: 40
    assert daemon.sink.queued == 40 and len(daemon.events.records) == 60
    assert daemon.events.congested() and daemon.events.batch_limit() == 0
    daemon.step()  # full and congested: no more records are made into lines
    assert daemon.sink.queued == 40 and len(daemon.events.records) == 60
    assert daemon.sink.stats().overflow == 0
    peer.room = None  # it reads again
    drain(daemon)
    daemon.step()
    assert [int(f["port"]) for f in peer.fields()] == list(range(20000, 20100))
    assert daemon.sink.stats().overflow == 0 and daemon.sink.queued == 0


def test_a_round_after_a_busy_one_gathers_first(loop: tuple[Daemon, Peer, Clock]) -> None:
    daemon, _, _ = loop
    assert daemon.events.gather(500) == 500  # quiet: the first event wakes the loop at once
    daemon.events.records.append(connect_record(20000))
    daemon.step()
    began = time.monotonic()
    assert daemon.events.gather(500) == 0  # busy: slept out GATHER_S, then poll without waiting
    assert time.monotonic() - began >= GATHER_S * 0.9
    assert daemon.events.gather(0) == 0  # a backlog is never waited for
    began = time.monotonic()
    assert daemon.events.gather(500) == 500  # the gathering is over
    assert time.monotonic() - began < GATHER_S


def test_congested_the_ring_buffer_is_still_read_often(
        loop: tuple[Daemon, Peer, Clock]) -> None:
    daemon, peer, clock = loop
    clock.now = time.monotonic() + 10  # the windows close long after (_wait_ms reads this clock)
    peer.room = 0
    daemon.events.records.extend(connect_record(20000 + i) for i in range(100))
    daemon.step()
    assert daemon.events.congested()
    assert 0 < daemon.events.wait_ms() <= CONGESTED_READ_S * 1000 + 1
    assert daemon.events.gather(3) == 3  # a congested target gets every free slot at once
