"""ctypes mirrors of bpf/guard.h: map keys, values and the event record.

Only this module knows the byte layout the kernel programs use. The constants
are read from guard.h itself (``header_constants``) in the layout test, which
also compiles a probe to compare sizes and offsets, so the two cannot drift.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
HEADER = BPF_DIR / "guard.h"

MAX_CGROUP_DEPTH = 32
MAX_PATH_DEPTH = 32
MAX_PORT_LINES = 16
PATH_LEN = 256
COMM_LEN = 16
NAME_LEN = 256  # a path component: NAME_MAX + 1
SCOPE_PATH_LEN = 256  # guard_scope_paths: a scope's cgroup path with its NUL
MAX_SCOPES = 8192
MAX_RULESETS = 1024
MAX_INODE_ENTRIES = 1048576  # guard_inodes: exec and file rules' keys
MAX_NET_ENTRIES = 262144
MAX_PORT_TABLES = 16384
MAX_RULES = 262144
RINGBUF_BYTES = 4 * 1024 * 1024
SLOTS = 2
FILE_FILTER_WORDS_LOG2 = 16
FILE_FILTER_WORDS = 65536  # per slot
FILE_FILTER_PROBES = 3  # bits per inode, in one word
# the constants of guard_file_filter_hash(): dev's spread, the two finalizer multipliers
FILE_FILTER_DEV_MULTIPLIER = 0x9E3779B97F4A7C15
FILE_FILTER_MIX = (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53)
_U64 = (1 << 64) - 1

KIND_EXEC, KIND_FILE, KIND_CONNECT, KIND_TAMPER = 1, 2, 3, 4
KIND_NAMES = {KIND_EXEC: "exec", KIND_FILE: "file", KIND_CONNECT: "connect",
              KIND_TAMPER: "tamper"}

HOOK_NAMES = {
    1: "bprm_check",
    2: "mmap_file",
    3: "file_mprotect",
    4: "file_open",
    5: "path_change",
    6: "connect4",
    7: "connect6",
    8: "sendmsg4",
    9: "sendmsg6",
    10: "skb_egress",
    11: "bpf",
    12: "task_kill",
    13: "ptrace",
    14: "bpffs_unlink",
    15: "bpffs_rename",
    16: "bpffs_rmdir",
    17: "bpffs_umount",
}
HOOK_BPF, HOOK_TASK_KILL, HOOK_PTRACE = 11, 12, 13
HOOK_BPFFS_UNLINK, HOOK_BPFFS_RENAME, HOOK_BPFFS_RMDIR, HOOK_BPFFS_UMOUNT = 14, 15, 16, 17

MATCH_EXACT, MATCH_SUBTREE, MATCH_NAME = 1, 2, 3
ACCESS_READ, ACCESS_WRITE, ACCESS_EXEC = 1, 2, 4
EVENT_UNDECIDED = 1

STAT_EVENTS, STAT_EVENTS_LOST, STAT_UNDECIDED = 0, 1, 2
STAT_DENIED, STAT_AUDITED, STAT_SUPPRESSED, STAT_TAMPER = 3, 4, 5, 6
STAT_SCOPE_LOST = 7  # new cgroups at a scope path guard_scopes had no room for
STAT_COUNT = 8


class Config(ctypes.Structure):
    _fields_ = [("active_slot", ctypes.c_uint32), ("generation", ctypes.c_uint32)]


class TamperConfig(ctypes.Structure):
    _fields_ = [
        ("daemon_tgid", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("host_cgroup_id", ctypes.c_uint64),
    ]


class DecisionC(ctypes.Structure):
    _fields_ = [
        ("rule_id", ctypes.c_uint32),
        ("verdict", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 2),
    ]


class ScopeKey(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("cgroup_id", ctypes.c_uint64),
    ]


class ScopePathKey(ctypes.Structure):
    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("path", ctypes.c_char * SCOPE_PATH_LEN),  # zero-padded, relative to the cgroup2 root
    ]


class RulesetC(ctypes.Structure):
    _fields_ = [
        ("exec_default", DecisionC),
        ("egress_default", DecisionC),
        ("has_files", ctypes.c_uint32),
        ("subtree", ctypes.c_uint32),  # ACCESS_* bits some subtree rule decides
    ]


class InodeKey(ctypes.Structure):
    _fields_ = [
        ("ino", ctypes.c_uint64),
        ("dev", ctypes.c_uint32),
        ("ruleset", ctypes.c_uint32),
        ("match", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("name_hash", ctypes.c_uint64),  # NAME keys: FNV-1a 64 of the name
    ]


class NameC(ctypes.Structure):
    """guard_names' value: the name of a NAME key, compared byte for byte in the kernel."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("name", ctypes.c_ubyte * NAME_LEN),
    ]


class InodeValue(ctypes.Structure):
    """guard_inodes' value: a decision per access (read, write: file rules; exec)."""

    _fields_ = [("read", DecisionC), ("write", DecisionC), ("exec", DecisionC)]


class Net4Key(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("ruleset", ctypes.c_uint32),  # big-endian
        ("addr", ctypes.c_uint8 * 4),
    ]


class Net6Key(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("ruleset", ctypes.c_uint32),  # big-endian
        ("addr", ctypes.c_uint8 * 16),
    ]


class PortLine(ctypes.Structure):
    _fields_ = [
        ("first", ctypes.c_uint16),
        ("last", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("_pad", ctypes.c_uint16),
        ("rule_id", ctypes.c_uint32),
    ]


class PortTableC(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("lines", PortLine * MAX_PORT_LINES),
    ]


class Event(ctypes.Structure):
    _fields_ = [
        ("time_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("ppid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("rule_id", ctypes.c_uint32),
        ("ruleset", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("kind", ctypes.c_uint8),
        ("hook", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("access", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("addr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * COMM_LEN),
        ("path", ctypes.c_char * PATH_LEN),
        ("exe", ctypes.c_char * PATH_LEN),
    ]


STRUCTS: dict[str, type[ctypes.Structure]] = {
    "guard_config": Config,
    "guard_decision": DecisionC,
    "guard_scope_key": ScopeKey,
    "guard_scope_path_key": ScopePathKey,
    "guard_ruleset": RulesetC,
    "guard_inode_key": InodeKey,
    "guard_inode_value": InodeValue,
    "guard_name": NameC,
    "guard_net4_key": Net4Key,
    "guard_net6_key": Net6Key,
    "guard_port_line": PortLine,
    "guard_port_table": PortTableC,
    "guard_event": Event,
    "guard_tamper_config": TamperConfig,
}


def header_constants(header: Path = HEADER) -> dict[str, int]:
    """The ``#define GUARD_X <int>`` and ``GUARD_X = <int>`` enum values in guard.h."""
    text = header.read_text()
    found: dict[str, int] = {}
    for name, expr in re.findall(r"#define\s+GUARD_(\w+)\s+\(?([0-9 *]+)\)?", text):
        found[name] = eval_product(expr)
    for name, value in re.findall(r"\bGUARD_(\w+)\s*=\s*(\d+)", text):
        found[name] = int(value)
    return found


def eval_product(expr: str) -> int:
    result = 1
    for factor in expr.split("*"):
        result *= int(factor.strip())
    return result


def kernel_dev(major: int, minor: int) -> int:
    """The kernel's internal dev_t (``sb->s_dev``), as the programs read it."""
    return (major << 20) | minor


def file_filter_hash(ino: int, dev: int) -> int:
    """guard_file_filter_hash() of guard.h: ino + dev * DEV_MULTIPLIER, mixed by
    MurmurHash3's 64-bit finalizer."""
    x = (ino + dev * FILE_FILTER_DEV_MULTIPLIER) & _U64
    for multiplier in FILE_FILTER_MIX:
        x ^= x >> 33
        x = (x * multiplier) & _U64
    x ^= x >> 33
    return x


def file_filter_word_mask(ino: int, dev: int) -> tuple[int, int]:
    """(word within a slot, bits in it) of (ino, dev) in the file filter, as
    guard_file_filter_word() and guard_file_filter_mask() of guard.h give them."""
    x = file_filter_hash(ino, dev)
    mask = 0
    for shift in (42, 36, 30):  # FILE_FILTER_PROBES fields of 6 bits below the word's
        mask |= 1 << ((x >> shift) & 63)
    return x >> (64 - FILE_FILTER_WORDS_LOG2), mask
