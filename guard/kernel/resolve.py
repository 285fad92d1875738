"""From the plan's paths to the inode keys the kernel programs look up.

The kernel programs (bpf/exec.bpf.c, and the file programs) never see a path:
they see a ``struct file`` and walk its dentries. This module turns each path
entry of a plan into the keys that walk will meet, *as the kernel sees them*:

- EXACT   the file's inode: ``(i_ino, i_sb->s_dev)``; follows the file through
          symlinks, hard links and bind mounts, because they all lead to it.
- NAME    the parent directory's inode + FNV-1a 64 of the file's name; follows
          the name through a rename-over (a package upgrade replaces the inode)
          and matches a file created at that path after the policy was loaded.
          The hash only finds the entry: the name itself goes to guard_names
          under the same key, and the kernel compares it byte for byte on a hit
          (a name that merely hashes alike matches nothing).
- SUBTREE a directory's inode; the kernel looks it up for every parent
          directory of the file, deepest first, up to the root of the file's
          superblock. The walk cannot cross into the mount above, so a subtree
          entry also registers the root of every mount below its directory
          (from /proc/self/mountinfo), with the same decision.

Identity is read from the kernel, not from stat(): the path is opened with
O_PATH and ``/proc/self/fdinfo/FD`` gives ``ino`` (``file_inode()->i_ino``) and
``mnt_id``; the mount's ``major:minor`` in mountinfo is its superblock's
``s_dev``. stat() may disagree: on overlayfs and btrfs ``st_dev`` is not
``s_dev`` (seen in the test guest: st_dev 0:43, s_dev 0:41 for /usr/bin/true).

Several entries can produce the same key (a mount root below two subtree
rules, two paths naming one inode). The key keeps the most specific entry's
decision, the deeper directory for subtrees, and the stronger verdict on a tie,
as plan.py says rules combine.

For each ruleset with subtree entries, one *summary* key (SUBTREE, ino 0,
dev 0) carries the strongest verdict of those entries: the kernel skips the
walk without it, and applies it when its walk hits GUARD_MAX_PATH_DEPTH before
the root (see bpf/exec.bpf.c).

Resolution happens at load: a subtree's new mounts, a new symlink target or a
directory moved after load are seen at the next reload, not before.

Whose paths: the host's. A policy path means what it means to the processes
it confines, i.e. in the host's mount namespace, PID 1's, whatever namespace
guard itself runs in: the shipped unit's ``PrivateTmp=yes`` gives guard a
/tmp of its own, and a container gives it a whole tree of its own (the
container must share the host's PID namespace, so that PID 1 is the host's
init). :func:`host_view` picks where paths are resolved:

- guard's mount table is PID 1's (``/proc/self/mountinfo`` and
  ``/proc/1/mountinfo`` read alike: same mount ids, same mount points, so same
  namespace and same root): paths are opened as before, with open(2);
- otherwise each path is opened with ``openat2(fd of /proc/1/root, path,
  RESOLVE_IN_ROOT)``, and mount ids and devices come from
  ``/proc/1/mountinfo``. The walk starts at PID 1's root and crosses PID 1's
  mounts; an absolute symlink, and ``..``, resolve against that root, never
  guard's (symlinks are also followed by hand, within that root, to find the
  name the kernel will see: :func:`real_path_in`); the ``mnt_id`` that
  /proc/self/fdinfo shows for such an fd is the id of a mount of PID 1's
  namespace (mount ids are unique system-wide), so it is looked up in PID 1's
  mountinfo, and so are the mounts below a subtree rule's directory;
- when /proc/1/root cannot be opened (it needs ptrace-read access to PID 1:
  ``CAP_SYS_PTRACE`` for a daemon whose capabilities are fewer than init's) or
  the kernel has no openat2 (before 5.6), paths are resolved in guard's own
  namespace and :attr:`View.problem` says so: the daemon reports it at start,
  at each reload, and in ``guard status``.

Why openat2 in PID 1's root, and not a helper that setns()es into
``/proc/1/ns/mnt``: setns to a mount namespace needs ``CAP_SYS_ADMIN``, which
the unit withholds, is refused by its ``RestrictNamespaces=yes`` and cannot be
done by a multi-threaded process (so a fork per resolution, and results passed
back). openat2 needs only the ptrace-read access that opening /proc/1/root
takes, stays in the process, costs one system call a path, and leaves guard's
own view untouched for everything else (its state directory, bpffs, /dev/log).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from guard import layout
from guard.policy.plan import Decision, ExecEntry, FileEntry, Plan

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_U64 = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    """FNV-1a, 64 bits: what the kernel computes over a dentry's name."""
    value = FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * FNV_PRIME) & _U64
    return value


class Match(IntEnum):
    """enum guard_inode_match in bpf/guard.h."""

    EXACT = layout.MATCH_EXACT
    SUBTREE = layout.MATCH_SUBTREE
    NAME = layout.MATCH_NAME


@dataclass(frozen=True, order=True)
class Identity:
    """An inode as the kernel names it: ``i_ino`` and the superblock's ``s_dev``."""

    ino: int
    dev: int  # kernel dev_t: (major << 20) | minor

    def __str__(self) -> str:
        return f"{self.dev >> 20}:{self.dev & 0xFFFFF}/{self.ino}"


@dataclass(frozen=True, order=True)
class InodeKey:
    """struct guard_inode_key with a slot-local ruleset id (apply adds the slot)."""

    ino: int
    dev: int
    ruleset: int
    match: Match
    name_hash: int = 0
    name: bytes = b""  # NAME keys: the name hashed, which guard_names holds for the kernel

    def to_c(self, slot: int) -> layout.InodeKey:
        return layout.InodeKey(
            ino=self.ino,
            dev=self.dev,
            ruleset=slot * layout.MAX_RULESETS + self.ruleset,
            match=int(self.match),
            name_hash=self.name_hash,
        )


@dataclass(frozen=True, order=True)
class InodeEntry:
    """One exec entry of guard_inodes: key -> its exec decision. ``path`` is the entry
    that produced it."""

    key: InodeKey
    decision: Decision
    path: str


@dataclass(frozen=True, order=True)
class FileInodeEntry:
    """One file entry of guard_inodes: key -> read and write decisions (None: no
    decision)."""

    key: InodeKey
    read: Decision | None
    write: Decision | None
    path: str


@dataclass(frozen=True, order=True)
class ResolveWarning:
    """A plan path that produced fewer keys than it should; the rest of the plan still loads."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: warning: {self.message}"


def summary_key(ruleset: int) -> InodeKey:
    """The key that says a ruleset has subtree entries (see the module docstring)."""
    return InodeKey(ino=0, dev=0, ruleset=ruleset, match=Match.SUBTREE, name_hash=0)


# --- the kernel's view of paths and mounts -----------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of a mountinfo file (/proc/self/mountinfo, /proc/1/mountinfo)."""

    mnt_id: int
    parent_id: int
    dev: int  # kernel dev_t of the superblock
    root: str  # the directory of the filesystem mounted here
    point: str  # where, relative to this process's root
    fstype: str


def unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\NNN`` (octal)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        chunk = text[i + 1 : i + 4]
        if text[i] == "\\" and len(chunk) == 3 and all(c in "01234567" for c in chunk):
            out.append(chr(int(chunk, 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> tuple[Mount, ...]:
    """``ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER``."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        major, _, minor = fields[2].partition(":")
        mounts.append(Mount(
            mnt_id=int(fields[0]),
            parent_id=int(fields[1]),
            dev=layout.kernel_dev(int(major), int(minor)),
            root=unescape(fields[3]),
            point=unescape(fields[4]),
            fstype=(right.split() or [""])[0],
        ))
    return tuple(mounts)


def parse_fdinfo(text: str) -> dict[str, int]:
    """The numeric ``key:\\tvalue`` lines of /proc/PID/fdinfo/FD (flags is octal)."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        value = value.strip()
        try:
            found[key.strip()] = int(value, 8 if key.strip() == "flags" else 10)
        except ValueError:
            continue
    return found


# --- where paths are resolved: the host's mount namespace (module docstring) ----------

SYS_OPENAT2 = 437  # the same number on x86-64, i386 and every asm-generic architecture
RESOLVE_IN_ROOT = 0x10  # include/uapi/linux/openat2.h; also disables magic links
MAX_SYMLINKS = 40  # the kernel's limit (MAXSYMLINKS): past it, ELOOP


class _OpenHow(ctypes.Structure):
    """struct open_how (include/uapi/linux/openat2.h)."""

    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc: ctypes.CDLL | None = None


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2), which Python 3.11 does not wrap; OSError as os.open raises it."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    how = _OpenHow(flags=flags, mode=0, resolve=resolve)
    raw = os.fsencode(path)
    for _attempt in range(8):
        fd = int(_libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd),
                               ctypes.c_char_p(raw), ctypes.byref(how),
                               ctypes.c_size_t(ctypes.sizeof(how))))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EAGAIN:  # EAGAIN: a rename or mount raced the lookup; again
            break
    raise OSError(err, os.strerror(err), path)


def real_path_in(path: str, readlink: Callable[[str], str | None]) -> str:
    """``path`` with every symlink replaced by its target, within a root.

    ``readlink(p)`` gives the target of ``p`` when its last component is a
    symlink, else None (not a link, or missing). As the kernel does under
    RESOLVE_IN_ROOT: an absolute target starts again at the root, ``..`` never
    climbs above it. As os.path.realpath does: a missing component is kept as
    written, and past MAX_SYMLINKS links the rest is taken as written.
    """
    pending = [part for part in reversed(path.split("/")) if part]
    done: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        target = readlink("/" + "/".join([*done, part])) if links < MAX_SYMLINKS else None
        if target is None:
            done.append(part)
            continue
        links += 1
        if target.startswith("/"):
            done = []
        pending.extend(part for part in reversed(target.split("/")) if part)
    return "/" + "/".join(done)


class View:
    """Where paths are opened: this process's root (``root_fd`` None), or a
    directory fd taken as the root (openat2 with RESOLVE_IN_ROOT); with the
    mount table as seen from that root.

    ``where`` says which it is, for ``guard status``; ``problem`` is set when
    paths should have been resolved in the host's namespace and cannot be.
    """

    def __init__(self, mountinfo: Path, root_fd: int | None = None,
                 where: str = "guard's own mount namespace", problem: str = "") -> None:
        self.mountinfo = mountinfo
        self.root_fd = root_fd
        self.where = where
        self.problem = problem

    @classmethod
    def own(cls, proc_self: Path = Path("/proc/self")) -> View:
        """This process's root and mounts."""
        return cls(proc_self / "mountinfo")

    @classmethod
    def rooted(cls, root: str | Path, mountinfo: Path) -> View:
        """``root`` (opened here) as the root; ``mountinfo`` must be seen from it."""
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return cls(mountinfo, fd, f"mount namespace seen from {root}")

    def read_mounts(self) -> tuple[Mount, ...]:
        return parse_mountinfo(self.mountinfo.read_text())

    def open(self, path: str, follow: bool = True) -> int:
        """An O_PATH fd of ``path``; OSError when it cannot be reached."""
        flags = os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        if self.root_fd is None:
            return os.open(path, flags)
        return openat2(self.root_fd, path, flags, RESOLVE_IN_ROOT)

    def readlink(self, path: str) -> str | None:
        """The target if the last component of ``path`` is a symlink, else None."""
        try:
            if self.root_fd is None:
                return os.readlink(path)
            fd = self.open(path, follow=False)
        except OSError:
            return None
        try:
            return os.readlink("", dir_fd=fd)  # readlinkat(fd, ""): the link fd itself
        except OSError:
            return None  # not a symlink
        finally:
            os.close(fd)

    def close(self) -> None:
        fd, self.root_fd = self.root_fd, None
        if fd is not None:
            os.close(fd)


def _same_mounts(own: Path, other: Path) -> bool:
    """Both mount tables alike: one namespace, one root. Mount ids are unique
    system-wide, so two namespaces never read alike; a mount made between the
    two reads can make one namespace read unlike, hence a few tries."""
    return any(own.read_bytes() == other.read_bytes() for _attempt in range(3))


def host_view(proc: Path = Path("/proc")) -> View:
    """The view plan paths are resolved in: the host's, i.e. PID 1's (module docstring)."""
    own = proc / "self" / "mountinfo"
    init = proc / "1" / "mountinfo"
    root = proc / "1" / "root"
    try:
        if _same_mounts(own, init):
            return View(own, where="host's mount namespace (guard shares PID 1's)")
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        why = f"cannot read {error.filename} ({error.strerror}"
        if error.filename == str(root):
            why += "; it takes CAP_SYS_PTRACE when guard holds fewer capabilities than PID 1"
        return View(own, problem=_fallback(why + ")"))
    try:
        os.close(openat2(root_fd, "/", os.O_PATH | os.O_CLOEXEC, RESOLVE_IN_ROOT))
    except OSError as error:
        os.close(root_fd)
        why = ("this kernel has no openat2 (Linux 5.6 or later)" if error.errno == errno.ENOSYS
               else f"openat2 in {root} failed ({error.strerror})")
        return View(own, problem=_fallback(why))
    return View(init, root_fd, where=f"host's mount namespace (PID 1's, through {root})")


def _fallback(why: str) -> str:
    return (f"policy paths are resolved in guard's own mount namespace, which is not the "
            f"host's: {why}. Rules on paths the two do not share (a private /tmp, a "
            f"container's tree) name files no confined process sees and protect nothing")


def paths_status() -> dict[str, str]:
    """Where plan paths are resolved now, as ``guard status`` shows it."""
    view = host_view()
    view.close()
    return {"where": view.where, "error": view.problem}


class Resolver:
    """Kernel identities of paths, in the host's view of the file systems (host_view).

    ``proc_self`` is where this process's fdinfo is read; a ``proc_self`` other
    than /proc/self (tests, for error paths only: identity must come from the
    real kernel) also means this process's own view, with that mountinfo.
    """

    def __init__(self, proc_self: Path = Path("/proc/self"), view: View | None = None) -> None:
        if view is None:
            view = host_view() if proc_self == Path("/proc/self") else View.own(proc_self)
        self.view = view
        self.proc_self = proc_self
        self._fdinfo = f"{proc_self}/fdinfo/"
        self.mounts = view.read_mounts()
        self._by_id: Mapping[int, Mount] = {m.mnt_id: m for m in self.mounts}
        self._cache: dict[str, tuple[Identity, int] | None] = {}
        self._real_dirs: dict[str, str] = {}
        self._links: dict[str, str | None] = {}
        self._mounts_reloaded = False

    def close(self) -> None:
        self.view.close()

    def reload_mounts(self) -> None:
        self.mounts = self.view.read_mounts()
        self._by_id = {m.mnt_id: m for m in self.mounts}

    def _read_fdinfo(self, fd: int) -> dict[str, int]:
        info_fd = os.open(self._fdinfo + str(fd), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return parse_fdinfo(os.read(info_fd, 4096).decode("ascii", "replace"))
        finally:
            os.close(info_fd)

    def lookup(self, path: str) -> tuple[Identity, int] | None:
        """(identity, mount id) of what ``path`` leads to (symlinks followed); None if nothing."""
        if path in self._cache:
            return self._cache[path]
        try:
            fd = self.view.open(path)
        except OSError:
            self._cache[path] = None
            return None
        try:
            info = self._read_fdinfo(fd)
            mount = self._by_id.get(info.get("mnt_id", -1))
            if mount is None and "mnt_id" in info and not self._mounts_reloaded:
                self.reload_mounts()  # a mount newer than our copy of mountinfo
                self._mounts_reloaded = True
                mount = self._by_id.get(info["mnt_id"])
            if "ino" in info and mount is not None:
                found = (Identity(info["ino"], mount.dev), mount.mnt_id)
            else:
                # An old kernel's fdinfo: stat is right on plain file systems only.
                st = os.fstat(fd)
                dev = mount.dev if mount is not None else layout.kernel_dev(
                    os.major(st.st_dev), os.minor(st.st_dev))
                found = (Identity(info.get("ino", st.st_ino), dev),
                         mount.mnt_id if mount is not None else -1)
        finally:
            os.close(fd)
        self._cache[path] = found
        return found

    def _readlink(self, path: str) -> str | None:
        if path not in self._links:
            self._links[path] = self.view.readlink(path)
        return self._links[path]

    def real_path(self, path: str) -> str:
        """os.path.realpath in the view (real_path_in), with each directory resolved
        once (10,000 rules in one directory cost one resolution of it, plus one
        readlink each)."""
        parent, name = os.path.split(path)
        real_parent = self._real_dirs.get(parent)
        if real_parent is None:
            real_parent = self._real_dirs[parent] = real_path_in(parent, self._readlink)
        joined = os.path.join(real_parent, name)
        if name in ("", ".", "..") or self._readlink(joined) is not None:
            return real_path_in(joined, self._readlink)
        return joined

    def identity(self, path: str) -> Identity | None:
        found = self.lookup(path)
        return found[0] if found is not None else None

    def mount_roots_below(self, directory: str) -> list[tuple[str, Identity]]:
        """The root of every mount visible strictly below ``directory`` (a real path).

        A mount point that leads to another mount (overmounted, stacked) is
        skipped: its files cannot be reached by path.
        """
        prefix = directory.rstrip("/") + "/"
        found: list[tuple[str, Identity]] = []
        for mount in self.mounts:
            if mount.point == directory or not mount.point.startswith(prefix):
                continue
            seen = self.lookup(mount.point)
            if seen is not None and seen[1] == mount.mnt_id:
                found.append((mount.point, seen[0]))
        return found


# --- from plan entries to keys --------------------------------------------------------

# Specificity of a key's source, compared first when two entries give one key:
# any exact path beats any subtree, and a deeper subtree directory beats a shallower.
EXACT_SPECIFICITY = 1 << 16


def _depth(path: str) -> int:
    return len([p for p in path.split("/") if p])


@dataclass(frozen=True)
class _Candidate:
    key: InodeKey
    specificity: int
    path: str


def path_keys(
    resolver: Resolver, ruleset: int, path: str, subtree: bool
) -> tuple[list[_Candidate], list[ResolveWarning]]:
    """Every key one plan path registers, with its specificity."""
    keys: list[_Candidate] = []
    warnings: list[ResolveWarning] = []
    shown = f"{path.rstrip('/')}/**" if subtree else path
    if subtree:
        specificity = _depth(path)
        found = resolver.identity(path)
        if found is None:
            warnings.append(ResolveWarning(shown, "the directory does not exist; rule not loaded"))
            return keys, warnings
        keys.append(_Candidate(InodeKey(found.ino, found.dev, ruleset, Match.SUBTREE),
                               specificity, shown))
        for point, root in resolver.mount_roots_below(resolver.real_path(path)):
            keys.append(_Candidate(InodeKey(root.ino, root.dev, ruleset, Match.SUBTREE),
                                   specificity, f"{shown} (mount {point})"))
        return keys, warnings
    found = resolver.identity(path)
    if found is not None:
        keys.append(_Candidate(InodeKey(found.ino, found.dev, ruleset, Match.EXACT),
                               EXACT_SPECIFICITY, shown))
    # The name the kernel sees is the last component of the real path.
    real = resolver.real_path(path)
    parent, name = os.path.split(real)
    encoded = os.fsencode(name)
    name_hash = fnv1a64(encoded) if name else 0
    parent_id = resolver.identity(parent) if name else None
    if parent_id is not None and name_hash != 0:
        keys.append(_Candidate(InodeKey(parent_id.ino, parent_id.dev, ruleset, Match.NAME,
                                        name_hash, encoded), EXACT_SPECIFICITY, shown))
    elif found is None:
        warnings.append(ResolveWarning(
            shown, f"neither the file nor its directory {parent} exists; rule not loaded"))
    elif name_hash == 0 and name:
        warnings.append(ResolveWarning(
            shown, "its name hashes to 0, which the kernel does not look up: a file renamed "
                   "over it is not matched"))
    return keys, warnings


def _prefer(a: Decision, b: Decision) -> Decision:
    """The stronger verdict, then the lower rule id (compile.stronger's tie-break)."""
    return a if (a.verdict, -a.rule) >= (b.verdict, -b.rule) else b


def _merge(
    found: Iterable[tuple[_Candidate, Decision | None]],
) -> dict[InodeKey, tuple[int, Decision, str]]:
    """Per key: the most specific candidate's decision; the stronger one on a tie."""
    best: dict[InodeKey, tuple[int, Decision, str]] = {}
    for cand, decision in found:
        if decision is None:
            continue
        old = best.get(cand.key)
        if old is None or cand.specificity > old[0]:
            best[cand.key] = (cand.specificity, decision, cand.path)
        elif cand.specificity == old[0]:
            chosen = _prefer(old[1], decision)
            best[cand.key] = (old[0], chosen, old[2] if chosen is old[1] else cand.path)
    return best


def _summaries(
    entries: Iterable[tuple[int, bool, Decision | None]],
) -> dict[int, Decision]:
    """Per ruleset: the strongest decision of its subtree entries (those that resolved)."""
    result: dict[int, Decision] = {}
    for ruleset, subtree, decision in entries:
        if subtree and decision is not None:
            old = result.get(ruleset)
            result[ruleset] = decision if old is None else _prefer(old, decision)
    return result


def _resolve_paths(
    resolver: Resolver, entries: Iterable[tuple[int, str, bool]],
) -> tuple[dict[tuple[int, str, bool], list[_Candidate]], list[ResolveWarning]]:
    keys: dict[tuple[int, str, bool], list[_Candidate]] = {}
    warnings: list[ResolveWarning] = []
    for ruleset, path, subtree in entries:
        found, problems = path_keys(resolver, ruleset, path, subtree)
        keys[(ruleset, path, subtree)] = found
        warnings += problems
    return keys, sorted(set(warnings))


def resolve_exec(
    plan: Plan, resolver: Resolver | None = None,
) -> tuple[tuple[InodeEntry, ...], tuple[ResolveWarning, ...]]:
    """The exec entries of a plan on this machine, and what could not be resolved."""
    if resolver is not None:
        return exec_items(plan.exec, resolver)
    resolver = Resolver()
    try:
        return exec_items(plan.exec, resolver)
    finally:
        resolver.close()


def exec_items(
    entries: Iterable[ExecEntry], resolver: Resolver,
) -> tuple[tuple[InodeEntry, ...], tuple[ResolveWarning, ...]]:
    entries = tuple(entries)
    keys, warnings = _resolve_paths(resolver, ((e.ruleset, e.path, e.subtree) for e in entries))
    merged = _merge(
        (cand, e.decision) for e in entries for cand in keys[(e.ruleset, e.path, e.subtree)]
    )
    items = [InodeEntry(key, decision, path) for key, (_spec, decision, path) in merged.items()]
    loaded = [e for e in entries if keys[(e.ruleset, e.path, e.subtree)]]
    for ruleset, decision in _summaries((e.ruleset, e.subtree, e.decision)
                                        for e in loaded).items():
        items.append(InodeEntry(summary_key(ruleset), decision, "(subtree summary)"))
    return tuple(sorted(items)), tuple(warnings)


def resolve_files(
    plan: Plan, resolver: Resolver | None = None,
) -> tuple[tuple[FileInodeEntry, ...], tuple[ResolveWarning, ...]]:
    """The file entries of a plan: the same keys, a decision per access.

    Read and write are merged separately: a key's read decision comes from the
    most specific entry that has one, independently of its write decision. The
    summary key carries the strongest decision per access of the subtree entries.
    """
    if resolver is not None:
        return file_items(plan.files, resolver)
    resolver = Resolver()
    try:
        return file_items(plan.files, resolver)
    finally:
        resolver.close()


def file_items(
    entries: Iterable[FileEntry], resolver: Resolver,
) -> tuple[tuple[FileInodeEntry, ...], tuple[ResolveWarning, ...]]:
    entries = tuple(entries)
    keys, warnings = _resolve_paths(resolver, ((e.ruleset, e.path, e.subtree) for e in entries))
    access: dict[str, Callable[[FileEntry], Decision | None]] = {
        "read": lambda e: e.read, "write": lambda e: e.write,
    }
    merged = {
        name: _merge((cand, pick(e)) for e in entries
                     for cand in keys[(e.ruleset, e.path, e.subtree)])
        for name, pick in access.items()
    }
    items: list[FileInodeEntry] = []
    for key in sorted(merged["read"].keys() | merged["write"].keys()):
        read = merged["read"].get(key)
        write = merged["write"].get(key)
        path = read[2] if read else write[2] if write else ""
        items.append(FileInodeEntry(key, read[1] if read else None,
                                    write[1] if write else None, path))
    loaded = [e for e in entries if keys[(e.ruleset, e.path, e.subtree)]]
    reads = _summaries((e.ruleset, e.subtree, e.read) for e in loaded)
    writes = _summaries((e.ruleset, e.subtree, e.write) for e in loaded)
    for ruleset in sorted(reads.keys() | writes.keys()):
        items.append(FileInodeEntry(summary_key(ruleset), reads.get(ruleset),
                                    writes.get(ruleset), "(subtree summary)"))
    return tuple(sorted(items)), tuple(warnings)


def decision_c(decision: Decision | None) -> layout.DecisionC:
    """struct guard_decision for a decision (present = 0 for None)."""
    if decision is None:
        return layout.DecisionC()
    return layout.DecisionC(rule_id=decision.rule, verdict=int(decision.verdict), present=1)


__all__ = [
    "FileInodeEntry",
    "Identity",
    "InodeEntry",
    "InodeKey",
    "Match",
    "Mount",
    "ResolveWarning",
    "Resolver",
    "View",
    "decision_c",
    "fnv1a64",
    "host_view",
    "openat2",
    "parse_fdinfo",
    "parse_mountinfo",
    "paths_status",
    "real_path_in",
    "resolve_exec",
    "resolve_files",
    "summary_key",
]
