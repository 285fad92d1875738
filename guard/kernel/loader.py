"""The kernel edge: compile guard's BPF programs with bcc, attach them, detach them.

``Kernel`` compiles the requested program families as ONE bcc unit, so the
shared maps of bpf/guard_maps.h (and of the other shared headers) exist once
and every program sees the same ones::

    those of bpf/net.bpf.c, bpf/exec.bpf.c, bpf/files.bpf.c and
    bpf/tamper.bpf.c that are requested and present, each header of bpf/
    pasted in where it is first included

The network programs are attached to the host cgroup (the cgroup2 root by
default) through bpf_links (BPF_LINK_CREATE), so they run for every process
below it and coexist with other programs there. bcc attaches LSM programs
itself when it loads them, which is why "exec", "files" and "tamper" can only
be requested where BPF-LSM works (the QEMU guest, not the development host;
``probe_features`` says why).

Every attachment is a bpf_link held by a file descriptor of this process
(``links()``), so it ends with the process, however the process ends (even
SIGKILL), unless guard/kernel/pin.py pinned it in bpffs. ``close()`` (the context
manager calls it, also on exceptions) closes them all, and a failed load or
attach leaves nothing attached.

One family that fails to compile or load does not take the others down. The
unit is one, so one clang error or one program the verifier rejects fails it
all; ``Kernel`` then names the family at fault (``attribute``: clang's
diagnostics carry the ``#line`` file name, bcc's load failure the program's
function, a map that cannot be created its name, and ``family_owners`` maps
each of them to its family from the sources), compiles again without it, and
records why in ``Kernel.dropped``. Every failed attempt drops at least one
family, so there are at most as many attempts as families. A failure that
names no family (the shared header, bcc itself, the kernel headers, an
unknown message) fails the whole load, as one family at a time would not
help: such causes are shared by every subset, and each extra attempt costs a
full compile (about 1 s natively, 30 s in the emulated guest) before the same
error, and a search by elimination could leave a family out for a transient
cause.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from guard.kernel.cgroups import CgroupError, cgroup_dir
from guard.layout import BPF_DIR
from guard.policy.model import PolicySet

FAMILIES = ("net", "exec", "files", "tamper")
# Loaded with any family, never requested: bpf/scope.bpf.c, the cgroup_mkdir and
# cgroup_rmdir tracepoints that put a cgroup made at a scope's path in that scope.
SHARED_FAMILIES = ("scope",)
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
    """The programs could not be compiled, loaded or attached; nothing stays attached.

    ``reasons``: each family that was tried and left out, with why (empty when
    the failure named no family)."""

    def __init__(self, message: str, reasons: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.reasons: dict[str, str] = dict(reasons or {})


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


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"(?P<name>[^"/]+)"')


def program_text(families: Iterable[str], bpf_dir: Path = BPF_DIR) -> str:
    """The one C unit bcc compiles: each family's file, with the headers of bpf/
    it includes (``#include "guard_maps.h"``, and those they include) pasted in
    where they are first included, and left out where they are included again.

    Pasted in rather than included: bcc rewrites map method calls
    (``guard_config.lookup(&k)``) only in the main file, and left unrewritten
    in a header they compile to calls through a null pointer that the verifier
    rejects ("unknown opcode 8d"). ``#line`` markers keep every diagnostic's
    file and line those of the file that has the code.
    """
    pasted: set[str] = set()

    def paste(path: Path) -> str:
        out = [f'#line 1 "{path.name}"\n']
        for number, line in enumerate(path.read_text().splitlines(keepends=True), 1):
            match = _LOCAL_INCLUDE.match(line)
            if match is None or not (bpf_dir / match["name"]).is_file():
                out.append(line)
                continue
            if match["name"] not in pasted:
                pasted.add(match["name"])
                out.append(paste(bpf_dir / match["name"]))
            out.append(f'#line {number + 1} "{path.name}"\n')
        if out[-1] and not out[-1].endswith("\n"):
            out.append("\n")
        return "".join(out)

    return "".join(paste(family_source(family, bpf_dir))
                   for family in sorted(set(families), key=(FAMILIES + SHARED_FAMILIES).index))


# Warnings clang gives about the kernel's own headers, never about guard's C: they
# would bury the start-up lines under a hundred lines of noise (errors still show).
QUIET_CFLAGS = (
    "-Wno-unused-function",
    "-Wno-ignored-attributes",  # 'nocf_check' attribute ignored (x86 ibt.h)
    "-Wno-unknown-warning-option",
    "-Wno-address-of-packed-member",
    "-Wno-gnu-variable-sized-type-not-at-end",
    "-Wno-compare-distinct-pointer-types",
    "-Wno-unused-value",
    "-Wno-pointer-sign",
)


def cflags(bpf_dir: Path = BPF_DIR) -> list[str]:
    return [f"-I{bpf_dir}", *QUIET_CFLAGS]


# --- which family a failed load belongs to ------------------------------------------

_LSM_PROBE = re.compile(r"\bLSM_PROBE\(\s*(\w+)")
_TRACEPOINT_PROBE = re.compile(r"\bTRACEPOINT_PROBE\(\s*(\w+)\s*,\s*(\w+)")
# BPF_HASH(name, ...), BPF_ARRAY(name, ...), BPF_SK_STORAGE(name, ...), ...
_MAP_PLAIN = re.compile(r"\bBPF_[A-Z0-9_]+\(\s*([A-Za-z_]\w*)\s*[,)]")
# BPF_TABLE("type", key, leaf, name, ...), BPF_F_TABLE(...): the name is 4th
_MAP_TABLE = re.compile(r'\bBPF_(?:F_)?TABLE\(\s*"[^"]*"\s*,\s*[^,]+,\s*[^,]+,\s*(\w+)')
_DIAGNOSTIC = re.compile(r"^(?P<file>[^\s:]+):\d+:\d+: (?:fatal )?error: ")
_INCLUDED = re.compile(r"^In file included from (?P<file>[^\s:]+):\d+")
_LOAD_FAILED = re.compile(
    r"Failed to (?:load|attach) BPF program b?'?(?P<program>\w+)'?(?::| to) (?P<why>.*)")
_MAP_FAILED = re.compile(r"could not open bpf map: (?P<map>\w+), error: (?P<why>.*)")
_PROCESSED = re.compile(r"^processed \d+ insns")
_VERIFIER_START = "bpf: Failed to load program"


@dataclass(frozen=True)
class Owners:
    """Which family each source file, program function and map of a unit belongs to."""

    files: Mapping[str, str] = field(default_factory=dict)  # "exec.bpf.c" -> "exec"
    programs: Mapping[str, str] = field(default_factory=dict)  # "lsm__file_open" -> "files"
    maps: Mapping[str, str] = field(default_factory=dict)  # "guard_net_folds" -> "net"


def family_owners(sources: Mapping[str, str]) -> Owners:
    """Owners from each family's C text: its file name, its LSM_PROBEs (bcc names
    them lsm__HOOK), its cgroup programs (CGROUP_PROGRAMS) and the maps it declares."""
    files: dict[str, str] = {}
    programs: dict[str, str] = {}
    maps: dict[str, str] = {}
    for family, text in sources.items():
        files[f"{family}.bpf.c"] = family
        programs.update((f"lsm__{hook}", family) for hook in _LSM_PROBE.findall(text))
        programs.update((f"tracepoint__{category}__{event}", family)
                        for category, event in _TRACEPOINT_PROBE.findall(text))
        programs.update((p.function, family) for p in CGROUP_PROGRAMS.get(family, ()))
        maps.update((name, family) for name in _MAP_PLAIN.findall(text))
        maps.update((name, family) for name in _MAP_TABLE.findall(text))
    return Owners(files, programs, maps)


def read_owners(families: Iterable[str], bpf_dir: Path = BPF_DIR) -> Owners:
    return family_owners({f: family_source(f, bpf_dir).read_text() for f in families})


@dataclass(frozen=True)
class Fault:
    """Why one compile-and-load attempt failed.

    ``culprits``: each family at fault with one line saying why; empty when the
    failure names no family. ``reason``: the first meaningful line either way.
    """

    culprits: Mapping[str, str]
    reason: str


def _compile_errors(output: str, owners: Owners) -> list[tuple[str | None, str]]:
    """(family or None, line) for every clang error in ``output``.

    An error inside a header is the family's whose file included it (clang
    prints the include chain, outermost first, just above the error); an error
    in a shared header of bpf/ (pasted in, so no chain names a family) belongs
    to no family.
    """
    found: list[tuple[str | None, str]] = []
    chain: list[str] = []
    for raw in output.splitlines():
        line = raw.strip()
        included = _INCLUDED.match(line)
        if included:
            chain.append(included["file"])
            continue
        error = _DIAGNOSTIC.match(line)
        if error:
            names = [Path(error["file"]).name, *(Path(f).name for f in chain)]
            family = next((owners.files[n] for n in names if n in owners.files), None)
            found.append((family, line))
        chain = []
    return found


def _verifier_line(output: str) -> str:
    """The verifier's verdict from bcc's load-failure output: the line above its
    closing "processed N insns" line (e.g. "R0 invalid mem access
    'map_value_or_null'"), or its last line when the log was cut short."""
    start = output.rfind(_VERIFIER_START)
    if start < 0:
        return ""
    lines = [ln.strip() for ln in output[start:].splitlines()[1:]]
    for index in range(len(lines) - 1, -1, -1):
        if _PROCESSED.match(lines[index]):
            before = [ln for ln in lines[:index] if ln]
            return before[-1] if before else ""
    for line in lines:
        if "too large" in line:  # "bpf: ... Program X too large (N insns), ..."
            return line
    kept = [ln for ln in lines if ln and not ln.startswith(("HINT:", "bpf: "))]
    return kept[-1] if kept else ""


def attribute(error: str, output: str, owners: Owners, program: str = "") -> Fault:
    """Which families a failed attempt is the fault of, from what bcc said.

    ``error``: the exception's text; ``output``: what clang, libbcc and the
    verifier wrote to stderr meanwhile; ``program``: the function being loaded
    when the caller knows it (bcc's EPERM message names none). Pure.
    """
    errors = _compile_errors(output, owners)
    if errors:
        unowned = [line for family, line in errors if family is None]
        if unowned:
            return Fault({}, unowned[0])
        culprits: dict[str, str] = {}
        for family, line in errors:
            if family is not None and family not in culprits:
                culprits[family] = f"compiling failed: {line}"
        return Fault(culprits, errors[0][1])
    message = " ".join(error.split())
    mapped = _MAP_FAILED.search(output) or _MAP_FAILED.search(message)
    if mapped:
        line = f"creating map {mapped['map']} failed: {mapped['why'].strip()}"
        family = owners.maps.get(mapped["map"])
        return Fault({family: line} if family else {}, line)
    named = _LOAD_FAILED.search(message)
    function = named["program"] if named else program
    why = named["why"] if named else message
    if "super-user" in message:  # bcc's words for EPERM from BPF_PROG_LOAD
        why = "EPERM: the kernel refused it"
    verdict = _verifier_line(output)
    if not function:
        return Fault({}, verdict or message or "unknown error")
    line = f"loading {function} failed ({why})" + (f": {verdict}" if verdict else "")
    family = owners.programs.get(function) or owners.programs.get(program)
    return Fault({family: line} if family else {}, line)


@contextlib.contextmanager
def captured_stderr(echo: str = "failure") -> Iterator[list[str]]:
    """Collect what is written to fd 2 meanwhile (appended to the yielded list on exit).

    clang's diagnostics and the verifier's log are printed by bcc's C++ library
    to fd 2, not carried by the Python exception, so attribution needs them.
    ``echo`` says when they are written back to the real fd 2 afterwards:
    "failure" (the default: when the block raised, the operator's journal keeps
    the compiler's and verifier's words; a load that worked says nothing),
    "always", or "never" (a probe expected to fail: its reason is reported by
    guard in its own words). Process-wide while it lasts: another thread's
    stderr output of that moment is delayed, not lost.
    """
    out: list[str] = []
    try:
        sink = os.memfd_create("guard-bcc-output", os.MFD_CLOEXEC)
    except OSError:  # no memfd (a seccomp filter): attribute from the exceptions alone
        sink = -1
    if sink < 0:
        yield out
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    try:
        os.dup2(sink, 2)
        try:
            yield out
        except BaseException:
            failed = True
            raise
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            data = _read_all(sink)
            if echo == "always" or (echo == "failure" and failed):
                _write_all(2, data)
            out.append(data.decode(errors="replace"))
    finally:
        os.close(saved)
        os.close(sink)


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks: list[bytes] = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):  # no stderr to give it back to
        while data:
            data = data[os.write(fd, data):]


def _reasons(reasons: Mapping[str, str]) -> str:
    return "; ".join(f"{family}: {why}" for family, why in sorted(reasons.items()))


class _AttemptFailed(Exception):
    """One attempt failed in a way a family may be the fault of."""

    def __init__(self, error: BaseException, program: str = "") -> None:
        super().__init__(str(error))
        self.program = program


class Kernel:
    """Loaded and attached guard programs, and their maps by name.

    ``with Kernel(families={"net"}, host_cgroup="/") as kernel: ...``

    ``families``: those loaded and attached; ``dropped``: those requested that
    failed to compile or load, each with one line saying why (see the module
    docstring); ``missing``: those requested without a source file.
    ``LoadError`` when nothing could be loaded, or the failure named no family.
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
        # the shared families (SHARED_FAMILIES) come with any family; one that fails
        # is left out and named in ``dropped`` like the others, never in ``families``
        self.shared: frozenset[str] = frozenset(
            f for f in SHARED_FAMILIES if present and family_source(f, bpf_dir).exists())
        self.missing: frozenset[str] = frozenset(requested - present)
        self.dropped: dict[str, str] = {}
        self.attempts = 0
        self.host_cgroup = host_cgroup
        self._attached: list[tuple[str, int]] = []  # (function, bpf_link fd)
        self._cgroup_fd = -1
        self._bpf: Any = None
        if not self.families:
            raise LoadError("none of the requested program families has a source file")
        owners = read_owners(present | self.shared, bpf_dir)
        # Each failed attempt drops at least one family or raises: at most
        # len(present) + len(shared) attempts.
        for _attempt in range(len(present) + len(self.shared)):
            self.attempts += 1
            try:
                with captured_stderr() as output:
                    self._load(bpf_dir)
                    self._attach()
                return
            except _AttemptFailed as failed:
                self.close()
                fault = attribute(str(failed), "".join(output), owners, failed.program)
                self._leave_out(fault, failed.__cause__)
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable: every failed attempt drops a family")

    def _leave_out(self, fault: Fault, cause: BaseException | None) -> None:
        """Drop the families ``fault`` names for the next attempt; LoadError
        when it names none of those tried, or none is left."""
        culprits = {f: why for f, why in fault.culprits.items()
                    if f in self.families or f in self.shared}
        if not culprits:
            message = f"compiling/loading {sorted(self.families)} failed: {fault.reason}"
            if self.dropped:
                message += f" (left out before: {_reasons(self.dropped)})"
            raise LoadError(message, self.dropped) from cause
        self.dropped.update(culprits)
        self.families = self.families - culprits.keys()
        self.shared = self.shared - culprits.keys()
        if not self.families:
            raise LoadError(f"no program family could be loaded: {_reasons(self.dropped)}",
                            self.dropped) from cause

    def _load(self, bpf_dir: Path) -> None:
        try:
            from bcc import BPF
        except ImportError as error:  # pragma: no cover - depends on the machine
            raise LoadError(f"bcc is not importable: {error}") from error
        # Made in two steps so the object is ours even when its constructor
        # fails: bcc attaches the LSM programs one by one inside it, and those
        # attached before the one that failed must be detached (close()) before
        # the next attempt attaches them again.
        self._bpf = BPF.__new__(BPF)
        try:
            self._bpf.__init__(text=program_text(self.families | self.shared,
                                                 bpf_dir).encode(),
                               cflags=cflags(bpf_dir))
        except Exception as error:
            raise _AttemptFailed(error, self._failed_lsm_program()) from error

    def _failed_lsm_program(self) -> str:
        """The LSM program bcc was loading when its constructor failed: the first
        lsm__ function (bcc loads them in the module's order) not attached."""
        bpf = self._bpf
        if bpf is None or not getattr(bpf, "module", None):
            return ""
        from bcc.libbcc import lib

        attached = getattr(bpf, "lsm_fds", {})
        with contextlib.suppress(Exception):  # only a hint for attribute()
            for index in range(lib.bpf_num_functions(bpf.module)):
                name = lib.bpf_function_name(bpf.module, index)
                if name.startswith(b"lsm__") and name not in attached:
                    return str(name.decode())
        return ""

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
                raise _AttemptFailed(error, program.function) from error
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
            # bcc registered cleanup at exit, which keeps the whole module alive
            # until then; it is done now (a failed attempt's module is garbage)
            atexit.unregister(bpf.cleanup)
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
        # libbpf's "Failed to load program" of a probe expected to fail, and
        # clang's header warnings, are not the operator's business: the reason
        # is returned in guard's words
        with captured_stderr(echo="never"):
            bpf = BPF(text=text.encode(), cflags=list(QUIET_CFLAGS))
            if prog_type is not None:
                bpf.load_func(b"guard_probe", prog_type, attach_type=attach_type)
        return None
    except Exception as error:
        text = str(error).strip()
        last = text.splitlines()[-1] if text else repr(error)
        if "super-user" in last:  # bcc's words for EPERM from BPF_PROG_LOAD
            return "the kernel refused to load it (EPERM)"
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


# --- families and the policy sections they enforce ---------------------------------------

# policy section -> the program family that enforces it (guard.kernel.loader.FAMILIES)
SECTION_FAMILY = {"exec": "exec", "files": "files", "egress": "net"}


def needed_sections(policy_set: PolicySet) -> list[tuple[str, str, str]]:
    """(family, policy, "SECTION at FILE:LINE:COL") for every section of every policy."""
    found: list[tuple[str, str, str]] = []
    for policy in policy_set.policies:
        for section in ("exec", "files", "egress"):
            value = getattr(policy, section)
            if value is not None:
                found.append((SECTION_FAMILY[section], policy.name,
                              f"{section} at {value.location}"))
    return found


def unenforced(policy_set: PolicySet, unavailable: Mapping[str, str]) -> list[str]:
    """One message per reason the kernel cannot run families a policy needs: the
    families that share a reason (the LSM ones do) are named together, so a long
    reason is said once."""
    by_reason: dict[str, tuple[list[str], list[str]]] = {}
    for family, policy, where in needed_sections(policy_set):
        if family in unavailable:
            families, items = by_reason.setdefault(unavailable[family], ([], []))
            if family not in families:
                families.append(family)
            items.append(f"policy {policy} section {where}")
    return [
        f"the kernel cannot run the {' and '.join(sorted(families))} programs ({reason}); "
        f"NOT ENFORCED: {'; '.join(items)}"
        for reason, (families, items) in sorted(by_reason.items(),
                                                key=lambda kv: sorted(kv[1][0]))
    ]


def families_to_load(features: Mapping[str, tuple[bool, str]]) -> tuple[set[str], dict[str, str]]:
    """(families to load, unavailable family -> reason) from probe results."""
    load = {f for f, (ok, _why) in features.items() if ok}
    unavailable = {f: why for f, (ok, why) in features.items() if not ok}
    return load, unavailable
