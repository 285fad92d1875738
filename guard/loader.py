"""The kernel edge: compile guard's BPF programs with bcc, attach them, detach them.

``Kernel`` compiles the requested program families as ONE bcc unit, so the
shared maps of bpf/guard_maps.h exist once and every program sees the same
ones::

    bpf/guard_maps.h (pasted in), then those of bpf/net.bpf.c, bpf/exec.bpf.c,
    bpf/files.bpf.c and bpf/tamper.bpf.c that are requested and present

The network programs are attached to the host cgroup (the cgroup2 root by
default) through bpf_links (BPF_LINK_CREATE), so they run for every process
below it and coexist with other programs there. bcc attaches LSM programs
itself when it loads them, which is why "exec", "files" and "tamper" can only
be requested where BPF-LSM works (the QEMU guest, not the development host;
``probe_features`` says why).

Every attachment is a bpf_link held by a file descriptor of this process
(``links()``), so it ends with the process, however the process ends (even
SIGKILL), unless guard/pin.py pinned it in bpffs. ``close()`` (the context
manager calls it, also on exceptions) closes them all, and a failed load or
attach leaves nothing attached.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from guard.cgroups import CgroupError, cgroup_dir
from guard.layout import BPF_DIR

FAMILIES = ("net", "exec", "files", "tamper")
LSM_FAMILIES = ("exec", "files", "tamper")
LSM_FILE = Path("/sys/kernel/security/lsm")

# bcc's numbers (bcc.BPF / bcc.BPFAttachType), written out so that this module
# imports without bcc; tests/unit check they agree with bcc where bcc exists.
PROG_CGROUP_SKB = 8
PROG_CGROUP_SOCK_ADDR = 18
ATTACH_INET_EGRESS = 1
ATTACH_INET4_CONNECT = 10
ATTACH_INET6_CONNECT = 11
ATTACH_UDP4_SENDMSG = 14
ATTACH_UDP6_SENDMSG = 15


@dataclass(frozen=True)
class Program:
    """One cgroup program of a family: its function in the C source and its hook."""

    function: str
    prog_type: int
    attach_type: int


NET_PROGRAMS: tuple[Program, ...] = (
    Program("guard_connect4", PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT),
    Program("guard_connect6", PROG_CGROUP_SOCK_ADDR, ATTACH_INET6_CONNECT),
    Program("guard_sendmsg4", PROG_CGROUP_SOCK_ADDR, ATTACH_UDP4_SENDMSG),
    Program("guard_sendmsg6", PROG_CGROUP_SOCK_ADDR, ATTACH_UDP6_SENDMSG),
    Program("guard_egress", PROG_CGROUP_SKB, ATTACH_INET_EGRESS),
)
CGROUP_PROGRAMS: dict[str, tuple[Program, ...]] = {"net": NET_PROGRAMS}


class LoadError(RuntimeError):
    """The programs could not be compiled, loaded or attached; nothing stays attached."""


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """BPF_LINK_CREATE (libbpf, reached through bcc's library): the attachment
    lasts as long as the returned fd, or a pin of it, exists."""
    from bcc.libbcc import lib

    create = lib.bpf_link_create
    create.restype = ctypes.c_int
    create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    fd = int(create(prog_fd, target_fd, attach_type, None))
    if fd < 0:  # libbpf 1.x returns -errno
        raise OSError(-fd, f"BPF_LINK_CREATE: {os.strerror(-fd)}")
    return fd


@dataclass(frozen=True)
class Feature:
    family: str
    available: bool
    reason: str  # why not, or what was checked


def family_source(family: str, bpf_dir: Path = BPF_DIR) -> Path:
    return bpf_dir / f"{family}.bpf.c"


def program_text(families: Iterable[str], bpf_dir: Path = BPF_DIR) -> str:
    """The one C unit bcc compiles: the shared maps, then each family's file.

    guard_maps.h is pasted in rather than included: bcc rewrites map method
    calls (``guard_config.lookup(&k)``) only in the main file, and left
    unrewritten in a header they compile to calls through a null pointer that
    the verifier rejects ("unknown opcode 8d"). Its include guard then makes
    any ``#include "guard_maps.h"`` in a family file a no-op.
    """
    maps = bpf_dir / "guard_maps.h"
    parts = [f'#line 1 "{maps.name}"\n{maps.read_text()}\n']
    for family in sorted(set(families), key=FAMILIES.index):
        source = family_source(family, bpf_dir)
        parts.append(f'#line 1 "{source.name}"\n{source.read_text()}\n')
    return "".join(parts)


def cflags(bpf_dir: Path = BPF_DIR) -> list[str]:
    return [f"-I{bpf_dir}", "-Wno-unused-function"]


class Kernel:
    """Loaded and attached guard programs, and their maps by name.

    ``with Kernel(families={"net"}, host_cgroup="/") as kernel: ...``
    """

    def __init__(
        self,
        families: Iterable[str] = ("net",),
        host_cgroup: str = "/",
        bpf_dir: Path = BPF_DIR,
    ) -> None:
        requested = set(families)
        unknown = requested - set(FAMILIES)
        if unknown:
            raise LoadError(f"unknown program families: {', '.join(sorted(unknown))}")
        present = {f for f in requested if family_source(f, bpf_dir).exists()}
        self.families: frozenset[str] = frozenset(present)
        self.missing: frozenset[str] = frozenset(requested - present)
        self.host_cgroup = host_cgroup
        self._attached: list[tuple[str, int]] = []  # (function, bpf_link fd)
        self._cgroup_fd = -1
        self._bpf: Any = None
        if not self.families:
            raise LoadError("none of the requested program families has a source file")
        try:
            self._load(bpf_dir)
            self._attach()
        except BaseException:
            self.close()
            raise

    def _load(self, bpf_dir: Path) -> None:
        try:
            from bcc import BPF
        except ImportError as error:  # pragma: no cover - depends on the machine
            raise LoadError(f"bcc is not importable: {error}") from error
        try:
            self._bpf = BPF(
                text=program_text(self.families, bpf_dir).encode(), cflags=cflags(bpf_dir)
            )
        except Exception as error:
            raise LoadError(f"compiling/loading {sorted(self.families)} failed: {error}") from error

    def _attach(self) -> None:
        programs = [p for f in sorted(self.families) for p in CGROUP_PROGRAMS.get(f, ())]
        if not programs:
            return
        try:
            path = cgroup_dir(self.host_cgroup)
            self._cgroup_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (OSError, CgroupError) as error:
            raise LoadError(f"cannot open host cgroup {self.host_cgroup!r}: {error}") from error
        for program in programs:
            try:
                fn = self._bpf.load_func(program.function.encode(), program.prog_type,
                                         attach_type=program.attach_type)
                link = link_create(fn.fd, self._cgroup_fd, program.attach_type)
            except Exception as error:
                raise LoadError(f"{program.function}: {error}") from error
            self._attached.append((program.function, link))

    @property
    def bpf(self) -> Any:
        """The bcc BPF object (ring buffer polling, tables)."""
        if self._bpf is None:
            raise LoadError("the kernel programs are closed")
        return self._bpf

    @property
    def attached(self) -> tuple[str, ...]:
        return tuple(name for name, _link in self._attached)

    def links(self) -> dict[str, int]:
        """Every attachment as a bpf_link fd, by a name unique in this object:
        the cgroup programs' function names and bcc's LSM ones (lsm__HOOK)."""
        found = dict(self._attached)
        found.update((name.decode(), fd) for name, fd in self.bpf.lsm_fds.items())
        return found

    def map(self, name: str) -> Any:
        """One of the maps of guard_maps.h or of a family's file, by its C name.

        Through bcc's table cache: a ring buffer's callback lives in its table
        object, and a table made afresh each time would be collected while the
        kernel still calls back into it (a segfault in ring_buffer_poll).
        """
        return self.bpf[name.encode()]

    def close(self) -> None:
        """Close every attachment (a pinned one stays), then free programs and maps."""
        errors: list[str] = []
        while self._attached:
            name, link = self._attached.pop()
            try:
                os.close(link)
            except OSError as error:  # keep closing the others
                errors.append(f"{name}: {error}")
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1
        if self._bpf is not None:
            bpf, self._bpf = self._bpf, None
            bpf.cleanup()
        if errors:
            raise LoadError("detaching failed: " + "; ".join(errors))

    def __enter__(self) -> Kernel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- feature probes --------------------------------------------------------------

_PROBE_NET = """
int guard_probe(struct bpf_sock_addr *ctx)
{
	return bpf_get_current_ancestor_cgroup_id(0) ? 1 : 1;
}
"""

# bcc attaches LSM programs at load; this one allows everything and runs for a
# hook nothing in guard's path calls, and is detached at once by cleanup().
_PROBE_LSM = """
LSM_PROBE(syslog, int type)
{
	return 0;
}
"""

_feature_cache: dict[str, Feature] = {}


def lsm_has_bpf(lsm_file: Path = LSM_FILE) -> tuple[bool, str]:
    try:
        active = lsm_file.read_text().strip().split(",")
    except OSError as error:
        reason = "securityfs is not mounted" if error.errno == errno.ENOENT else str(error)
        return False, f"cannot read {lsm_file}: {reason}"
    if "bpf" not in active:
        return False, f"the bpf LSM is not active (lsm={','.join(active)})"
    return True, f"bpf LSM active (lsm={','.join(active)})"


def _try_load(text: str, prog_type: int | None, attach_type: int = -1) -> str | None:
    """None when bcc compiles and loads ``text``, else why not."""
    try:
        from bcc import BPF
    except ImportError as error:
        return f"bcc is not importable: {error}"
    bpf: Any = None
    try:
        bpf = BPF(text=text.encode())
        if prog_type is not None:
            bpf.load_func(b"guard_probe", prog_type, attach_type=attach_type)
        return None
    except Exception as error:
        text = str(error).strip()
        last = text.splitlines()[-1] if text else repr(error)
        if "super-user" in last:  # bcc's words for EPERM from BPF_PROG_LOAD
            return "the kernel refused to load it (EPERM; on this kind of host: no "\
                   "trampolines for LSM programs)"
        return last
    finally:
        if bpf is not None:
            bpf.cleanup()


def probe_family(family: str) -> Feature:
    """Whether this kernel can run a program family, with the reason; cached."""
    if family in _feature_cache:
        return _feature_cache[family]
    if family == "net":
        problem = _try_load(_PROBE_NET, PROG_CGROUP_SOCK_ADDR, ATTACH_INET4_CONNECT)
        feature = Feature(family, problem is None,
                          problem or "cgroup_sock_addr programs load")
    elif family in LSM_FAMILIES:
        ok, why = lsm_has_bpf()
        if ok:
            problem = _try_load(_PROBE_LSM, None)
            feature = Feature(family, problem is None,
                              f"BPF-LSM programs do not load: {problem}" if problem else why)
        else:
            feature = Feature(family, False, why)
        # the LSM families need the same thing; probe once for all
        for other in LSM_FAMILIES:
            _feature_cache[other] = Feature(other, feature.available, feature.reason)
    else:
        feature = Feature(family, False, "unknown program family")
    _feature_cache[family] = feature
    return feature


def probe_features(families: Iterable[str] = FAMILIES) -> dict[str, Feature]:
    return {family: probe_family(family) for family in families}
