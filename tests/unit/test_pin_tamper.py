"""The pure parts of pinning and tamper resistance: names, manifests, event text."""

from __future__ import annotations

import struct
from pathlib import Path

from guard import layout
from guard.events import enrich
from guard.events.enrich import Enricher
from guard.events.records import RawEvent
from guard.kernel import pin


def test_instance_names_are_unique_and_carry_the_pid() -> None:
    names = {pin.new_instance_name(4321) for _ in range(50)}
    assert len(names) == 50
    assert all(pin.instance_pid(n) == 4321 and "." not in n for n in names)
    assert pin.instance_pid(f"{pin.STAGING}77-abcd") == 77
    assert pin.instance_pid("junk") is None


def test_pin_names_have_no_dot() -> None:
    """bpffs refuses any name with a dot (it keeps those for itself)."""
    for name in (pin.STAGING, pin.LINK_PREFIX, pin.MAP_PREFIX, *pin.PINNED_MAPS):
        assert "." not in name


def test_manifest_round_trip_and_lost_accounting(tmp_path: Path) -> None:
    manifest = pin.Manifest(instance="12-ab", pid=12, started="2026-11-25T10:00:00Z",
                            revision="git:abc", policies_dir="/etc/guard/policies",
                            host_cgroup="/", families=("exec", "net"), pin_dir="/x")
    pin.write_manifest(tmp_path, manifest)
    path = pin.manifest_path(tmp_path, "12-ab")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert pin.read_manifest(tmp_path, "12-ab") == manifest
    assert pin.read_manifest(tmp_path, "nope") is None

    keep = pin.Persistence(Path("/x"), tmp_path, instance="12-ab", manifest=manifest)
    keep.lost_reported(7)
    assert pin.read_manifest(tmp_path, "12-ab") == pin.Manifest(
        **{**manifest.__dict__, "lost_reported": 7})
    retired = pin.Retired("12-ab", [], lost_total=10, manifest=pin.read_manifest(tmp_path,
                                                                                 "12-ab"))
    assert retired.lost_unreported == 3  # reported once, by whoever saw it first
    assert pin.Retired("x", [], lost_total=None).lost_unreported == 0
    pin.remove_manifest(tmp_path, "12-ab")
    assert pin.read_manifest(tmp_path, "12-ab") is None


def test_persistence_modes() -> None:
    assert pin.Persistence(Path("/sys/fs/bpf/guard"), Path("/run/guard")).mode == "fail-closed"
    assert pin.Persistence(Path("/sys/fs/bpf/guard"), Path("/run/guard"),
                           fail_open=True).mode == "fail-open"
    assert pin.Persistence(None, Path("/run/guard")).mode == "fail-open"
    status = pin.Persistence(None, Path("/run/guard")).status()
    assert status == {"mode": "fail-open", "error": "", "dir": None, "instance": None,
                      "pins": [], "taken_over": []}


def test_instances_lists_complete_and_staging_directories(tmp_path: Path) -> None:
    (tmp_path / "10-aa").mkdir()
    (tmp_path / "10-aa" / "link_x").write_text("")
    (tmp_path / f"{pin.STAGING}11-bb").mkdir()
    found = pin.instances(tmp_path)
    assert [(i.name, i.complete, i.pins) for i in found] == [
        ("10-aa", True, ("link_x",)), (f"{pin.STAGING}11-bb", False, ())]
    assert pin.instances(tmp_path / "missing") == []


def _raw(hook: int, port: int, target: int, path: bytes) -> RawEvent:
    return RawEvent(time_ns=1, cgroup_id=5, pid=300, tid=300, ppid=1, uid=0, rule_id=0,
                    ruleset=0, count=1, flags=0, kind=layout.KIND_TAMPER, hook=hook,
                    verdict=3, access=0, family=0, proto=0, port=port,
                    addr=struct.pack("<I", target) + bytes(12), comm=b"sh", path=path,
                    exe=b"sh")


def test_tamper_events_say_what_was_attempted() -> None:
    enricher = Enricher(rules=lambda _rs, _r: None, cgroups=lambda _i: "/svc",
                        proc=Path("/nonexistent"), wall_offset=lambda: 0)
    cases = {
        (layout.HOOK_BPF, 11, 0, b""): "bpf(BPF_PROG_GET_NEXT_ID)",
        (layout.HOOK_BPF, 99, 0, b""): "bpf(BPF_CMD_99)",
        (layout.HOOK_TASK_KILL, 9, 812, b"python3"):
            "SIGKILL to the guard daemon, pid 812 (python3)",
        (layout.HOOK_PTRACE, 0x11, 812, b"python3"):
            "ptrace of the guard daemon, pid 812 (python3), mode 0x11",
        (layout.HOOK_BPFFS_UNLINK, 0, 0, b"link_lsm__bprm_check_security"):
            "bpffs link_lsm__bprm_check_security",
        (layout.HOOK_BPFFS_UMOUNT, 0, 0, b""): "umount of a bpffs",
        (layout.HOOK_BPFFS_RENAME, 0, 0, b"bad\nname"): "bpffs bad\\x0aname",
    }
    for (hook, port, target, path), text in cases.items():
        event = enricher.enrich(_raw(hook, port, target, path))
        assert (event.kind, event.action, event.path) == ("tamper", "deny", text)
        assert event.port == 0 and event.addr == ""  # those fields are not an address
        assert event.hook == layout.HOOK_NAMES[hook]


def test_every_bpf_command_has_its_name() -> None:
    assert enrich.bpf_command(0) == "BPF_MAP_CREATE"
    assert enrich.bpf_command(28) == "BPF_LINK_CREATE"
    assert enrich.bpf_command(34) == "BPF_LINK_DETACH"
    assert enrich.signal_name(19) == "SIGSTOP" and enrich.signal_name(200) == "signal 200"
