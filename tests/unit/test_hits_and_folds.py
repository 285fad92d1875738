"""Rule hit counts follow rule content across reloads; a count=N line keeps ppid and exe."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from support.policies import egress, policy_text, tcp_rule

from guard import layout
from guard.events.enrich import Enricher
from guard.events.fold import Folder
from guard.events.reader import EventReader
from guard.events.records import AuditEvent
from guard.events.transports import Sink, Target
from guard.policy.hits import carry_hits
from guard.policy.load import PolicyLoad, load_policies
from guard.policy.model import PolicySet


def policies(tmp_path: Path, *rules: str, default: str = "allow") -> PolicySet:
    directory = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
    directory.mkdir()
    (directory / "lock.yaml").write_text(policy_text("lock", egress(*rules, default=default)))
    loaded = load_policies(str(directory), "/", unit_lookup=lambda units: {})
    assert isinstance(loaded, PolicyLoad), loaded
    return loaded.policy_set


def test_a_changed_rule_starts_from_zero(tmp_path: Path) -> None:
    old = policies(tmp_path, tcp_rule("deny", 9999), tcp_rule("deny", 8000))
    hits = {"lock/egress.rules[0]": 9, "lock/egress.rules[1]": 4, "lock/egress.default": 2}
    # the port-9999 rule became a port-9997 rule at the same index
    new = policies(tmp_path, tcp_rule("deny", 9997), tcp_rule("deny", 8000))
    assert carry_hits(old, new, hits) == {"lock/egress.rules[1]": 4, "lock/egress.default": 2}


def test_an_unchanged_rule_keeps_its_count_where_it_moved(tmp_path: Path) -> None:
    old = policies(tmp_path, tcp_rule("deny", 9999))
    new = policies(tmp_path, tcp_rule("deny", 25), tcp_rule("deny", 9999))
    assert carry_hits(old, new, {"lock/egress.rules[0]": 9}) == {"lock/egress.rules[1]": 9}
    assert carry_hits(old, policies(tmp_path, tcp_rule("deny", 9999), default="deny"),
                      {"lock/egress.rules[0]": 9, "lock/egress.default": 3}) == {
        "lock/egress.rules[0]": 9}  # the default changed
    assert carry_hits(None, old, {"lock/egress.rules[0]": 1}) == {}


class Lines:
    """A sink transport that keeps what is sent."""

    datagram = True

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def open(self) -> None: ...
    def ready(self) -> bool: return True
    def frame(self, data: bytes) -> bytes: return data
    def fileno(self) -> int | None: return None
    def close(self) -> None: ...

    def send(self, frame: bytes) -> int:
        self.frames.append(frame)
        return len(frame)


def record(time_ns: int) -> bytes:
    event = layout.Event(time_ns=time_ns, cgroup_id=7, pid=50, tid=50, ppid=0, uid=0,
                         rule_id=0, ruleset=1, count=1, kind=layout.KIND_CONNECT, hook=8,
                         verdict=2, family=socket.AF_INET, proto=socket.IPPROTO_TCP, port=25,
                         comm=b"mailer", exe=b"")
    event.addr[:4] = [127, 0, 0, 1]
    return bytes(event)


def test_the_count_line_keeps_ppid_and_exe_after_the_process_exited(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "50").mkdir(parents=True)
    (proc / "50" / "stat").write_text("50 (mailer) S 42 50 50 0")
    (proc / "50" / "exe").symlink_to("/usr/bin/mailer")
    now = [0.0]
    sent: list[AuditEvent] = []
    sink = Sink(Target("unix", path="/x"), transport=Lines(), hostname="h",  # type: ignore[arg-type]
                procid=1)
    reader = EventReader(sink)
    reader.folder = Folder(window=1.0, clock=lambda: now[0])
    reader.enricher = Enricher(rules=lambda _rs, _r: None, cgroups=lambda _i: "/cg", proc=proc,
                               wall_offset=lambda: 0, clock=lambda: now[0])
    reader.tap = sent.append
    reader.records.extend(record(t) for t in range(1, 6))
    reader.process()
    shutil.rmtree(proc / "50")  # the process exits before the window closes
    now[0] += 5.0  # past the enricher's /proc cache and the window
    reader.send_closed()
    first, folded = sent
    assert (first.count, first.ppid, first.exe) == (1, 42, "/usr/bin/mailer")
    assert (folded.count, folded.ppid, folded.exe) == (4, 42, "/usr/bin/mailer")
