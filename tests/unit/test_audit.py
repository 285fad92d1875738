"""The audit reader without a kernel: records built with ctypes, a fake /proc,
an injected clock."""

from __future__ import annotations

import ctypes
import os
import random
import socket
from pathlib import Path

import pytest

from guard import layout
from guard.errors import Location
from guard.events.enrich import PROC_TTL_S, WALL_OFFSET_TTL_S, Enricher, read_proc
from guard.events.fold import Aggregator, Folder, LossTracker
from guard.events.records import (
    EVENT_SIZE,
    LOST_KERNEL,
    LOST_QUEUE,
    AuditEvent,
    DecodeError,
    RawEvent,
    decode,
    printable,
    record_count,
    record_identity,
)
from guard.policy.plan import RuleRef, Verdict

BOOT_TO_WALL = 1_700_000_000_000_000_000


def record(**fields: object) -> bytes:
    event = layout.Event()
    defaults: dict[str, object] = {
        "time_ns": 5_000_000_123, "cgroup_id": 77, "pid": 4242, "tid": 4243, "ppid": 4000,
        "uid": 1000, "rule_id": 2, "ruleset": 1, "count": 1, "kind": layout.KIND_EXEC,
        "hook": 1, "verdict": Verdict.DENY, "comm": b"curl", "path": b"/usr/bin/curl",
        "exe": b"/usr/bin/bash",
    }
    defaults.update(fields)
    for name, value in defaults.items():
        if name == "addr":
            assert isinstance(value, bytes)
            ctypes.memmove(ctypes.addressof(event) + layout.Event.addr.offset, value, len(value))
        else:
            setattr(event, name, value)
    return bytes(event)


RULES = {
    (1, 2): RuleRef(2, "web", "exec", 0, Location("/etc/guard/web.yaml", 12, 9)),
    (1025, 3): RuleRef(3, "egress", "egress", 1, Location("/etc/guard/net.yaml", 20, 11)),
}


def enricher(tmp_path: Path, cgroups: dict[int, str] | None = None) -> Enricher:
    paths = cgroups if cgroups is not None else {77: "/test/web"}
    return Enricher(
        rules=lambda ruleset, rule_id: RULES.get((ruleset, rule_id)),
        cgroups=paths.get,
        proc=tmp_path,
        wall_offset=lambda: BOOT_TO_WALL,
        clock=lambda: 0.0,
    )


def fake_proc(root: Path, pid: int, ppid: int, exe: str | None, comm: str = "a b) c") -> None:
    directory = root / str(pid)
    directory.mkdir(parents=True)
    # comm with spaces and ')' is exactly what the parser must survive
    (directory / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1\n")
    if exe is not None:
        os.symlink(exe, directory / "exe")


# --- decode ------------------------------------------------------------------------


def test_event_size_is_the_header_struct() -> None:
    assert EVENT_SIZE == ctypes.sizeof(layout.Event) == 600


def test_decode_reads_every_field() -> None:
    raw = decode(record(flags=layout.EVENT_UNDECIDED, access=3, family=2, proto=6, port=25,
                        addr=bytes([10, 1, 2, 3])))
    assert (raw.time_ns, raw.cgroup_id, raw.pid, raw.tid, raw.ppid, raw.uid) == (
        5_000_000_123, 77, 4242, 4243, 4000, 1000)
    assert (raw.rule_id, raw.ruleset, raw.count, raw.flags) == (2, 1, 1, layout.EVENT_UNDECIDED)
    assert (raw.kind, raw.hook, raw.verdict, raw.access) == (layout.KIND_EXEC, 1, 3, 3)
    assert (raw.family, raw.proto, raw.port) == (2, 6, 25)
    assert raw.addr[:4] == bytes([10, 1, 2, 3]) and len(raw.addr) == 16
    assert (raw.comm, raw.path, raw.exe) == (b"curl", b"/usr/bin/curl", b"/usr/bin/bash")


def test_decode_rejects_short_records() -> None:
    data = record()
    with pytest.raises(DecodeError, match="599 bytes"):
        decode(data[:-1])
    with pytest.raises(DecodeError):
        decode(b"")


def test_decode_tolerates_longer_records() -> None:
    assert decode(record() + b"\xff" * 8).pid == 4242


def test_decode_accepts_a_memoryview() -> None:
    assert decode(memoryview(record(pid=9))).pid == 9


def test_raw_event_fields_are_the_records_in_order() -> None:
    assert RawEvent._fields == tuple(entry[0] for entry in layout.Event._fields_)


def ctypes_decode(data: bytes) -> RawEvent:
    """The reference: the record read field by field through the ctypes mirror."""
    event = layout.Event.from_buffer_copy(data[:EVENT_SIZE])
    values = {name: getattr(event, name) for name in RawEvent._fields}
    values["addr"] = bytes(event.addr)
    return RawEvent(**values)


def test_decode_agrees_with_the_ctypes_mirror_on_every_field() -> None:
    # every byte of the record random: every field, at its offset, with its width
    rng = random.Random(5)
    for _ in range(200):
        data = bytes(rng.getrandbits(8) for _ in range(EVENT_SIZE))
        assert decode(data) == ctypes_decode(data)
    data = record(port=65535, count=2**32 - 1, comm=b"a\0b", path=b"/x")
    assert decode(data) == ctypes_decode(data)
    assert decode(data).comm == b"a"  # a C string ends at its first NUL


def test_full_length_strings_without_nul() -> None:
    long = b"/" + b"a" * (layout.PATH_LEN - 1)
    raw = decode(record(path=long, comm=b"c" * layout.COMM_LEN))
    assert raw.path == long and raw.comm == b"c" * 16


# --- folding on the record's bytes ------------------------------------------------------


def test_record_identity_ignores_exactly_time_tid_and_count() -> None:
    base = record(kind=layout.KIND_CONNECT, family=2, proto=17, port=53,
                  addr=bytes([127, 0, 0, 1]))
    same = record(kind=layout.KIND_CONNECT, family=2, proto=17, port=53,
                  addr=bytes([127, 0, 0, 1]), time_ns=9, tid=1, count=40)
    assert record_identity(base) == record_identity(same)
    # any other field, changed alone, makes another identity
    changes: dict[str, object] = {
        "cgroup_id": 78, "pid": 1, "ppid": 2, "uid": 3, "rule_id": 4, "ruleset": 5,
        "flags": 1, "kind": layout.KIND_FILE, "hook": 2, "verdict": Verdict.AUDIT,
        "access": 1, "family": 10, "proto": 6, "port": 54, "addr": bytes([127, 0, 0, 2]),
        "comm": b"curk", "path": b"/usr/bin/curk", "exe": b"/usr/bin/bask"}
    assert set(changes) == set(RawEvent._fields) - {"time_ns", "tid", "count"}
    for name, value in changes.items():
        fields = {"kind": layout.KIND_CONNECT, "family": 2, "proto": 17, "port": 53,
                  "addr": bytes([127, 0, 0, 1]), name: value}
        assert record_identity(record(**fields)) != record_identity(base), name


def test_record_identity_ignores_bytes_after_the_record() -> None:
    assert record_identity(record() + b"\x01" * 8) == record_identity(record())


def test_record_count_is_at_least_one() -> None:
    assert record_count(record(count=0)) == 1
    assert record_count(record(count=7)) == 7


def test_folder_on_records_first_out_repeats_counted_last_kept() -> None:
    clock = Clock()
    folder: Folder[bytes] = Folder(window=1.0, clock=clock)
    first, second, third = record(time_ns=1), record(time_ns=2, tid=9), record(time_ns=3, count=5)
    assert folder.add(record_identity(first), first, record_count(first))
    assert not folder.add(record_identity(second), second, record_count(second))
    assert not folder.add(record_identity(third), third, record_count(third))
    other = record(pid=1)
    assert folder.add(record_identity(other), other, 1)
    assert folder.closed() == []
    clock.now += 1.0
    assert folder.closed() == [(third, 6)]  # the last record, the sum of the repeats
    stats = folder.stats()
    assert (stats.seen, stats.emitted_lines, stats.pending, stats.aggregated) == (8, 3, 0, 5)
    # the window reopened for the flood; the other one closed silently
    assert folder.add(record_identity(first), first, 1) is False
    assert folder.closed(force=True) == [(first, 1)]
    assert folder.next_deadline() is None


def test_folder_with_window_zero_folds_nothing() -> None:
    folder: Folder[bytes] = Folder(window=0, clock=Clock())
    assert all(folder.add(b"k", b"r", 1) for _ in range(3))
    assert folder.closed(force=True) == [] and folder.stats().emitted_lines == 3


# --- printable ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"/usr/bin/curl", "/usr/bin/curl"),
        ("/tmp/ünïcode".encode(), "/tmp/ünïcode"),
        (b"/tmp/a\nforged line", "/tmp/a\\x0aforged line"),
        (b"/tmp/\xff\xfe", "/tmp/\\xff\\xfe"),
        (b"/tmp/back\\slash", "/tmp/back\\x5cslash"),
        (b"tab\there\x7f", "tab\\x09here\\x7f"),
    ],
)
def test_printable(raw: bytes, text: str) -> None:
    assert printable(raw) == text
    assert "\n" not in printable(raw)


# --- enrichment ----------------------------------------------------------------------


def test_enrich_exec_deny(tmp_path: Path) -> None:
    event = enricher(tmp_path).enrich(decode(record()))
    assert event.time_ns == 5_000_000_123 + BOOT_TO_WALL
    assert (event.action, event.kind, event.hook) == ("deny", "exec", "bprm_check")
    assert (event.policy, event.rule, event.location) == (
        "web", "web/exec.rules[0]", "/etc/guard/web.yaml:12")
    assert (event.pid, event.tid, event.ppid, event.uid) == (4242, 4243, 4000, 1000)
    assert (event.comm, event.exe, event.path) == ("curl", "/usr/bin/bash", "/usr/bin/curl")
    assert (event.cgroup, event.cgroup_id, event.count) == ("/test/web", 77, 1)
    assert (event.addr, event.port, event.proto, event.access) == ("", 0, "", "")
    assert not event.undecided


@pytest.mark.parametrize(
    ("verdict", "action"),
    [(Verdict.DENY, "deny"), (Verdict.AUDIT, "audit"), (Verdict.WOULD_DENY, "would-deny")],
)
def test_action_names(tmp_path: Path, verdict: Verdict, action: str) -> None:
    assert enricher(tmp_path).enrich(decode(record(verdict=verdict))).action == action


def test_enrich_connect_ipv4(tmp_path: Path) -> None:
    raw = decode(record(kind=layout.KIND_CONNECT, hook=6, ruleset=1025, rule_id=3,
                        family=socket.AF_INET, proto=6, port=8080,
                        addr=bytes([127, 0, 0, 1]), path=b"", exe=b"/bin/x"))
    event = enricher(tmp_path).enrich(raw)
    assert (event.kind, event.hook) == ("connect", "connect4")
    assert (event.addr, event.port, event.proto) == ("127.0.0.1", 8080, "tcp")
    assert event.destination == "127.0.0.1:8080/tcp"
    assert (event.policy, event.rule) == ("egress", "egress/egress.rules[1]")


def test_enrich_connect_ipv6_and_mapped(tmp_path: Path) -> None:
    six = socket.inet_pton(socket.AF_INET6, "fd00::1")
    event = enricher(tmp_path).enrich(decode(record(
        kind=layout.KIND_CONNECT, family=socket.AF_INET6, proto=17, port=53, addr=six)))
    assert (event.addr, event.proto, event.destination) == ("fd00::1", "udp", "[fd00::1]:53/udp")
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.1")
    event = enricher(tmp_path).enrich(decode(record(
        kind=layout.KIND_CONNECT, family=socket.AF_INET6, proto=6, port=1, addr=mapped)))
    assert event.addr == "10.0.0.1"


def test_enrich_file_access(tmp_path: Path) -> None:
    event = enricher(tmp_path).enrich(decode(record(
        kind=layout.KIND_FILE, hook=4, access=layout.ACCESS_READ | layout.ACCESS_WRITE,
        path=b"/etc/shadow", verdict=Verdict.AUDIT)))
    assert (event.kind, event.hook, event.access, event.action) == (
        "file", "file_open", "read,write", "audit")


def test_unknown_rule_and_cgroup_keep_the_ids(tmp_path: Path) -> None:
    event = enricher(tmp_path, cgroups={}).enrich(decode(record(rule_id=99, cgroup_id=5)))
    assert (event.policy, event.rule, event.location) == ("", "#99", "")
    assert event.cgroup == "cgroup-id:5"


def test_undecided_flag(tmp_path: Path) -> None:
    event = enricher(tmp_path).enrich(decode(record(flags=layout.EVENT_UNDECIDED, rule_id=0)))
    assert event.undecided and event.rule == ""


def test_ppid_and_exe_from_proc_when_the_kernel_left_them_empty(tmp_path: Path) -> None:
    fake_proc(tmp_path, 4242, ppid=17, exe="/usr/bin/python3")
    event = enricher(tmp_path).enrich(decode(record(ppid=0, exe=b"")))
    assert (event.ppid, event.exe) == (17, "/usr/bin/python3")


def test_kernel_values_win_over_proc(tmp_path: Path) -> None:
    fake_proc(tmp_path, 4242, ppid=17, exe="/usr/bin/python3")
    event = enricher(tmp_path).enrich(decode(record(ppid=4000, exe=b"/bin/bash")))
    assert (event.ppid, event.exe) == (4000, "/bin/bash")


def test_process_gone_leaves_fields_empty(tmp_path: Path) -> None:
    event = enricher(tmp_path).enrich(decode(record(ppid=0, exe=b"")))
    assert (event.ppid, event.exe) == (0, "")


def test_actor_cache_reads_proc_again_after_its_ttl(tmp_path: Path) -> None:
    now = [0.0]
    paths = {77: "/test/web"}
    e = Enricher(rules=lambda rs, r: RULES.get((rs, r)), cgroups=paths.get, proc=tmp_path,
                 wall_offset=lambda: 0, clock=lambda: now[0])
    assert e.enrich(decode(record(ppid=0, exe=b""))).exe == ""  # not there yet
    fake_proc(tmp_path, 4242, ppid=17, exe="/usr/bin/python3")
    now[0] += PROC_TTL_S / 2
    assert e.enrich(decode(record(ppid=0, exe=b""))).exe == ""  # cached
    now[0] += PROC_TTL_S
    assert e.enrich(decode(record(ppid=0, exe=b""))).exe == "/usr/bin/python3"


def test_actor_cache_sees_a_new_plan_at_once(tmp_path: Path) -> None:
    plans = {2: RULES[(1, 2)]}
    e = Enricher(rules=lambda _rs, r: plans.get(r), cgroups={77: "/t"}.get, proc=tmp_path,
                 wall_offset=lambda: 0, clock=lambda: 0.0)
    assert e.enrich(decode(record())).rule == "web/exec.rules[0]"
    plans[2] = RuleRef(2, "other", "exec", 3, Location("/etc/guard/other.yaml", 4, 5))
    event = e.enrich(decode(record()))
    assert (event.rule, event.location) == ("other/exec.rules[3]", "/etc/guard/other.yaml:4")


def test_wall_clock_offset_is_sampled_again_after_its_ttl(tmp_path: Path) -> None:
    now, offset = [0.0], [1000]
    e = Enricher(rules=lambda _rs, _r: None, cgroups=lambda _i: "/t", proc=tmp_path,
                 wall_offset=lambda: offset[0], clock=lambda: now[0])
    assert e.enrich(decode(record(time_ns=5))).time_ns == 1005
    offset[0] = 2000  # the wall clock was stepped
    now[0] += WALL_OFFSET_TTL_S / 2
    assert e.enrich(decode(record(time_ns=5))).time_ns == 1005
    now[0] += WALL_OFFSET_TTL_S
    assert e.enrich(decode(record(time_ns=5))).time_ns == 2005


def test_actor_cache_is_bounded(tmp_path: Path) -> None:
    e = enricher(tmp_path)
    for pid in range(Enricher.MAX_ACTORS + 10):
        assert e.enrich(decode(record(pid=pid + 1))).pid == pid + 1
    assert len(e._actors) <= Enricher.MAX_ACTORS


def test_read_proc_real_process() -> None:
    info = read_proc(os.getpid())
    assert info is not None
    assert info.ppid == os.getppid()
    assert info.exe == os.path.realpath("/proc/self/exe")


def test_read_proc_without_exe(tmp_path: Path) -> None:
    fake_proc(tmp_path, 12, ppid=2, exe=None)
    assert read_proc(12, tmp_path) is not None
    info = read_proc(12, tmp_path)
    assert info is not None and (info.ppid, info.exe) == (2, "")


# --- aggregation ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def deny(**changes: object) -> AuditEvent:
    base = AuditEvent(time_ns=1, action="deny", kind="connect", policy="p", rule="p/egress.x",
                      pid=10, tid=10, ppid=1, uid=0, comm="curl", cgroup="/t", addr="127.0.0.1",
                      port=80, proto="tcp")
    return base._replace(**changes)  # type: ignore[arg-type]


def test_first_event_goes_out_at_once_and_repeats_fold() -> None:
    clock = Clock()
    agg = Aggregator(window=1.0, clock=clock)
    assert agg.push(deny(time_ns=1)) == [deny(time_ns=1)]
    clock.now += 0.2
    assert agg.push(deny(time_ns=2, tid=11)) == []
    clock.now += 0.2
    assert agg.push(deny(time_ns=3, tid=12, count=3)) == []  # a kernel-folded event
    assert agg.pending == 4
    assert agg.flush() == []  # window still open
    clock.now = 101.0
    out = agg.flush()
    assert len(out) == 1
    assert out[0].count == 4 and out[0].time_ns == 3  # the last one's time
    stats = agg.stats()
    assert (stats.seen, stats.emitted_lines, stats.pending, stats.aggregated) == (5, 2, 0, 3)


def test_different_events_are_not_folded() -> None:
    agg = Aggregator(window=1.0, clock=Clock())
    assert len(agg.push(deny())) == 1
    assert len(agg.push(deny(pid=11))) == 1
    assert len(agg.push(deny(port=81))) == 1
    assert len(agg.push(deny(action="would-deny"))) == 1
    assert agg.pending == 0


def test_sustained_flood_is_one_line_per_window() -> None:
    clock = Clock()
    agg = Aggregator(window=1.0, clock=clock)
    lines: list[AuditEvent] = []
    for step in range(1000):  # 100 events a second for 10 seconds
        clock.now = 100.0 + step * 0.01
        lines += agg.push(deny(time_ns=step))
    clock.now += 5
    lines += agg.flush()
    assert sum(line.count for line in lines) == 1000
    assert 10 <= len(lines) <= 12
    assert lines[0].count == 1


def test_window_with_no_repeats_closes_silently() -> None:
    clock = Clock()
    agg = Aggregator(window=1.0, clock=clock)
    agg.push(deny())
    clock.now += 2
    assert agg.flush() == []
    assert agg.next_deadline() is None
    # the same event later is "first" again
    assert len(agg.push(deny())) == 1


def test_next_deadline_and_forced_flush() -> None:
    clock = Clock()
    agg = Aggregator(window=0.5, clock=clock)
    agg.push(deny())
    agg.push(deny())
    assert agg.next_deadline() == pytest.approx(100.5)
    out = agg.flush(force=True)
    assert [e.count for e in out] == [1]
    assert agg.next_deadline() is None


def test_closed_windows_go_out_before_a_new_event() -> None:
    clock = Clock()
    agg = Aggregator(window=1.0, clock=clock)
    agg.push(deny())
    agg.push(deny())
    clock.now += 1.5
    out = agg.push(deny(pid=99))
    assert [(e.pid, e.count) for e in out] == [(10, 1), (99, 1)]


def test_window_zero_disables_aggregation() -> None:
    agg = Aggregator(window=0, clock=Clock())
    assert len(agg.push(deny())) == 1
    assert len(agg.push(deny())) == 1


def test_lost_reports_are_never_folded() -> None:
    agg = Aggregator(window=1.0, clock=Clock())
    lost = AuditEvent(time_ns=1, action="lost", kind="lost", count=5, source=LOST_KERNEL)
    assert agg.push(lost) == [lost]
    assert agg.push(lost) == [lost]


def test_key_limit_sends_unaggregated_rather_than_dropping() -> None:
    agg = Aggregator(window=1.0, clock=Clock(), max_keys=2)
    for pid in range(5):
        assert len(agg.push(deny(pid=pid))) == 1
    assert len(agg.push(deny(pid=4))) == 1  # not tracked: goes out again, still counted
    assert len(agg.push(deny(pid=0))) == 0  # tracked: folded


def test_negative_window_is_refused() -> None:
    with pytest.raises(ValueError):
        Aggregator(window=-1)


# --- loss accounting -------------------------------------------------------------------


def test_kernel_losses_reported_once_each() -> None:
    tracker = LossTracker()
    assert tracker.kernel_reading(0) is None
    lost = tracker.kernel_reading(7, time_ns=5)
    assert lost is not None and (lost.kind, lost.count, lost.source) == ("lost", 7, LOST_KERNEL)
    assert tracker.kernel_reading(7) is None
    again = tracker.kernel_reading(10)
    assert again is not None and again.count == 3
    assert tracker.kernel_lost == 10


def test_kernel_baseline_for_adopted_maps() -> None:
    tracker = LossTracker(kernel_baseline=50)
    assert tracker.kernel_reading(50) is None
    lost = tracker.kernel_reading(52)
    assert lost is not None and lost.count == 2


def test_reader_drops_reported() -> None:
    tracker = LossTracker()
    assert tracker.reader_report() is None
    tracker.reader_dropped()
    tracker.reader_dropped(4)
    lost = tracker.reader_report()
    assert lost is not None and (lost.count, lost.source) == (5, LOST_QUEUE)
    assert tracker.reader_report() is None
