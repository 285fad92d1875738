"""The file filter in a real kernel map, on the host: without the file programs.

guard_file_filter is defined in guard_maps.h, so it exists whatever families
are loaded; here only the network family is (the host refuses LSM programs),
and apply must still write the filter words of a plan with file rules through
the batch path, into the idle slot's half before the flip, and zero the old
half after it. Whether the kernel reads the bits as apply writes them is the
guest's part (tests/guest/test_files_enforce.py: rules still match).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import need, need_root
from support.cgroup import TestCgroup

from guard import layout
from guard.errors import Location
from guard.kernel import apply
from guard.kernel.loader import Kernel, probe_family
from guard.policy.plan import Decision, FileEntry, Plan, RuleRef, Ruleset, ScopeEntry, Verdict

pytestmark = pytest.mark.host

HERE = Location("generated.yaml", 1, 1)


@pytest.fixture
def kernel() -> Iterator[tuple[Kernel, TestCgroup]]:
    need_root()
    feature = probe_family("net")
    need(feature.available, f"cgroup network programs: {feature.reason}")
    with TestCgroup.create() as cg, Kernel(families={"net"}, host_cgroup=cg.path) as k:
        yield k, cg


def files_plan(scope: str, paths: list[Path], subtree: Path) -> Plan:
    rules = (RuleRef(1, "f", "files", 0, HERE), RuleRef(2, "f", "files", 1, HERE))
    entries = [FileEntry(0, str(p), False, Decision(Verdict.AUDIT, 1), None) for p in paths]
    entries.append(FileEntry(0, str(subtree), True, None, Decision(Verdict.DENY, 2)))
    return Plan(rules=rules, rulesets=(Ruleset(0, ("f",)),), scopes=(ScopeEntry(scope, 0),),
                defaults=(), exec=(), files=tuple(sorted(entries)), net=(), port_tables=())


def words_in_kernel(k: Kernel, indices: set[int]) -> dict[int, int]:
    table: Any = k.map(apply.FILE_FILTER)
    out = {}
    for index in indices:
        word = int(table[ctypes.c_int(index)].value)
        if word:
            out[index] = word
    return out


def expected(plan: Plan, slot: int) -> dict[int, int]:
    import guard.kernel.resolve as resolve

    items, _warnings = resolve.resolve_files(plan)
    return {int.from_bytes(key, "little"): int.from_bytes(value, "little")
            for key, value in apply.file_filter_entries(items, slot).items()}


def test_apply_writes_and_clears_the_filter_words_without_the_file_programs(
        kernel: tuple[Kernel, TestCgroup], tmp_path: Path) -> None:
    k, cg = kernel
    assert "files" not in k.families
    table: Any = k.map(apply.FILE_FILTER)
    assert ctypes.sizeof(table.Leaf) == 8
    assert len(table) == layout.SLOTS * layout.FILE_FILTER_WORDS
    for sub in ("a", "b", "tree"):
        (tmp_path / sub).mkdir()
    first = [tmp_path / "a" / f"f{i}" for i in range(300)]
    second = [tmp_path / "b" / f"g{i}" for i in range(300)]
    for path in first + second:
        path.write_text("x")
    applier = apply.Applier(k, settle_s=0.01)
    plan1 = files_plan(cg.path, first, tmp_path / "tree")
    plan2 = files_plan(cg.path, second, tmp_path / "tree")
    want1, want2 = expected(plan1, 1), expected(plan2, 0)
    # 300 EXACT inodes, their directory (NAME keys) and the subtree's directory: a word
    # each, but for the few that share one
    assert 250 < len(want1) <= 302

    result = applier.apply(plan1)
    assert result.slot == 1
    assert words_in_kernel(k, set(want1) | {i + layout.FILE_FILTER_WORDS for i in want2}) == want1
    rs = layout.RulesetC.from_buffer_copy(bytes(k.map(apply.RULESETS)[ctypes.c_int(
        layout.MAX_RULESETS)]))
    assert (rs.has_files, rs.subtree) == (1, layout.ACCESS_WRITE)

    result = applier.apply(plan2)
    assert result.slot == 0
    # the old half is zeroed after the flip; the new half holds exactly the new words
    assert words_in_kernel(k, set(want1) | set(want2)) == want2

    result = applier.apply(files_plan(cg.path, [], tmp_path / "tree"))
    empty = expected(files_plan(cg.path, [], tmp_path / "tree"), 1)
    assert words_in_kernel(k, set(want1) | set(want2) | set(empty)) == empty
