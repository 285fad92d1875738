"""Apply: write a Plan into the BPF maps, atomically, with the two generation slots.

The kernel reads ``guard_config[0].active_slot`` once per decision and only
entries of that slot (bpf/guard.h). So a reload is:

1. resolve what the plan names on this machine: cgroup paths -> cgroup ids
   (missing ones are skipped with a warning), and, only when the plan has exec
   or file entries, paths -> inodes (``guard.kernel.resolve``);
2. turn plan + ids into map entries (pure: ``slot_entries``), and compare them
   with what the active slot holds: equal means nothing is written at all;
3. fill the idle slot;
4. flip ``active_slot`` in one write (and bump ``generation``);
5. after a short settle time (a decision that read the old slot just before
   the flip finishes within microseconds), delete the old slot's entries.

A failure in 3 leaves the active slot, and so enforcement, untouched; what was
written to the idle slot is remembered and cleared by the next apply.

Per slot the Plan is kept, so an event (slot-qualified ruleset + rule id) maps
back to its rule: ``Applier.rule_for``.

Capacity: both slots live in the same maps during a reload, so one slot may use
at most half of each map's entries (``validate``).

Exec and file rules share one map, ``guard_inodes``: one entry per key, a
decision per access (read, write, exec); entries of the two that have the same
key are merged into one (``inode_entries``).

The names of NAME keys (``guard_names``, bpf/guard.h) are derived from the
guard_inodes keys of a slot too: each NAME key's name under the same key bytes,
filled, flipped and cleared with them, so a NAME entry the kernel can see always
has its name beside it.

The file filter (``guard_file_filter``, bpf/guard.h) is derived from the
guard_inodes keys of a slot, exec and file rules alike: three bits in one
64-bit word per (ino, dev) they name, a Bloom filter in an array, both slots'
words in one map. It goes through the same fill, flip and clear as every
other entry: a word is an entry (only nonzero words are kept, an array element
is zeroed rather than deleted), so a fill writes only the words that changed
and the clear zeroes the old slot's words after the flip.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from guard import layout
from guard.policy.plan import Decision, Plan, RuleRef

if TYPE_CHECKING:  # guard.kernel.resolve is imported at run time only for plans with paths
    from guard.kernel.resolve import FileInodeEntry, InodeEntry

log = logging.getLogger(__name__)

SCOPES = "guard_scopes"
SCOPE_PATHS = "guard_scope_paths"
RULESETS = "guard_rulesets"
INODES = "guard_inodes"
NET4 = "guard_net4"
NET6 = "guard_net6"
PORT_TABLES = "guard_port_tables"
FILE_FILTER = "guard_file_filter"
NAMES = "guard_names"
CONFIG = "guard_config"
# scope paths first: the clear of an old slot stops the mkdir tracepoint from
# adding to it before it removes the slot's scope entries
MAP_NAMES = (SCOPE_PATHS, SCOPES, RULESETS, INODES, NAMES, FILE_FILTER, NET4, NET6, PORT_TABLES)
ARRAY_MAPS = frozenset({RULESETS, FILE_FILTER})  # entries cannot be deleted, only zeroed
DERIVED_MAPS = frozenset({FILE_FILTER, NAMES})  # computed from other maps' entries

# Entries one slot may use: half of each map (the other half is the other slot).
SLOT_CAPACITY = {
    SCOPES: layout.MAX_SCOPES // layout.SLOTS,
    SCOPE_PATHS: layout.MAX_SCOPES // layout.SLOTS,
    RULESETS: layout.MAX_RULESETS,
    INODES: layout.MAX_INODE_ENTRIES // layout.SLOTS,
    NAMES: layout.MAX_INODE_ENTRIES // layout.SLOTS,
    NET4: layout.MAX_NET_ENTRIES // layout.SLOTS,
    NET6: layout.MAX_NET_ENTRIES // layout.SLOTS,
    PORT_TABLES: layout.MAX_PORT_TABLES,
    FILE_FILTER: layout.FILE_FILTER_WORDS,  # words; a slot's bits never fall outside them
}

SlotEntries = dict[str, dict[bytes, bytes]]  # map name -> {key bytes: value bytes}


class ApplyError(RuntimeError):
    """The plan cannot be written (over a limit, or the kernel refused a write)."""


@dataclass(frozen=True)
class ApplyResult:
    changed: bool  # False: the live maps already held this plan, nothing was written
    generation: int
    slot: int  # the active slot after the apply
    added: int  # entries in the new set and not in the old (slot-independent)
    removed: int  # entries in the old set and not in the new
    updated: int  # same key, new value
    written: int  # map writes done (updates + deletes), 0 when unchanged
    seconds: float
    warnings: tuple[str, ...] = ()


# --- pure: plan -> bytes ----------------------------------------------------------


def decision_c(decision: Decision | None) -> layout.DecisionC:
    if decision is None:
        return layout.DecisionC()
    return layout.DecisionC(rule_id=decision.rule, verdict=int(decision.verdict), present=1)


def _u32(value: int) -> bytes:
    return bytes(ctypes.c_uint32(value))


def qualified_ruleset(slot: int, ruleset: int) -> int:
    return slot * layout.MAX_RULESETS + ruleset


def scope_entries(plan: Plan, slot: int, ids: Mapping[str, int]) -> dict[bytes, bytes]:
    """guard_scopes: {slot, cgroup id} -> slot-local ruleset id; unresolved paths skipped."""
    out: dict[bytes, bytes] = {}
    for scope in plan.scopes:
        cgroup = ids.get(scope.cgroup)
        if cgroup is not None:
            out[bytes(layout.ScopeKey(slot=slot, cgroup_id=cgroup))] = _u32(scope.ruleset)
    return out


def scope_path_bytes(path: str) -> bytes | None:
    """The path as bpf/scope.bpf.c sees it in the cgroup_mkdir event, or None when it
    cannot be followed there: the root (never made) or too long for the key (one byte
    is left for the NUL, one more so that a path cut by the kernel read never matches)."""
    if path == "/":
        return None
    raw = path.encode()
    return raw if len(raw) <= layout.SCOPE_PATH_LEN - 2 else None


def scope_path_entries(plan: Plan, slot: int) -> dict[bytes, bytes]:
    """guard_scope_paths: {slot, zero-padded path} -> slot-local ruleset id, for every
    scope a cgroup made later can be matched to (``scope_path_bytes``)."""
    out: dict[bytes, bytes] = {}
    for scope in plan.scopes:
        raw = scope_path_bytes(scope.cgroup)
        if raw is not None:
            out[bytes(layout.ScopePathKey(slot=slot, path=raw))] = _u32(scope.ruleset)
    return out


def _is_summary(item: InodeEntry | FileInodeEntry) -> bool:
    """The subtree summary key (ino 0, dev 0): no inode, a ruleset's strongest subtree verdict."""
    return item.key.ino == 0 and item.key.dev == 0 and item.key.match == layout.MATCH_SUBTREE


def subtree_bits(file_items: Iterable[FileInodeEntry],
                 exec_items: Iterable[InodeEntry] = ()) -> dict[int, int]:
    """Slot-local ruleset id -> the ACCESS_* bits its subtree summary has a decision for:
    the accesses for which exec and file programs walk the parents
    (guard_ruleset.subtree)."""
    out: dict[int, int] = {}
    for item in file_items:
        if _is_summary(item):
            bits = (layout.ACCESS_READ if item.read is not None else 0) | (
                layout.ACCESS_WRITE if item.write is not None else 0)
            out[item.key.ruleset] = out.get(item.key.ruleset, 0) | bits
    for exec_item in exec_items:
        if _is_summary(exec_item):
            out[exec_item.key.ruleset] = out.get(exec_item.key.ruleset, 0) | layout.ACCESS_EXEC
    return out


def ruleset_entries(plan: Plan, slot: int, file_items: Iterable[FileInodeEntry] = (),
                    exec_items: Iterable[InodeEntry] = ()) -> dict[bytes, bytes]:
    """guard_rulesets[slot * MAX_RULESETS + id]: the defaults, has_files and subtree."""
    with_files = {entry.ruleset for entry in plan.files}
    subtree = subtree_bits(file_items, exec_items)
    defaults = {d.ruleset: d for d in plan.defaults}
    out: dict[bytes, bytes] = {}
    for ruleset in plan.rulesets:
        d = defaults.get(ruleset.id)
        value = layout.RulesetC(
            exec_default=decision_c(d.exec if d else None),
            egress_default=decision_c(d.egress if d else None),
            has_files=1 if ruleset.id in with_files else 0,
            subtree=subtree.get(ruleset.id, 0),
        )
        out[_u32(qualified_ruleset(slot, ruleset.id))] = bytes(value)
    return out


@functools.lru_cache(maxsize=1 << 18)
def _network_parts(network: str) -> tuple[str, bytes, bytes]:
    """(map name, prefixlen field, address bytes); cached: a reload parses each once."""
    net = ipaddress.ip_network(network)
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:  # the model stores these as IPv4; be safe anyway
            net = ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    name = NET4 if net.version == 4 else NET6
    return name, _u32(32 + net.prefixlen), net.network_address.packed


def net_key(slot: int, ruleset: int, network: str) -> tuple[str, bytes]:
    """(map name, LPM key): prefixlen counts the 32 ruleset bits, ruleset is big-endian."""
    name, prefixlen, address = _network_parts(network)
    return name, prefixlen + qualified_ruleset(slot, ruleset).to_bytes(4, "big") + address


def net_entries(plan: Plan, slot: int) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """guard_net4 and guard_net6: prefix -> slot-local port table id."""
    v4: dict[bytes, bytes] = {}
    v6: dict[bytes, bytes] = {}
    for entry in plan.net:
        name, key = net_key(slot, entry.ruleset, entry.network)
        (v4 if name == NET4 else v6)[key] = _u32(entry.table)
    return v4, v6


def port_table_entries(plan: Plan, slot: int) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for table in plan.port_tables:
        value = layout.PortTableC(count=len(table.lines))
        for i, line in enumerate(table.lines):
            value.lines[i] = layout.PortLine(
                first=line.first, last=line.last, proto=int(line.proto),
                verdict=int(line.decision.verdict), rule_id=line.decision.rule,
            )
        out[_u32(slot * layout.MAX_PORT_TABLES + table.id)] = bytes(value)
    return out


def _inode_key(slot: int, item: InodeEntry | FileInodeEntry) -> bytes:
    return bytes(item.key.to_c(slot))


def _stronger(a: Decision | None, b: Decision | None) -> Decision | None:
    """Two entries for one inode (hard links): the stronger verdict, as plan.py rule 3."""
    if a is None or b is None:
        return a or b
    return a if (a.verdict, -a.rule) >= (b.verdict, -b.rule) else b


def inode_entries(exec_items: Iterable[InodeEntry], file_items: Iterable[FileInodeEntry],
                  slot: int) -> dict[bytes, bytes]:
    """guard_inodes: one value per key, with the exec decision of the exec items and the
    read and write decisions of the file items of that key (each the stronger of two
    items of one key: hard links)."""
    merged: dict[bytes, tuple[Decision | None, Decision | None, Decision | None]] = {}
    for exec_item in exec_items:
        key = _inode_key(slot, exec_item)
        read, write, run = merged.get(key, (None, None, None))
        merged[key] = (read, write, _stronger(run, exec_item.decision))
    for item in file_items:
        key = _inode_key(slot, item)
        read, write, run = merged.get(key, (None, None, None))
        merged[key] = (_stronger(read, item.read), _stronger(write, item.write), run)
    return {
        k: bytes(layout.InodeValue(read=decision_c(r), write=decision_c(w),
                                   exec=decision_c(x)))
        for k, (r, w, x) in merged.items()
    }


def name_entries(items: Iterable[InodeEntry | FileInodeEntry], slot: int) -> dict[bytes, bytes]:
    """guard_names: the name of every NAME key, under that key's bytes, which the kernel
    compares with the dentry's name on a hit. Two names under one key (a 64-bit hash
    collision in one directory, which policies cannot get by chance) are refused."""
    out: dict[bytes, bytes] = {}
    seen: dict[bytes, bytes] = {}
    for item in items:
        if item.key.match != layout.MATCH_NAME:
            continue
        key = _inode_key(slot, item)
        name = item.key.name
        if not 0 < len(name) < layout.NAME_LEN:
            raise ApplyError(f"{item.path}: name {name!r} cannot be a NAME key")
        if seen.setdefault(key, name) != name:
            raise ApplyError(f"{item.path}: the names {seen[key]!r} and {name!r} in one "
                             "directory have the same 64-bit hash; rename one of them")
        value = layout.NameC(len=len(name))
        ctypes.memmove(value.name, name, len(name))
        out[key] = bytes(value)
    return out


def file_filter_words(items: Iterable[InodeEntry | FileInodeEntry]) -> dict[int, int]:
    """Word index within a slot -> word: the bits of every (ino, dev) of a guard_inodes
    key (exec and file items alike), the summary excepted; words without a bit are left
    out (zero in the array)."""
    words: dict[int, int] = {}
    for ino, dev in {(i.key.ino, i.key.dev) for i in items if not _is_summary(i)}:
        index, mask = layout.file_filter_word_mask(ino, dev)
        words[index] = words.get(index, 0) | mask
    return words


def file_filter_entries(items: Iterable[InodeEntry | FileInodeEntry],
                        slot: int) -> dict[bytes, bytes]:
    """guard_file_filter[slot * FILE_FILTER_WORDS + word] = the word, nonzero words only."""
    base = slot * layout.FILE_FILTER_WORDS
    return {_u32(base + index): bytes(ctypes.c_uint64(word))
            for index, word in file_filter_words(items).items()}


def slot_entries(
    plan: Plan,
    slot: int,
    scope_ids: Mapping[str, int],
    exec_items: Sequence[InodeEntry] = (),
    file_items: Sequence[FileInodeEntry] = (),
) -> SlotEntries:
    """Every map entry of ``plan`` in ``slot``, as bytes: what apply writes."""
    v4, v6 = net_entries(plan, slot)
    return {
        SCOPE_PATHS: scope_path_entries(plan, slot),
        SCOPES: scope_entries(plan, slot, scope_ids),
        RULESETS: ruleset_entries(plan, slot, file_items, exec_items),
        INODES: inode_entries(exec_items, file_items, slot),
        NAMES: name_entries([*exec_items, *file_items], slot),
        FILE_FILTER: file_filter_entries([*exec_items, *file_items], slot),
        NET4: v4,
        NET6: v6,
        PORT_TABLES: port_table_entries(plan, slot),
    }


def validate(plan: Plan) -> list[str]:
    """Why the plan cannot be written, empty when it can (checked before any write)."""
    problems: list[str] = []
    for ruleset in plan.rulesets:
        if not 0 <= ruleset.id < layout.MAX_RULESETS:
            problems.append(f"ruleset id {ruleset.id} is outside 0..{layout.MAX_RULESETS - 1}")
    for table in plan.port_tables:
        if not 0 <= table.id < layout.MAX_PORT_TABLES:
            problems.append(f"port table id {table.id} is outside 0..{layout.MAX_PORT_TABLES - 1}")
        if len(table.lines) > layout.MAX_PORT_LINES:
            problems.append(f"port table {table.id} has {len(table.lines)} lines, "
                            f"more than {layout.MAX_PORT_LINES}")
    if len(plan.rules) > layout.MAX_RULES:
        problems.append(f"{len(plan.rules)} rules, more than {layout.MAX_RULES}")
    counts = {
        SCOPES: len(plan.scopes), NET4: sum(1 for n in plan.net if ":" not in n.network),
        NET6: sum(1 for n in plan.net if ":" in n.network),
    }
    for name, count in counts.items():
        if count > SLOT_CAPACITY[name]:
            problems.append(f"{count} entries for {name}, more than {SLOT_CAPACITY[name]}")
    return problems


def over_capacity(entries: SlotEntries) -> list[str]:
    """The inode map (guard_inodes) when one slot's entries would overfill it. Known
    only once paths are resolved (an exact path is two keys, a subtree one per mount
    below it; an exec and a file rule of one path share them), so apply checks it
    after resolving, still before any write."""
    return [f"{len(entries[name]):,} {name} entries, more than one slot's "
            f"{SLOT_CAPACITY[name]:,}"
            for name in (INODES,) if len(entries.get(name, {})) > SLOT_CAPACITY[name]]


def scope_ids(
    plan: Plan, lookup: Callable[[str], int | None]
) -> tuple[dict[str, int], list[str]]:
    """cgroup path -> id for every scope of the plan, and warnings for those skipped."""
    ids: dict[str, int] = {}
    warnings: list[str] = []
    for scope in plan.scopes:
        depth = len([p for p in scope.cgroup.split("/") if p])
        if depth >= layout.MAX_CGROUP_DEPTH:
            warnings.append(f"scope {scope.cgroup} is deeper than "
                            f"{layout.MAX_CGROUP_DEPTH - 1} levels; skipped")
            continue
        followed = scope_path_bytes(scope.cgroup) is not None
        if not followed and scope.cgroup != "/":
            warnings.append(f"scope {scope.cgroup} is longer than "
                            f"{layout.SCOPE_PATH_LEN - 2} bytes: a cgroup made at this path "
                            "after a reload is in the scope only from the next reload")
        found = lookup(scope.cgroup)
        if found is None:
            if not followed:
                warnings.append(f"scope {scope.cgroup} does not exist; its policies "
                                "apply once it exists and guard reloads")
            continue
        ids[scope.cgroup] = found
    return ids, warnings


def diff_counts(old: SlotEntries, new: SlotEntries) -> tuple[int, int, int]:
    """(added, removed, updated) between two entry sets of the same slot; derived maps
    (the file filter) are not counted: they change exactly when the entries they come
    from do."""
    added = removed = updated = 0
    for name in MAP_NAMES:
        if name in DERIVED_MAPS:
            continue
        before, after = old.get(name, {}), new.get(name, {})
        added += sum(1 for k in after if k not in before)
        removed += sum(1 for k in before if k not in after)
        updated += sum(1 for k, v in after.items() if k in before and before[k] != v)
    return added, removed, updated


# --- the map writes ----------------------------------------------------------------


class MapSource(Protocol):
    def map(self, name: str) -> Any: ...


BATCH = 4096  # entries per batch syscall


class MapWriter:
    """Bulk writes to bcc tables by bytes, with the batch syscalls where the map has them."""

    def __init__(self, maps: MapSource) -> None:
        self._maps = maps
        self._no_batch: set[str] = set()

    def _lib(self) -> Any:
        from bcc.libbcc import lib

        return lib

    def update(self, name: str, items: Sequence[tuple[bytes, bytes]]) -> int:
        if not items:
            return 0
        table = self._maps.map(name)
        key_size, value_size = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
        for i in range(0, len(items), BATCH):
            chunk = items[i : i + BATCH]
            keys = b"".join(k for k, _ in chunk)
            values = b"".join(v for _, v in chunk)
            if len(keys) != key_size * len(chunk) or len(values) != value_size * len(chunk):
                raise ApplyError(f"{name}: entry size differs from the map's "
                                 f"({key_size}/{value_size} bytes)")
            if name not in self._no_batch and self._update_batch(table, keys, values,
                                                                 len(chunk)):
                continue
            self._no_batch.add(name)
            self._update_each(name, table, keys, values, key_size, value_size)
        return len(items)

    def _update_batch(self, table: Any, keys: bytes, values: bytes, count: int) -> bool:
        kbuf = ctypes.create_string_buffer(keys, len(keys))
        vbuf = ctypes.create_string_buffer(values, len(values))
        n = ctypes.c_uint32(count)
        res = self._lib().bpf_update_batch(table.map_fd, kbuf, vbuf, ctypes.byref(n))
        if res == 0 and n.value == count:
            return True
        if n.value not in (0, count):
            # part written: the element-wise path rewrites all of it, harmless
            log.debug("batch update stopped after %d of %d", n.value, count)
        return False

    def _update_each(self, name: str, table: Any, keys: bytes, values: bytes,
                     key_size: int, value_size: int) -> None:
        lib = self._lib()
        kbuf = ctypes.create_string_buffer(keys, len(keys))
        vbuf = ctypes.create_string_buffer(values, len(values))
        base_k, base_v = ctypes.addressof(kbuf), ctypes.addressof(vbuf)
        for j in range(len(keys) // key_size):
            res = lib.bpf_update_elem(table.map_fd, base_k + j * key_size,
                                      base_v + j * value_size, 0)
            if res != 0:
                raise ApplyError(f"{name}: map update failed: {os.strerror(-res)}")

    def delete(self, name: str, keys: Sequence[bytes]) -> int:
        """Delete entries; a key already gone is not an error."""
        if not keys:
            return 0
        table = self._maps.map(name)
        if name in ARRAY_MAPS:  # arrays: zero the value
            zero = bytes(ctypes.sizeof(table.Leaf))
            return self.update(name, [(k, zero) for k in keys])
        lib = self._lib()
        key_size = ctypes.sizeof(table.Key)
        for i in range(0, len(keys), BATCH):
            chunk = keys[i : i + BATCH]
            buf = ctypes.create_string_buffer(b"".join(chunk), key_size * len(chunk))
            if name not in self._no_batch:
                n = ctypes.c_uint32(len(chunk))
                if lib.bpf_delete_batch(table.map_fd, buf, ctypes.byref(n)) == 0:
                    continue
            base = ctypes.addressof(buf)
            for j in range(len(chunk)):
                lib.bpf_delete_elem(table.map_fd, base + j * key_size)  # ENOENT is fine
        return len(keys)

    def entries(self, name: str, slot: int) -> dict[bytes, bytes]:
        """What a slot of a map keyed by (slot, ...) holds in the kernel now: the scope
        maps, which the mkdir tracepoint writes too (bpf/scope.bpf.c)."""
        table = self._maps.map(name)
        found: dict[bytes, bytes] = {}
        for key, value in table.items():
            raw = bytes(key)
            if int.from_bytes(raw[:4], "little") == slot:
                found[raw] = bytes(value)
        return found

    def read_config(self) -> layout.Config:
        table = self._maps.map(CONFIG)
        value = table[table.Key(0)]
        return layout.Config.from_buffer_copy(bytes(value))

    def write_config(self, config: layout.Config) -> None:
        table = self._maps.map(CONFIG)
        key = ctypes.c_uint32(0)
        buf = ctypes.create_string_buffer(bytes(config), ctypes.sizeof(config))
        if self._lib().bpf_update_elem(table.map_fd, ctypes.byref(key), buf, 0) != 0:
            raise ApplyError(f"{CONFIG}: update failed")


def _empty_entries() -> SlotEntries:
    return {name: {} for name in MAP_NAMES}


@dataclass
class Applier:
    """Owns the plan maps of one loaded Kernel; ``apply`` is the only writer."""

    maps: MapSource
    cgroup_lookup: Callable[[str], int | None] | None = None
    # after the idle slot's scope paths are written, before ids are resolved: lets
    # every mkdir already past the tracepoint finish (guard.cgroups.mutex_barrier,
    # the default with the default lookup; none with a given lookup)
    scope_barrier: Callable[[], None] | None = None
    settle_s: float = 0.05
    plans: list[Plan | None] = field(default_factory=lambda: [None, None])
    _live: list[SlotEntries] = field(default_factory=lambda: [_empty_entries(),
                                                              _empty_entries()])
    _writer: MapWriter | None = None
    _inputs: list[object] = field(default_factory=lambda: [None, None])

    def writer(self) -> MapWriter:
        if self._writer is None:
            self._writer = MapWriter(self.maps)
        return self._writer

    def resolve(self, plan: Plan) -> tuple[dict[str, int], list[InodeEntry], list[FileInodeEntry],
                                           list[str]]:
        lookup = self.cgroup_lookup
        if lookup is None:
            from guard.kernel.cgroups import cgroup_id

            lookup = cgroup_id
        ids, warnings = scope_ids(plan, lookup)
        exec_items: list[InodeEntry] = []
        file_items: list[FileInodeEntry] = []
        if plan.exec or plan.files:
            import guard.kernel.resolve as resolve  # lazily: only plans with paths need it

            if plan.exec:
                found, more = resolve.resolve_exec(plan)
                exec_items.extend(found)
                warnings.extend(str(w) for w in more)
            if plan.files:
                found_f, more_f = resolve.resolve_files(plan)
                file_items.extend(found_f)
                warnings.extend(str(w) for w in more_f)
        return ids, exec_items, file_items, warnings

    def apply(self, plan: Plan) -> ApplyResult:
        start = time.monotonic()
        problems = validate(plan)
        if problems:
            raise ApplyError("; ".join(problems))
        writer = self.writer()
        config = writer.read_config()
        active = config.active_slot & 1
        idle = 1 - active
        self._follow_scope_paths(plan, idle)
        ids, exec_items, file_items, warnings = self.resolve(plan)
        for warning in warnings:
            log.warning("%s", warning)

        inputs = (plan, ids, exec_items, file_items)
        if self.plans[active] is not None and inputs == self._inputs[active]:
            # same plan, same ids: the active slot already holds exactly this. Plans
            # compare without locations: keep the new one, so events name the lines
            # of the files as they are now
            self.plans[active] = plan
            return ApplyResult(False, config.generation, active, 0, 0, 0, 0,
                               time.monotonic() - start, tuple(warnings))
        current = slot_entries(plan, active, ids, exec_items, file_items)
        added, removed, updated = diff_counts(self._live[active], current)
        if not (added or removed or updated) and self.plans[active] is not None:
            # other rule names or locations, same entries: only the event mapping changes
            self.plans[active] = plan
            self._inputs[active] = inputs
            return ApplyResult(False, config.generation, active, 0, 0, 0, 0,
                               time.monotonic() - start, tuple(warnings))

        new = slot_entries(plan, idle, ids, exec_items, file_items)
        full = over_capacity(new)
        if full:
            raise ApplyError("the policies need more map entries than guard has: "
                             + "; ".join(full))
        written = self._fill(idle, new)
        self.plans[idle] = plan
        self._inputs[idle] = inputs
        generation = (config.generation + 1) & 0xFFFFFFFF
        writer.write_config(layout.Config(active_slot=idle, generation=generation))
        if self.settle_s > 0:
            time.sleep(self.settle_s)
        self._inputs[active] = None  # emptied below; its plan stays for late events
        try:
            written += self._clear(active)
        except (ApplyError, OSError) as error:
            # The new set is in force already: failing here would tell the caller
            # the old one still is. Leftovers in the idle slot are never read, and
            # the next fill of that slot removes them (_fill remembers them).
            warnings.append(f"clearing the previous generation's entries failed: {error}")
        return ApplyResult(True, generation, idle, added, removed, updated, written,
                           time.monotonic() - start, tuple(warnings))

    def _follow_scope_paths(self, plan: Plan, idle: int) -> None:
        """Before ids are resolved: the idle slot's scope maps as the kernel has them,
        then its scope paths written, then the barrier.

        The mkdir tracepoint (bpf/scope.bpf.c) writes guard_scopes entries in any
        slot that has the path, the idle one too, so what apply remembers of a slot
        may lack entries: it reads the slot back, and the fill removes what the new
        set does not have (a tracepoint that matched the path of an old generation
        just before its clear may have left one behind).

        Why nothing is missed between the walk and the flip: a cgroup made at a scope
        path after the paths are written gets its entry from the tracepoint; one whose
        tracepoint ran before holds cgroup_mutex until its directory is active, and the
        barrier (guard.cgroups.mutex_barrier: a BPF_PROG_QUERY on a cgroup, which takes
        that mutex) returns only after that, so the resolution below sees its directory."""
        writer = self.writer()
        live = self._live[idle]
        for name in (SCOPE_PATHS, SCOPES):
            live[name] = writer.entries(name, idle)
        paths = scope_path_entries(plan, idle)
        changed = [(k, v) for k, v in paths.items() if live[SCOPE_PATHS].get(k) != v]
        writer.update(SCOPE_PATHS, changed)
        live[SCOPE_PATHS].update(changed)
        if not plan.scopes:
            return
        barrier = self.scope_barrier
        if barrier is None and self.cgroup_lookup is None:
            from guard.kernel.cgroups import mutex_barrier

            barrier = mutex_barrier
        if barrier is not None:
            barrier()

    def _fill(self, slot: int, new: SlotEntries) -> int:
        """Make ``slot`` hold exactly ``new``; on failure remember all it may hold."""
        writer = self.writer()
        old = self._live[slot]
        written = 0
        try:
            for name in MAP_NAMES:
                before, after = old.get(name, {}), new[name]
                changed = [(k, v) for k, v in after.items() if before.get(k) != v]
                written += writer.update(name, changed)
                stale = [k for k in before if k not in after]
                written += writer.delete(name, stale)
        except BaseException:
            for name in MAP_NAMES:  # whatever it holds now is in old or new
                merged = dict(old.get(name, {}))
                merged.update(new[name])
                old[name] = merged
            raise
        self._live[slot] = {name: dict(new[name]) for name in MAP_NAMES}
        return written

    def _clear(self, slot: int) -> int:
        # plans[slot] is kept: late events of the old slot still map back to rules
        return self._fill(slot, _empty_entries())

    def rule_for(self, ruleset: int, rule_id: int) -> RuleRef | None:
        """The rule behind an event's (slot-qualified ruleset, rule_id)."""
        slot = (ruleset // layout.MAX_RULESETS) & 1
        plan = self.plans[slot]
        return plan.rule(rule_id) if plan is not None else None

    @property
    def live_entries(self) -> int:
        return sum(len(m) for slot in self._live for m in slot.values())
