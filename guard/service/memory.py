"""The daemon's memory: give back what only the start needed, and say how much is its own.

bcc compiles guard's BPF C inside the daemon's process with clang/LLVM. Once the
programs are loaded, that compiler is never used again: a reload writes map
data, it never recompiles (guard/service/daemon.py). What the compile left behind:

* heap the compiler (and the compile of the policies) freed, but that glibc's
  malloc keeps for later: ``malloc_trim(0)`` returns the free pages of every
  arena to the kernel (``gc.collect()`` first, so Python's own garbage is
  freed before glibc is asked);
* the pages of libLLVM and libclang-cpp the compile touched: clean pages of
  read-only file mappings, counted in the process's resident set.
  ``madvise(MADV_PAGEOUT)`` (Linux 5.4+) unmaps them and reclaims them; a page
  that is ever touched again (bcc's module teardown at stop) is read back from
  the library file like any page of a program not yet run. The kernel skips
  pages that another process maps too, so this never takes memory from
  anyone else. Only the compiler's libraries are advised, and only their
  non-writable mappings, so nothing the daemon runs (Python, libbcc's map and
  ring buffer calls) is touched.

Nothing here can change what is enforced: the BPF programs and maps live in the
kernel, not in these pages, and every step is best effort. ``release`` never
raises; what a step could not do is in its result (a kernel without
MADV_PAGEOUT, a libc without malloc_trim: that step is a no-op).

Which number is the daemon's own: VmRSS counts every resident page the
process maps, including library pages it shares with other processes (and the
ring buffer, which is kernel memory mapped into the process). PSS divides each
shared page among the processes that map it; Private (clean + dirty) is what
only this process maps: what stopping it would give back. ``Usage`` carries
all of them, from /proc/PID/status and /proc/PID/smaps_rollup.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gc
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MADV_PAGEOUT = 21  # <asm-generic/mman-common.h>, Linux 5.4+

# The compiler's shared libraries, by file name: libLLVM-14.so.1, libclang-cpp.so.14,
# libclang.so.* (bcc's ABI is the same across distributions' builds of them).
COMPILER_LIBRARY = re.compile(r"^lib(?:LLVM|clang)[-.]")

_KB_FIELD = re.compile(r"^(\w+):\s+(\d+) kB$", re.MULTILINE)
_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)$")


# --- measuring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """One process's memory, in KiB. The smaps_rollup fields are None where the
    kernel has no /proc/PID/smaps_rollup (before 4.14)."""

    rss_kb: int  # VmRSS: every resident page mapped, shared or not
    hwm_kb: int  # VmHWM: the highest VmRSS so far (the compile's peak)
    anon_kb: int  # RssAnon: heap, stacks, Python's arenas, copied-on-write pages
    file_kb: int  # RssFile: mapped files (libraries, the ring buffer's pages)
    pss_kb: int | None  # Pss: each page divided by the number of processes mapping it
    private_kb: int | None  # Private_Clean + Private_Dirty: pages only this process maps
    private_dirty_kb: int | None

    def as_mb(self) -> dict[str, float | None]:
        """The fields in MB (MiB), rounded to 0.1, named without the unit."""
        return {name.removesuffix("_kb"): None if value is None else round(value / 1024, 1)
                for name, value in asdict(self).items()}


def kb_fields(text: str) -> dict[str, int]:
    """The ``Name:   N kB`` lines of /proc/PID/status or smaps_rollup, as name -> KiB."""
    return {name: int(value) for name, value in _KB_FIELD.findall(text)}


def usage_of(status: str, rollup: str | None) -> Usage:
    """A ``Usage`` from the texts of /proc/PID/status and /proc/PID/smaps_rollup."""
    s = kb_fields(status)
    r = kb_fields(rollup) if rollup is not None else {}

    def rolled(*names: str) -> int | None:
        return sum(r[n] for n in names) if all(n in r for n in names) else None

    return Usage(rss_kb=s.get("VmRSS", 0), hwm_kb=s.get("VmHWM", 0),
                 anon_kb=s.get("RssAnon", 0), file_kb=s.get("RssFile", 0),
                 pss_kb=rolled("Pss"), private_kb=rolled("Private_Clean", "Private_Dirty"),
                 private_dirty_kb=rolled("Private_Dirty"))


def read_usage(pid: int | str = "self") -> Usage:
    """``pid``'s memory now; OSError when it is gone or cannot be read."""
    status = Path(f"/proc/{pid}/status").read_text()
    try:
        rollup: str | None = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except FileNotFoundError:
        rollup = None
    return usage_of(status, rollup)


# --- the compiler's mappings ---------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str  # "r-xp"
    path: str  # "" for anonymous memory

    @property
    def size(self) -> int:
        return self.end - self.start


def parse_maps(text: str) -> list[Region]:
    regions: list[Region] = []
    for line in text.splitlines():
        found = _MAPS_LINE.match(line)
        if found:
            start, end, perms, path = found.groups()
            regions.append(Region(int(start, 16), int(end, 16), perms, path))
    return regions


def compiler_regions(regions: Iterable[Region]) -> list[Region]:
    """The non-writable file mappings of the compiler's libraries: pages the kernel can
    always read back from the file (writable ones may hold the dynamic linker's
    relocations, which exist nowhere else, and are left alone)."""
    return [r for r in regions
            if r.path.startswith("/") and "w" not in r.perms
            and COMPILER_LIBRARY.match(os.path.basename(r.path))]


# --- releasing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """What one step of ``release`` did; ``ok`` False: it could not run (detail says why)."""

    name: str  # "gc", "malloc_trim", "pageout"
    ok: bool
    detail: str


@dataclass(frozen=True)
class Release:
    """One ``release``: the usage before and after, and each step."""

    before: Usage | None
    after: Usage | None
    steps: tuple[Step, ...]
    seconds: float

    @property
    def released_kb(self) -> int | None:
        """VmRSS given back (before - after); None when either could not be read."""
        if self.before is None or self.after is None:
            return None
        return self.before.rss_kb - self.after.rss_kb

    def summary(self) -> str:
        """One line for the log: the numbers, then each step."""
        steps = "; ".join(f"{s.name}: {s.detail}" for s in self.steps)
        b, a = self.before, self.after
        if b is None or a is None:
            return f"memory after load: could not be measured; {steps}"
        line = (f"memory after load: resident {_mb(b.rss_kb)} -> {_mb(a.rss_kb)} "
                f"(anonymous {_mb(b.anon_kb)} -> {_mb(a.anon_kb)}, "
                f"files {_mb(b.file_kb)} -> {_mb(a.file_kb)}")
        if b.private_kb is not None and a.private_kb is not None and a.pss_kb is not None:
            line += f", private {_mb(b.private_kb)} -> {_mb(a.private_kb)}, pss {_mb(a.pss_kb)}"
        return f"{line}) in {self.seconds * 1000:.0f} ms; {steps}"


def _mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MB"


class _Libc:
    """The two libc calls ``release`` makes; a test passes its own."""

    def __init__(self) -> None:
        self._lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._lib.madvise.restype = ctypes.c_int

    def malloc_trim(self) -> int | None:
        """malloc_trim(0): 1 if memory went back to the kernel; None: no such call."""
        trim = getattr(self._lib, "malloc_trim", None)  # glibc only
        if trim is None:
            return None
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
        return int(trim(0))

    def madvise(self, start: int, length: int, advice: int) -> int:
        """0, or the errno."""
        if self._lib.madvise(start, length, advice) == 0:
            return 0
        return ctypes.get_errno() or errno.EIO


def page_out(regions: Iterable[Region], madvise: Callable[[int, int, int], int]) -> Step:
    """MADV_PAGEOUT on ``regions``; the first EINVAL means this kernel lacks it (before
    5.4: a no-op, said so). A region that fails otherwise (unmapped meanwhile: ENOMEM)
    is counted and skipped."""
    advised = failed = 0
    errors: set[str] = set()
    todo = list(regions)
    for region in todo:
        code = madvise(region.start, region.size, MADV_PAGEOUT)
        if code == errno.EINVAL and advised == 0:
            return Step("pageout", False, "MADV_PAGEOUT refused (EINVAL: a kernel before "
                        "5.4, or locked memory): the compiler's library pages stay resident")
        if code:
            failed += 1
            errors.add(errno.errorcode.get(code, str(code)))
        else:
            advised += region.size
    if not todo:
        return Step("pageout", True, "no compiler library mapped")
    detail = (f"{len(todo) - failed} mappings of the compiler libraries "
              f"({advised / 2**20:.0f} MB of address space) advised")
    if failed:
        detail += f", {failed} failed ({', '.join(sorted(errors))})"
    return Step("pageout", failed < len(todo), detail)


def release(libc: Any = None, maps: Callable[[], str] | None = None,
            measure: Callable[[], Usage] | None = None) -> Release:
    """Give back what the start left behind (see the module's docstring). Never raises.

    ``libc``, ``maps`` and ``measure`` are for tests: by default the process's own
    libc, /proc/self/maps and ``read_usage()``.
    """
    t0 = time.monotonic()
    measure = measure or read_usage
    read_maps = maps or (lambda: Path("/proc/self/maps").read_text())
    before = _try_measure(measure)
    steps: list[Step] = []
    try:
        found = gc.collect()
        steps.append(Step("gc", True, f"{found} unreachable objects"))
    except Exception as error:  # best effort, like every step
        steps.append(Step("gc", False, f"{type(error).__name__}: {error}"))
    try:
        lib = libc if libc is not None else _Libc()
    except Exception as error:  # no loadable libc (or no madvise in it)
        steps.append(Step("malloc_trim", False, f"no libc: {error}"))
        steps.append(Step("pageout", False, f"no libc: {error}"))
    else:
        steps.append(_step("malloc_trim", lambda: _trim(lib)))
        steps.append(_step("pageout",
                           lambda: page_out(compiler_regions(parse_maps(read_maps())),
                                            lib.madvise)))
    return Release(before, _try_measure(measure), tuple(steps), time.monotonic() - t0)


def _trim(lib: Any) -> Step:
    returned = lib.malloc_trim()
    if returned is None:
        return Step("malloc_trim", False, "this libc has no malloc_trim")
    return Step("malloc_trim", True, "free heap returned" if returned else "nothing to return")


def _step(name: str, run: Callable[[], Step]) -> Step:
    try:
        return run()
    except Exception as error:  # best effort: a failure is reported, never raised
        return Step(name, False, f"{type(error).__name__}: {error}")


def _try_measure(measure: Callable[[], Usage]) -> Usage | None:
    try:
        return measure()
    except Exception:  # /proc unreadable or unexpected: the numbers are missing, not the step
        return None


# --- guard status --------------------------------------------------------------------------


def status_body(done: Release | None) -> dict[str, Any]:
    """``guard status``'s "memory": the usage now (MB) and what the release after load did."""
    now = _try_measure(read_usage)  # the status thread answers whatever /proc says
    body: dict[str, Any] = {"now_mb": now.as_mb() if now else None, "release": None}
    if done is not None:
        body["release"] = {
            "released_mb": None if done.released_kb is None else round(done.released_kb / 1024, 1),
            "before_mb": done.before.as_mb() if done.before else None,
            "after_mb": done.after.as_mb() if done.after else None,
            "ms": round(done.seconds * 1000, 1),
            "steps": [asdict(s) for s in done.steps],
        }
    return body


def status_line(body: Mapping[str, Any]) -> str | None:
    """The human-readable line of ``status_body``; None without numbers."""
    now = body.get("now_mb")
    if not now:
        return None
    line = f"memory: resident {now['rss']} MB"
    if now.get("pss") is not None:
        line += f", own share (pss) {now['pss']} MB, private {now['private']} MB"
    line += f", peak {now['hwm']} MB"
    done = body.get("release")
    if done and done.get("released_mb") is not None:
        line += f"; {done['released_mb']} MB given back after load"
    return line


__all__ = ["Release", "Usage", "page_out", "read_usage", "release", "status_body",
           "status_line"]
