"""The pure half of apply, the loader's program text and cgroup helpers: no kernel."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from guard import layout
from guard.errors import Location
from guard.kernel import apply
from guard.kernel.cgroups import CgroupIndex, cgroup_depth, parse_mountinfo, walk_cgroups
from guard.kernel.loader import BPF_DIR, FAMILIES, program_text
from guard.policy.plan import (
    Decision,
    NetEntry,
    Plan,
    PortMatch,
    PortTable,
    Proto,
    RuleRef,
    Ruleset,
    RulesetDefaults,
    ScopeEntry,
    Verdict,
)

HERE = Location("t.yaml", 1, 1)


def make_plan(nets: tuple[tuple[int, str, int], ...] = ((0, "10.0.0.0/8", 0),),
              scopes: tuple[tuple[str, int], ...] = (("/a", 0),)) -> Plan:
    rules = (RuleRef(1, "p", "egress", 0, HERE), RuleRef(2, "p", "egress", -1, HERE))
    rulesets = tuple(Ruleset(i, ("p",)) for i in sorted({r for _, r in scopes}))
    return Plan(
        rules=rules,
        rulesets=rulesets,
        scopes=tuple(ScopeEntry(path, r) for path, r in scopes),
        defaults=tuple(RulesetDefaults(r.id, None, Decision(Verdict.ALLOW, 2))
                       for r in rulesets),
        exec=(),
        files=(),
        net=tuple(NetEntry(r, n, t) for r, n, t in nets),
        port_tables=(PortTable(0, (
            PortMatch(Proto.TCP, 25, 25, Decision(Verdict.DENY, 1)),
            PortMatch(Proto.ANY, 0, 65535, Decision(Verdict.ALLOW, 2)),
        )),),
    )


def test_net_key_counts_the_ruleset_bits_and_is_big_endian() -> None:
    name, key = apply.net_key(1, 5, "10.1.0.0/16")
    assert name == apply.NET4
    parsed = layout.Net4Key.from_buffer_copy(key)
    assert parsed.prefixlen == 32 + 16
    assert key[4:8] == (layout.MAX_RULESETS + 5).to_bytes(4, "big")
    assert bytes(parsed.addr) == bytes([10, 1, 0, 0])
    name6, key6 = apply.net_key(0, 0, "2001:db8::/32")
    assert name6 == apply.NET6 and len(key6) == ctypes.sizeof(layout.Net6Key)
    assert layout.Net6Key.from_buffer_copy(key6).prefixlen == 64


def test_ipv4_mapped_networks_become_ipv4_keys() -> None:
    name, key = apply.net_key(0, 0, "::ffff:10.0.0.0/104")
    assert name == apply.NET4
    assert layout.Net4Key.from_buffer_copy(key).prefixlen == 32 + 8


def test_slot_entries_qualify_every_id_with_the_slot() -> None:
    plan = make_plan()
    entries = apply.slot_entries(plan, 1, {"/a": 77})
    (scope_key, scope_value), = entries[apply.SCOPES].items()
    key = layout.ScopeKey.from_buffer_copy(scope_key)
    assert (key.slot, key.cgroup_id) == (1, 77)
    assert int.from_bytes(scope_value, "little") == 0  # slot-local ruleset id
    (ruleset_index, ruleset_value), = entries[apply.RULESETS].items()
    assert int.from_bytes(ruleset_index, "little") == layout.MAX_RULESETS
    rs = layout.RulesetC.from_buffer_copy(ruleset_value)
    assert (rs.egress_default.present, rs.egress_default.rule_id) == (1, 2)
    assert rs.exec_default.present == 0
    (table_key, table_value), = entries[apply.PORT_TABLES].items()
    assert int.from_bytes(table_key, "little") == layout.MAX_PORT_TABLES
    table = layout.PortTableC.from_buffer_copy(table_value)
    assert table.count == 2
    assert (table.lines[0].first, table.lines[0].proto, table.lines[0].verdict,
            table.lines[0].rule_id) == (25, 6, int(Verdict.DENY), 1)
    assert (table.lines[1].last, table.lines[1].proto) == (65535, 0)


def test_unresolved_scopes_have_no_id_and_are_followed_by_path_without_a_warning() -> None:
    # a cgroup made at /gone later is scoped by the mkdir tracepoint (scope.bpf.c)
    plan = make_plan(scopes=(("/a", 0), ("/gone", 0)))
    ids, warnings = apply.scope_ids(plan, {"/a": 5}.get)
    assert ids == {"/a": 5}
    assert warnings == []
    entries = apply.scope_path_entries(plan, 1)
    keys = [layout.ScopePathKey.from_buffer_copy(k) for k in entries]
    assert sorted((k.slot, k.path) for k in keys) == [(1, b"/a"), (1, b"/gone")]
    assert all(len(k) == ctypes.sizeof(layout.ScopePathKey) for k in entries)


def test_scope_paths_the_tracepoint_cannot_follow_are_said_and_left_out() -> None:
    longest = "/" + "x" * (layout.SCOPE_PATH_LEN - 3)  # with its NUL, one byte to spare
    too_long = "/" + "x" * (layout.SCOPE_PATH_LEN - 2)
    plan = make_plan(scopes=(("/", 0), (longest, 0), (too_long, 0)))
    assert [layout.ScopePathKey.from_buffer_copy(k).path
            for k in apply.scope_path_entries(plan, 0)] == [longest.encode()]
    ids, warnings = apply.scope_ids(plan, {"/": 1}.get)
    assert ids == {"/": 1}
    assert len(warnings) == 2 and all(too_long in w for w in warnings)


def test_scopes_deeper_than_the_kernel_walk_are_refused() -> None:
    deep = "/" + "/".join(f"d{i}" for i in range(layout.MAX_CGROUP_DEPTH))
    plan = make_plan(scopes=((deep, 0),))
    ids, warnings = apply.scope_ids(plan, lambda _path: 1)
    assert ids == {} and "deeper" in warnings[0]


def test_diff_counts_are_slot_independent() -> None:
    plan = make_plan()
    other = make_plan(nets=((0, "10.0.0.0/8", 0), (0, "192.168.0.0/16", 0)))
    before = apply.slot_entries(plan, 0, {"/a": 1})
    after = apply.slot_entries(other, 0, {"/a": 1})
    assert apply.diff_counts(before, before) == (0, 0, 0)
    assert apply.diff_counts(before, after) == (1, 0, 0)
    assert apply.diff_counts(after, before) == (0, 1, 0)


def test_validate_names_what_does_not_fit() -> None:
    plan = make_plan()
    assert apply.validate(plan) == []
    too_long = PortTable(0, tuple(
        PortMatch(Proto.TCP, p, p, Decision(Verdict.DENY, 1))
        for p in range(layout.MAX_PORT_LINES + 1)))
    bad = Plan(plan.rules, plan.rulesets, plan.scopes, plan.defaults, (), (), plan.net,
               (too_long,))
    assert any("lines" in p for p in apply.validate(bad))


def test_inode_maps_hold_100000_exact_paths_per_slot_and_say_when_they_are_full() -> None:
    # two keys per exact path: 100,000 exec paths and 100,000 other file paths
    keys = {i.to_bytes(24, "little"): b"" for i in range(400_000)}
    assert apply.over_capacity({apply.INODES: keys}) == []
    too_many = {i.to_bytes(24, "little"): b""
                for i in range(apply.SLOT_CAPACITY[apply.INODES] + 1)}
    (problem,) = apply.over_capacity({apply.INODES: too_many})
    assert problem.startswith(f"{len(too_many):,} guard_inodes entries, more than one slot's")


class FakeMaps:
    """Only for the error path: a map source whose maps fail on first use."""

    def map(self, name: str) -> object:
        raise OSError(f"no map {name}")


def test_validation_fails_before_any_map_is_touched() -> None:
    plan = make_plan()
    bad = Plan(plan.rules, (Ruleset(layout.MAX_RULESETS, ("p",)),), (), (), (), (), (), ())
    applier = apply.Applier(FakeMaps(), cgroup_lookup=lambda _p: 1)
    with pytest.raises(apply.ApplyError, match="ruleset id"):
        applier.apply(bad)


def test_program_text_pastes_each_shared_header_once_where_first_included() -> None:
    # bcc rewrites map calls only in its main file: no header of bpf/ may stay an #include
    text = program_text(FAMILIES)
    assert '#include "guard' not in text
    for header in ("guard.h", "guard_maps.h", "guard_scope.h", "guard_inode.h",
                   "guard_actor.h"):
        assert text.count(f'#line 1 "{header}"') == 1, header
    assert text.count("BPF_ARRAY(guard_config,") == 1
    assert text.index("BPF_ARRAY(guard_config") < text.index("int guard_connect4(")
    assert text.index("guard_scope_cache,") < text.index("int guard_connect4(")
    # a family alone gets what it includes, and only that
    net = program_text({"net"})
    assert "guard_scope_cache," in net and "guard_inodes," in net
    assert "guard_inode_decide" not in net and "task_struct *task" not in net
    # after a pasted header, the includer's own line numbers go on
    exec_text = program_text({"exec"})
    lines = (BPF_DIR / "exec.bpf.c").read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if line == '#include "guard_actor.h"')
    assert f'#line {number + 1} "exec.bpf.c"\n{lines[number]}\n' in exec_text
    assert set(FAMILIES) == {"net", "exec", "files", "tamper"}
    # the shared family is pasted in last, after the maps it uses
    text = program_text({"net", "scope"})
    mkdir = text.index("TRACEPOINT_PROBE(cgroup, cgroup_mkdir)")
    assert text.index("BPF_HASH(guard_scope_paths") < mkdir
    assert text.index("int guard_connect4(") < text.index('#line 1 "scope.bpf.c"')


def test_mountinfo_finds_cgroup2_wherever_it_is_mounted() -> None:
    hybrid = (
        "25 1 0:23 / /sys rw,nosuid - sysfs sysfs rw\n"
        "30 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n"
        "31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
        "32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    )
    assert parse_mountinfo(hybrid) == Path("/sys/fs/cgroup/unified")
    pure = "35 24 0:30 / /sys/fs/cgroup rw shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
    assert parse_mountinfo(pure) == Path("/sys/fs/cgroup")
    spaced = "35 24 0:30 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n"
    assert parse_mountinfo(spaced) == Path("/mnt/cg two")
    assert parse_mountinfo("25 1 0:23 / /sys rw - sysfs sysfs rw\n") is None


def test_cgroup_depth_is_the_ancestor_level() -> None:
    assert [cgroup_depth(p) for p in ("/", "/a", "/a/b/")] == [0, 1, 2]


def test_cgroup_index_walks_again_on_a_miss_but_not_too_often(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    index = CgroupIndex(mount=tmp_path, min_refresh_s=10.0)
    b_id = (tmp_path / "a" / "b").stat().st_ino
    assert index.path(b_id, now=100.0) == "/a/b"
    (tmp_path / "c").mkdir()
    c_id = (tmp_path / "c").stat().st_ino
    assert index.path(c_id, now=105.0) is None  # walked 5 s ago: no new walk yet
    assert index.path(c_id, now=111.0) == "/c"
    assert walk_cgroups(tmp_path)[tmp_path.stat().st_ino] == "/"


def test_a_unit_that_is_not_running_is_placed_in_its_slice() -> None:
    from guard.kernel.cgroups import unit_cgroup_from_show

    running = "ControlGroup=/system.slice/nginx.service\nSlice=system.slice\n"
    assert unit_cgroup_from_show("nginx.service", running) == "/system.slice/nginx.service"
    # loaded, not started: systemd knows its Slice= (a custom one here)
    stopped = "ControlGroup=\nSlice=app-web.slice\n"
    assert unit_cgroup_from_show("web.service", stopped) == "/app.slice/app-web.slice/web.service"
    assert unit_cgroup_from_show("x.service", "ControlGroup=\nSlice=-.slice\n") == "/x.service"
    # not loaded at all: the convention decides (None)
    assert unit_cgroup_from_show("gone.service", "ControlGroup=\nSlice=\n") is None
