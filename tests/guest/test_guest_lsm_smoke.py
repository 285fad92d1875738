"""Proof that the guest layer works: a BPF-LSM program really denies an exec.

Runs in the BPF-LSM guest (tests/guestharness.py boots it). A small bcc
``LSM_PROBE(bprm_check_security)`` program denies executing any file whose inode
number is in a BPF hash; the test puts the inode of its own copy of /usr/bin/true
there and checks that exec of the copy fails with EPERM while /usr/bin/true runs.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.guest

DENY_EXEC_BY_INODE = rb"""
#include <linux/fs.h>
#include <linux/binfmts.h>
#include <linux/errno.h>

BPF_HASH(denied_inodes, u64, u8, 64);

LSM_PROBE(bprm_check_security, struct linux_binprm *bprm)
{
    u64 ino = bprm->file->f_inode->i_ino;
    if (denied_inodes.lookup(&ino))
        return -EPERM;
    return 0;
}
"""


@pytest.fixture(scope="session")
def deny_exec_program() -> Iterator[Any]:
    """The compiled and attached program, shared by the session (compiling takes ~30 s)."""
    from bcc import BPF

    bpf = BPF(text=DENY_EXEC_BY_INODE, cflags=["-w"])  # attaches on load; -w: no header noise
    try:
        yield bpf
    finally:
        bpf.cleanup()  # detaches the LSM program


@pytest.fixture
def true_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "true-copy"
    shutil.copy2("/usr/bin/true", copy)
    os.chmod(copy, 0o755)
    return copy


def test_exec_of_denied_inode_fails_with_eperm(deny_exec_program: Any, true_copy: Path) -> None:
    table = deny_exec_program[b"denied_inodes"]
    ino = os.stat(true_copy).st_ino
    assert ino != os.stat("/usr/bin/true").st_ino

    # Before the inode is in the map, the copy runs.
    assert subprocess.run([str(true_copy)], timeout=60).returncode == 0

    table[ctypes.c_uint64(ino)] = ctypes.c_uint8(1)
    try:
        with pytest.raises(PermissionError):
            subprocess.run([str(true_copy)], timeout=60)
        # Only that inode is denied: the original binary still runs.
        assert subprocess.run(["/usr/bin/true"], timeout=60).returncode == 0
    finally:
        del table[ctypes.c_uint64(ino)]

    # Out of the map, the copy runs again.
    assert subprocess.run([str(true_copy)], timeout=60).returncode == 0
