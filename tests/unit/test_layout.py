"""guard/layout.py is the C header seen from Python: prove they agree.

A probe program including bpf/guard.h is compiled with the machine's C compiler
and prints sizeof and offsetof of every struct and field; the ctypes mirrors
must give the same numbers. The constants layout.py writes out by hand must
equal those parsed from the header.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
from support import need

from guard import layout


def _fields(struct: type[ctypes.Structure]) -> list[str]:
    return [name for name, *_ in struct._fields_]


def _probe_source() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/types.h>",
        f'#include "{layout.HEADER}"',
        "int main(void) {",
    ]
    for c_name, struct in layout.STRUCTS.items():
        lines.append(f'  printf("{c_name} sizeof %zu\\n", sizeof(struct {c_name}));')
        for field in _fields(struct):
            lines.append(f'  printf("{c_name} {field} %zu\\n", '
                         f"offsetof(struct {c_name}, {field}));")
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], int]:
    compiler = shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    need(compiler is not None, "a C compiler (gcc) to compile the layout probe")
    assert compiler is not None
    work: Path = tmp_path_factory.mktemp("layout")
    source, binary = work / "probe.c", work / "probe"
    source.write_text(_probe_source())
    subprocess.run([compiler, "-Wall", "-Werror", "-o", str(binary), str(source)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    found: dict[tuple[str, str], int] = {}
    for line in out.splitlines():
        struct, field, value = line.split()
        found[(struct, field)] = int(value)
    return found


@pytest.mark.parametrize("c_name", sorted(layout.STRUCTS))
def test_struct_size_matches_the_header(c_name: str, c_layout: dict[tuple[str, str], int],
                                        ) -> None:
    assert ctypes.sizeof(layout.STRUCTS[c_name]) == c_layout[(c_name, "sizeof")]


@pytest.mark.parametrize("c_name", sorted(layout.STRUCTS))
def test_field_offsets_match_the_header(c_name: str, c_layout: dict[tuple[str, str], int],
                                        ) -> None:
    struct = layout.STRUCTS[c_name]
    for field in _fields(struct):
        assert getattr(struct, field).offset == c_layout[(c_name, field)], field


def test_every_struct_of_the_header_is_mirrored() -> None:
    import re

    declared = set(re.findall(r"^struct (guard_\w+) \{", layout.HEADER.read_text(), re.M))
    assert declared == set(layout.STRUCTS)


def test_constants_equal_the_header() -> None:
    found = layout.header_constants()
    expected = {
        "MAX_CGROUP_DEPTH": layout.MAX_CGROUP_DEPTH,
        "MAX_PATH_DEPTH": layout.MAX_PATH_DEPTH,
        "MAX_PORT_LINES": layout.MAX_PORT_LINES,
        "PATH_LEN": layout.PATH_LEN,
        "COMM_LEN": layout.COMM_LEN,
        "NAME_LEN": layout.NAME_LEN,
        "SCOPE_PATH_LEN": layout.SCOPE_PATH_LEN,
        "MAX_SCOPES": layout.MAX_SCOPES,
        "MAX_RULESETS": layout.MAX_RULESETS,
        "MAX_INODE_ENTRIES": layout.MAX_INODE_ENTRIES,
        "MAX_NET_ENTRIES": layout.MAX_NET_ENTRIES,
        "MAX_PORT_TABLES": layout.MAX_PORT_TABLES,
        "MAX_RULES": layout.MAX_RULES,
        "RINGBUF_BYTES": layout.RINGBUF_BYTES,
        "SLOTS": layout.SLOTS,
        "KIND_EXEC": layout.KIND_EXEC,
        "KIND_FILE": layout.KIND_FILE,
        "KIND_CONNECT": layout.KIND_CONNECT,
        "KIND_TAMPER": layout.KIND_TAMPER,
        "MATCH_EXACT": layout.MATCH_EXACT,
        "MATCH_SUBTREE": layout.MATCH_SUBTREE,
        "MATCH_NAME": layout.MATCH_NAME,
        "ACCESS_READ": layout.ACCESS_READ,
        "ACCESS_WRITE": layout.ACCESS_WRITE,
        "ACCESS_EXEC": layout.ACCESS_EXEC,
        "EVENT_UNDECIDED": layout.EVENT_UNDECIDED,
        "STAT_EVENTS": layout.STAT_EVENTS,
        "STAT_EVENTS_LOST": layout.STAT_EVENTS_LOST,
        "STAT_UNDECIDED": layout.STAT_UNDECIDED,
        "STAT_DENIED": layout.STAT_DENIED,
        "STAT_AUDITED": layout.STAT_AUDITED,
        "STAT_SUPPRESSED": layout.STAT_SUPPRESSED,
        "STAT_TAMPER": layout.STAT_TAMPER,
        "STAT_SCOPE_LOST": layout.STAT_SCOPE_LOST,
        "STAT_COUNT": layout.STAT_COUNT,
    }
    for name, value in expected.items():
        assert found[name] == value, name


def test_hook_and_verdict_numbers_equal_the_header() -> None:
    from guard.policy.plan import Verdict

    found = layout.header_constants()
    hooks = {
        "HOOK_BPRM_CHECK": "bprm_check", "HOOK_MMAP_FILE": "mmap_file",
        "HOOK_FILE_MPROTECT": "file_mprotect", "HOOK_FILE_OPEN": "file_open",
        "HOOK_PATH_CHANGE": "path_change", "HOOK_CONNECT4": "connect4",
        "HOOK_CONNECT6": "connect6", "HOOK_SENDMSG4": "sendmsg4",
        "HOOK_SENDMSG6": "sendmsg6", "HOOK_SKB_EGRESS": "skb_egress",
        "HOOK_BPF": "bpf", "HOOK_TASK_KILL": "task_kill", "HOOK_PTRACE": "ptrace",
        "HOOK_BPFFS_UNLINK": "bpffs_unlink", "HOOK_BPFFS_RENAME": "bpffs_rename",
        "HOOK_BPFFS_RMDIR": "bpffs_rmdir", "HOOK_BPFFS_UMOUNT": "bpffs_umount",
    }
    assert {layout.HOOK_NAMES[found[c]]: c for c in hooks} == {v: k for k, v in hooks.items()}
    assert len(layout.HOOK_NAMES) == len(hooks)
    for verdict in Verdict:
        assert found[verdict.name] == int(verdict)


def test_the_event_fits_the_ring_buffer_record() -> None:
    # bcc ring buffer records are 8-byte aligned; a size that is not would
    # make the reader's size check ambiguous
    assert ctypes.sizeof(layout.Event) % 8 == 0
