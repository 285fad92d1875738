"""The file filter's entries (guard_file_filter, bpf/guard.h): pure, no kernel.

The kernel tests an inode's bits before every guard_inodes lookup and skips
the lookup when one is clear, so the filter must hold the bits of every inode
a key names, in the slot of the key, computed exactly as the kernel computes
them. The hash, word and mask are checked against guard.h itself, compiled by
the machine's C compiler, and against values that compiler gave once (in case
it is absent).
"""

from __future__ import annotations

import ctypes
import random
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest
from support import need

from guard import layout
from guard.errors import Location
from guard.kernel import apply
from guard.kernel.resolve import FileInodeEntry, InodeEntry, InodeKey, Match, summary_key
from guard.policy.plan import Decision, FileEntry, Plan, RuleRef, Ruleset, ScopeEntry, Verdict

AUDIT = Decision(Verdict.AUDIT, 1)
DENY = Decision(Verdict.DENY, 2)
DEV = layout.kernel_dev(0, 41)

# (ino, dev, word, mask), printed by a C program calling guard.h's functions
KNOWN = [
    (0, 0, 0, 0x0000000000000001),
    (0, 1, 40096, 0x0000800002000040),
    (0, 8388609, 35251, 0x0000000580000000),
    (1, 1, 58877, 0x0001000000800004),
    (4294967296, 1, 15768, 0x0008000000008040),
    (12345678901234, 4294967295, 57517, 0x0040001000010000),
]

PROBE_INPUTS = [
    (ino, dev)
    for ino in (0, 1, 2, 131, 4242, 0xFFFFFFFF, 1 << 32, (1 << 64) - 1, 12345678901234)
    for dev in (0, 1, layout.kernel_dev(8, 1), 42, 0xFFFFF, 0xFFFFFFFF)
]


def c_word_masks(tmp_path: Path, inputs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    compiler = shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    need(compiler is not None, "a C compiler (gcc) to compile the filter probe")
    assert compiler is not None
    lines = ["#include <stdio.h>", "#include <linux/types.h>",
             f'#include "{layout.HEADER}"', "int main(void) {", "  __u64 h;"]
    for ino, dev in inputs:
        lines.append(f"  h = guard_file_filter_hash({ino}ULL, {dev}U);")
        lines.append('  printf("%u %llu\\n", guard_file_filter_word(h), '
                     "(unsigned long long)guard_file_filter_mask(h));")
    lines += ["  return 0;", "}"]
    source, binary = tmp_path / "filter.c", tmp_path / "filter"
    source.write_text("\n".join(lines) + "\n")
    subprocess.run([compiler, "-Wall", "-Werror", "-o", str(binary), str(source)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return [(int(word), int(mask)) for word, mask in
            (line.split() for line in out.splitlines())]


def test_word_and_mask_are_the_headers(tmp_path: Path) -> None:
    rng = random.Random(7)
    inputs = PROBE_INPUTS + [(rng.getrandbits(64), rng.getrandbits(32)) for _ in range(200)]
    assert [layout.file_filter_word_mask(ino, dev) for ino, dev in inputs] == c_word_masks(
        tmp_path, inputs)


@pytest.mark.parametrize(("ino", "dev", "word", "mask"), KNOWN)
def test_word_and_mask_keep_their_known_values(ino: int, dev: int, word: int, mask: int) -> None:
    assert layout.file_filter_word_mask(ino, dev) == (word, mask)


def test_constants_agree_with_the_header() -> None:
    found = layout.header_constants()
    assert found["FILE_FILTER_WORDS_LOG2"] == layout.FILE_FILTER_WORDS_LOG2
    assert found["FILE_FILTER_WORDS"] == layout.FILE_FILTER_WORDS
    assert found["FILE_FILTER_PROBES"] == layout.FILE_FILTER_PROBES
    assert layout.FILE_FILTER_WORDS == 1 << layout.FILE_FILTER_WORDS_LOG2
    assert apply.SLOT_CAPACITY[apply.FILE_FILTER] == layout.FILE_FILTER_WORDS


def test_an_inode_has_at_most_its_probes_bits_in_one_word_of_the_slot() -> None:
    rng = random.Random(5)
    for _ in range(1000):
        word, mask = layout.file_filter_word_mask(rng.getrandbits(64), rng.getrandbits(32))
        assert 0 <= word < layout.FILE_FILTER_WORDS
        assert 1 <= bin(mask).count("1") <= layout.FILE_FILTER_PROBES and mask < 1 << 64


def hits(words: dict[int, int], ino: int, dev: int) -> bool:
    word, mask = layout.file_filter_word_mask(ino, dev)
    return words.get(word, 0) & mask == mask


def test_false_positives_are_rare_at_100000_inodes_across_file_systems() -> None:
    # 100,000 consecutive inodes of one file system: consecutive inodes of another
    # file system (the same numbers) and of this one (the next numbers) pass the filter
    # about 0.1% of the time (one bit per inode: 2.4%, and with a plain multiplicative
    # hash half of the other file system's inodes: what the mixer is for)
    n = 100_000
    words = apply.file_filter_words([item(ino) for ino in range(1000, 1000 + n)])
    assert all(hits(words, ino, DEV) for ino in range(1000, 1000 + n))
    for dev, first in ((layout.kernel_dev(0, 42), 1000), (layout.kernel_dev(8, 1), 1000),
                       (DEV, 1000 + n)):
        passed = sum(hits(words, ino, dev) for ino in range(first, first + n))
        assert passed / n < 0.003, (dev, passed)


# --- entries -----------------------------------------------------------------------------


def item(ino: int, match: Match = Match.EXACT, ruleset: int = 0, name_hash: int = 0,
         read: Decision | None = AUDIT, write: Decision | None = None,
         dev: int = DEV) -> FileInodeEntry:
    return FileInodeEntry(InodeKey(ino, dev, ruleset, match, name_hash), read, write, "/x")


def is_set(entries: dict[bytes, bytes], slot: int, ino: int, dev: int) -> bool:
    index, mask = layout.file_filter_word_mask(ino, dev)
    key = bytes(ctypes.c_uint32(slot * layout.FILE_FILTER_WORDS + index))
    word = int.from_bytes(entries.get(key, bytes(8)), "little")
    return word & mask == mask


def test_every_inode_of_every_key_is_in_its_slots_half() -> None:
    items = [item(10), item(11, Match.NAME, name_hash=0xABC), item(12, Match.SUBTREE),
             item(13, ruleset=5), item(14, dev=layout.kernel_dev(8, 1))]
    for slot in (0, 1):
        entries = apply.file_filter_entries(items, slot)
        for i in items:
            assert is_set(entries, slot, i.key.ino, i.key.dev)
            assert not is_set(entries, 1 - slot, i.key.ino, i.key.dev)
        low, high = slot * layout.FILE_FILTER_WORDS, (slot + 1) * layout.FILE_FILTER_WORDS
        for key, value in entries.items():
            assert low <= int.from_bytes(key, "little") < high
            assert len(value) == 8 and value != bytes(8)  # only nonzero words


def test_the_subtree_summary_sets_no_bit_and_nothing_else_does() -> None:
    summary = FileInodeEntry(summary_key(0), AUDIT, None, "(subtree summary)")
    assert apply.file_filter_entries([summary], 0) == {}
    entries = apply.file_filter_entries([summary, item(77)], 0)
    ((key, value),) = entries.items()
    assert (int.from_bytes(key, "little"), int.from_bytes(value, "little")) == \
        layout.file_filter_word_mask(77, DEV)


def test_a_first_fill_writes_at_most_one_word_per_inode() -> None:
    rng = random.Random(3)
    inodes = rng.sample(range(1, 10_000_000), 100_000)
    # an EXACT and a NAME key per file, the NAME keys all in a few directories
    items = [item(ino) for ino in inodes] + [
        item(d, Match.NAME, name_hash=h) for d in (2, 3, 4) for h in range(1, 1000)]
    words = apply.file_filter_words(items)
    assert len(words) <= len(set(inodes) | {2, 3, 4})
    assert all(0 <= index < layout.FILE_FILTER_WORDS for index in words)
    assert all(hits(words, ino, DEV) for ino in [*inodes, 2, 3, 4])


def test_subtree_bits_name_the_accesses_of_the_summary() -> None:
    items = [item(5), FileInodeEntry(summary_key(0), AUDIT, None, "s"),
             FileInodeEntry(summary_key(1), None, DENY, "s"),
             FileInodeEntry(summary_key(2), AUDIT, DENY, "s")]
    assert apply.subtree_bits(items) == {
        0: layout.ACCESS_READ, 1: layout.ACCESS_WRITE,
        2: layout.ACCESS_READ | layout.ACCESS_WRITE}
    # an exec summary adds exec; an exec rule's EXACT key does not
    runs = [InodeEntry(summary_key(2), DENY, "s"), InodeEntry(summary_key(3), AUDIT, "s"),
            InodeEntry(InodeKey(5, DEV, 4, Match.EXACT, 0), DENY, "/x")]
    assert apply.subtree_bits(items, runs) == {
        0: layout.ACCESS_READ, 1: layout.ACCESS_WRITE,
        2: layout.ACCESS_READ | layout.ACCESS_WRITE | layout.ACCESS_EXEC,
        3: layout.ACCESS_EXEC}


def test_exec_keys_are_in_the_filter_and_share_entries_with_file_keys() -> None:
    shared = InodeKey(70, DEV, 0, Match.EXACT, 0)
    runs = [InodeEntry(shared, DENY, "/x"), InodeEntry(InodeKey(71, DEV, 0, Match.NAME, 9),
                                                       AUDIT, "/y"),
            InodeEntry(summary_key(0), DENY, "(subtree summary)")]
    files = [FileInodeEntry(shared, AUDIT, None, "/x")]
    words = apply.file_filter_words([*runs, *files])
    assert hits(words, 70, DEV) and hits(words, 71, DEV)
    assert words == apply.file_filter_words([item(70), item(71)])  # the summary: no bit
    entries = apply.inode_entries(runs, files, 1)
    assert len(entries) == 3
    value = layout.InodeValue.from_buffer_copy(entries[bytes(shared.to_c(1))])
    assert (value.read.present, value.read.verdict, value.read.rule_id) == (1, 1, 1)
    assert (value.write.present, value.exec.present, value.exec.verdict) == (0, 1, 3)
    name = layout.InodeValue.from_buffer_copy(
        entries[bytes(InodeKey(71, DEV, 0, Match.NAME, 9).to_c(1))])
    assert (name.read.present, name.write.present, name.exec.verdict) == (0, 0, 1)


HERE = Location("t.yaml", 1, 1)


def files_plan(rulesets: int = 3) -> Plan:
    return Plan(
        rules=(RuleRef(1, "p", "files", 0, HERE), RuleRef(2, "p", "files", 1, HERE)),
        rulesets=tuple(Ruleset(i, ("p",)) for i in range(rulesets)),
        scopes=tuple(ScopeEntry(f"/c{i}", i) for i in range(rulesets)),
        defaults=(),
        exec=(),
        files=tuple(FileEntry(i, "/x", False, AUDIT, None) for i in range(rulesets - 1)),
        net=(),
        port_tables=(),
    )


def test_ruleset_entries_carry_the_subtree_bits() -> None:
    items = [item(5), FileInodeEntry(summary_key(1), None, DENY, "s")]
    entries = apply.slot_entries(files_plan(), 1, {}, file_items=items)
    got = {int.from_bytes(k, "little"): layout.RulesetC.from_buffer_copy(v)
           for k, v in entries[apply.RULESETS].items()}
    base = layout.MAX_RULESETS
    assert [(got[base + i].has_files, got[base + i].subtree) for i in range(3)] == [
        (1, 0), (1, layout.ACCESS_WRITE), (0, 0)]
    assert entries[apply.FILE_FILTER] == apply.file_filter_entries(items, 1)


def test_the_filter_is_not_counted_as_rule_entries() -> None:
    before = apply.slot_entries(files_plan(), 0, {}, file_items=[item(5)])
    after = apply.slot_entries(files_plan(), 0, {}, file_items=[item(5), item(6)])
    # the FILES entry only, though a filter word was added or changed too
    assert apply.diff_counts(before, after) == (1, 0, 0)


# --- through the Applier's fill, flip and clear --------------------------------------------


class ArrayMaps:
    """Only what MapWriter needs to be overridden below: never asked for a real map."""

    def map(self, name: str) -> object:
        raise AssertionError(f"no real map here: {name}")


class RecordingWriter(apply.MapWriter):
    """Map contents by name, arrays zeroed rather than deleted, and what the maps held
    at the moment of each flip."""

    def __init__(self) -> None:
        super().__init__(ArrayMaps())
        self.maps: dict[str, dict[bytes, bytes]] = {name: {} for name in apply.MAP_NAMES}
        self.config = layout.Config()
        self.at_flip: list[dict[bytes, bytes]] = []
        self.writes: dict[str, int] = {}

    def update(self, name: str, items: list[tuple[bytes, bytes]]) -> int:  # type: ignore[override]
        self.maps[name].update(items)
        self.writes[name] = self.writes.get(name, 0) + len(items)
        return len(items)

    def delete(self, name: str, keys: list[bytes]) -> int:  # type: ignore[override]
        for key in keys:
            if name in apply.ARRAY_MAPS:
                self.maps[name][key] = bytes(len(self.maps[name].get(key, bytes(8))))
            else:
                self.maps[name].pop(key, None)
        self.writes[name] = self.writes.get(name, 0) + len(keys)
        return len(keys)

    def entries(self, name: str, slot: int) -> dict[bytes, bytes]:
        return {k: v for k, v in self.maps[name].items()
                if int.from_bytes(k[:4], "little") == slot}

    def read_config(self) -> layout.Config:
        return layout.Config(active_slot=self.config.active_slot,
                             generation=self.config.generation)

    def write_config(self, config: layout.Config) -> None:
        self.at_flip.append(dict(self.maps[apply.FILE_FILTER]))
        self.config = config


class FixedApplier(apply.Applier):
    """Resolves a plan to the file items the test set last: no file system involved."""

    def resolve(self, plan: Plan) -> tuple[dict[str, int], list, list, list[str]]:  # type: ignore[override]
        return {}, [], list(getattr(self, "items", [])), []


def nonzero(words: dict[bytes, bytes], slot: int) -> dict[int, int]:
    out = {}
    for key, value in words.items():
        index, word = int.from_bytes(key, "little"), int.from_bytes(value, "little")
        if word and index // layout.FILE_FILTER_WORDS == slot:
            out[index % layout.FILE_FILTER_WORDS] = word
    return out


def run(applier: FixedApplier, items: Iterable[FileInodeEntry]) -> apply.ApplyResult:
    applier.items = list(items)  # type: ignore[attr-defined]
    return applier.apply(files_plan())


def test_apply_fills_the_idle_half_before_the_flip_and_zeroes_the_old_after() -> None:
    writer = RecordingWriter()
    applier = FixedApplier(ArrayMaps(), settle_s=0, scope_barrier=lambda: None)
    applier._writer = writer
    first = [item(i) for i in range(100, 1100)]
    second = [item(i) for i in range(600, 1600)]
    run(applier, first)  # slot 1
    want1 = apply.file_filter_words(first)
    assert nonzero(writer.at_flip[-1], 1) == want1  # complete when the flip is made
    assert writer.writes[apply.FILE_FILTER] == len(want1)  # a first fill: each word once
    run(applier, second)  # slot 0; slot 1 cleared after the flip
    assert nonzero(writer.at_flip[-1], 0) == apply.file_filter_words(second)
    assert nonzero(writer.at_flip[-1], 1) == want1  # the old half still whole at the flip
    assert nonzero(writer.maps[apply.FILE_FILTER], 1) == {}
    assert nonzero(writer.maps[apply.FILE_FILTER], 0) == apply.file_filter_words(second)
    writes = writer.writes[apply.FILE_FILTER]
    run(applier, second)  # the same again: nothing written
    assert writer.writes[apply.FILE_FILTER] == writes


def test_every_name_key_has_its_name_beside_it_and_two_names_under_one_key_are_refused() -> None:
    """guard_names: under each NAME key's bytes, the name the kernel compares on a hit
    (issue 15: a hash alone lets a computed collision match); other keys have none."""
    named = FileInodeEntry(InodeKey(71, DEV, 0, Match.NAME, 9, b"cache.json"), None, AUDIT, "/c")
    items = [named, item(70), FileInodeEntry(summary_key(0), None, DENY, "s")]
    entries = apply.slot_entries(Plan((), (), (), (), (), (), (), ()), 1, {}, (), items)
    (key, value), = entries[apply.NAMES].items()
    assert key == bytes(named.key.to_c(1))
    stored = layout.NameC.from_buffer_copy(value)
    assert bytes(stored.name[:stored.len]) == b"cache.json" and not any(stored.name[10:])
    twin = FileInodeEntry(InodeKey(71, DEV, 0, Match.NAME, 9, b"VCbjch.php"), None, DENY, "/v")
    with pytest.raises(apply.ApplyError, match="same 64-bit hash"):
        apply.name_entries([named, twin], 0)
    with pytest.raises(apply.ApplyError, match="cannot be a NAME key"):
        apply.name_entries([item(72, Match.NAME, name_hash=5)], 0)


def test_apply_removes_scope_entries_the_tracepoint_left_in_the_idle_slot() -> None:
    # bpf/scope.bpf.c may have written guard_scopes entries apply never made (a mkdir
    # that matched an old generation's path just before its clear): the fill of the
    # slot must not keep them, or the cgroup would get another scope's ruleset
    writer = RecordingWriter()
    barriers: list[int] = []
    applier = FixedApplier(ArrayMaps(), settle_s=0,
                           scope_barrier=lambda: barriers.append(len(writer.maps[
                               apply.SCOPE_PATHS])))
    applier._writer = writer
    stale = bytes(layout.ScopeKey(slot=1, cgroup_id=4242))
    writer.maps[apply.SCOPES][stale] = (2).to_bytes(4, "little")
    run(applier, [item(1)])  # into slot 1
    assert stale not in writer.maps[apply.SCOPES]
    # the paths were in the kernel before the barrier, and the barrier before the flip
    assert barriers == [3]
    paths = {layout.ScopePathKey.from_buffer_copy(k).path for k in writer.maps[apply.SCOPE_PATHS]}
    assert paths == {b"/c0", b"/c1", b"/c2"}
    run(applier, [item(2)])  # into slot 0; slot 1's paths go with the rest of it
    slots = {layout.ScopePathKey.from_buffer_copy(k).slot for k in writer.maps[apply.SCOPE_PATHS]}
    assert slots == {0}
