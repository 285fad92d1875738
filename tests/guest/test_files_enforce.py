"""File access control in a real kernel: bpf/files.bpf.c, driven through parse -> compile -> apply.

Every test runs in the BPF-LSM guest. The programs are loaded once per session
(``files_session``: bcc compiles for tens of seconds under TCG); each test
applies its own plan, compiled from YAML by the real parser and compiler and
scoped to a cgroup the test created, and an empty plan when it ends.

The acting process is a ``FileProbe``: one long-lived Python process inside
the test's cgroup that performs one real system call per request (open,
mkdir, rename, link, truncate, ...) and answers its errno, so a test makes
dozens of syscalls without starting an interpreter for each. The test process
itself is outside every test cgroup: what it does shows that the policy's
scope ends where the cgroup ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from exec_fixtures import GuestGuard, loaded, plan_from_yaml
from support.cgroup import TestCgroup
from support.mountns import in_private_tmp

from guard import layout
from guard.events.enrich import Enricher
from guard.events.fold import Aggregator
from guard.events.records import RawEvent
from guard.kernel import resolve as kernel_resolve
from guard.policy.evaluate import decide_open
from guard.policy.plan import Verdict

pytestmark = pytest.mark.guest

HOOK_FILE_OPEN = 4
HOOK_PATH_CHANGE = 5
READ, WRITE = layout.ACCESS_READ, layout.ACCESS_WRITE
EPERM = errno.EPERM


# --- policies ----------------------------------------------------------------------


Rule = tuple[str, Sequence[str], Sequence[str | Path]]  # (action, access, paths)


def files_policy(name: str, cgroups: Sequence[str], rules: Sequence[Rule],
                 mode: str = "enforce") -> str:
    """One policy document with a files section, scoped to ``cgroups``."""
    lines = [
        "apiVersion: guard/v1",
        "kind: Policy",
        "metadata:",
        f"  name: {name}",
        "spec:",
        f"  mode: {mode}",
        "  scope:",
        f"    cgroups: [{', '.join(json.dumps(c) for c in cgroups)}]",
        "  files:",
        "    rules:",
    ]
    for action, access, paths in rules:
        listed = ", ".join(json.dumps(str(p)) for p in paths)
        lines.append(f"      - {{action: {action}, access: [{', '.join(access)}], "
                     f"paths: [{listed}]}}")
    return "\n".join(lines) + "\n"


def tree(path: Path) -> str:
    return f"{path}/**"


def fnv1a32(data: bytes) -> int:
    """FNV-1a 32, the hash NAME keys were looked up by alone before they compared names."""
    value = 0x811C9DC5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


# --- the acting process ------------------------------------------------------------

PROBE = textwrap.dedent("""\
    import ctypes, json, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD, SYS_RENAMEAT2 = -100, 316

    def opened(path, flags, mode=0o644):
        fd = os.open(path, flags, mode)
        try:
            if (flags & 3) != os.O_WRONLY and not flags & os.O_DIRECTORY:
                os.read(fd, 1)
        finally:
            os.close(fd)

    def via_proc_fd(path, flags):
        fd = os.open(path, os.O_PATH)
        try:
            opened(f"/proc/self/fd/{fd}", flags)
        finally:
            os.close(fd)

    def exchange(a, b):
        if libc.syscall(SYS_RENAMEAT2, AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), 2):
            raise OSError(ctypes.get_errno(), "renameat2")

    def by_handle(mount, handle_type, handle_hex):
        # open_by_handle_at(O_RDONLY), read a byte: the path the kernel shows for it
        raw = bytes.fromhex(handle_hex)
        handle = ctypes.create_string_buffer(
            len(raw).to_bytes(4, "little") + handle_type.to_bytes(4, "little", signed=True)
            + raw)
        mount_fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fd = libc.open_by_handle_at(mount_fd, handle, os.O_RDONLY)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "open_by_handle_at")
            try:
                os.read(fd, 1)
                return os.readlink(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        finally:
            os.close(mount_fd)

    def burst(path, flags, count):
        failed = 0
        for _ in range(count):
            try:
                opened(path, flags)
            except OSError:
                failed += 1
        return failed

    OPS = {
        "open": opened, "proc_fd": via_proc_fd, "mkdir": os.mkdir, "rmdir": os.rmdir,
        "unlink": os.unlink, "mkfifo": os.mkfifo, "symlink": os.symlink, "link": os.link,
        "rename": os.rename, "exchange": exchange, "truncate": os.truncate,
        "chmod": os.chmod, "chown": lambda p: os.chown(p, os.getuid(), os.getgid()),
        "chdir": os.chdir, "burst": burst, "by_handle": by_handle,
    }
    print("ready", flush=True)
    for line in sys.stdin:
        op, args = json.loads(line)
        try:
            value = OPS[op](*args)
            print(json.dumps([0, value]), flush=True)
        except OSError as error:
            print(json.dumps([error.errno or -1, None]), flush=True)
    """)


@dataclass
class FileProbe:
    """A process in a test cgroup making one real syscall per request."""

    proc: subprocess.Popen[str]
    cgroup: TestCgroup | None
    _stdin: IO[str] = field(repr=False)
    _stdout: IO[str] = field(repr=False)

    @classmethod
    def start(cls, cgroup: TestCgroup) -> FileProbe:
        proc = cgroup.spawn([sys.executable, "-c", PROBE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1)
        return cls.ready(proc, cgroup)

    @classmethod
    def start_outside(cls) -> FileProbe:
        """A probe in the test process's own cgroup, outside every test scope."""
        proc = subprocess.Popen([sys.executable, "-c", PROBE], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, bufsize=1)
        return cls.ready(proc, None)

    @classmethod
    def ready(cls, proc: subprocess.Popen[str], cgroup: TestCgroup | None) -> FileProbe:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        return cls(proc, cgroup, proc.stdin, proc.stdout)

    def call(self, op: str, *args: object) -> int:
        """errno of the operation; 0 when it succeeded."""
        return self.call_value(op, *args)[0]

    def call_value(self, op: str, *args: object) -> tuple[int, object]:
        """(errno of the operation, 0 when it succeeded; what it returned)."""
        self._stdin.write(json.dumps([op, [str(a) if isinstance(a, Path) else a
                                           for a in args]]) + "\n")
        self._stdin.flush()
        line = self._stdout.readline()
        if not line:
            raise AssertionError(f"the probe exited ({self.proc.poll()})")
        code, value = json.loads(line)
        return int(code), value

    def read(self, path: str | Path) -> int:
        return self.call("open", path, os.O_RDONLY)

    def write(self, path: str | Path) -> int:
        return self.call("open", path, os.O_WRONLY)

    def burst(self, path: Path, flags: int, count: int) -> int:
        """Open ``path`` ``count`` times; returns how many opens failed."""
        self._stdin.write(json.dumps(["burst", [str(path), flags, count]]) + "\n")
        self._stdin.flush()
        code, failed = json.loads(self._stdout.readline())
        assert code == 0
        return int(failed)

    def close(self) -> None:
        self._stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


# --- the loaded programs -----------------------------------------------------------


@pytest.fixture(scope="session")
def files_session() -> Iterator[GuestGuard]:
    """The files programs alone, compiled, loaded and attached once per session."""
    with loaded("files") as guard:
        yield guard


@pytest.fixture
def guard(files_session: GuestGuard) -> Iterator[GuestGuard]:
    try:
        yield files_session
    finally:
        files_session.clear()


@pytest.fixture
def cgroup() -> Iterator[TestCgroup]:
    with TestCgroup.create("guard-files-test") as cg:
        yield cg


@pytest.fixture
def probe(cgroup: TestCgroup) -> Iterator[FileProbe]:
    p = FileProbe.start(cgroup)
    try:
        yield p
    finally:
        p.close()


@contextlib.contextmanager
def mounted(argv: list[str], target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *argv, str(target)], check=True, timeout=30)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=30)


def make(path: Path, text: str = "data\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def summary(events: Sequence[RawEvent]) -> list[tuple[int, int, int, str]]:
    """(hook, verdict, access, path) of each event, in order."""
    return [(e.hook, e.verdict, e.access, e.path.decode(errors="replace")) for e in events]


# --- audit: who read it ------------------------------------------------------------


def test_audited_read_succeeds_and_is_reported_once(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path
) -> None:
    secret = make(tmp_path / "etc" / "shadow")
    other = make(tmp_path / "etc" / "passwd")
    plan = guard.apply_yaml(files_policy("who-read", [cgroup.path], [
        ("audit", ["read"], [secret])]))
    assert guard.last_warnings == ()

    assert probe.read(secret) == 0
    assert probe.read(other) == 0
    assert probe.write(secret) == 0  # only reads are audited
    assert secret.read_text() == "data\n"  # and from outside the scope: nothing

    events = guard.log.for_cgroup(cgroup.id)
    assert summary(events) == [(HOOK_FILE_OPEN, int(Verdict.AUDIT), READ, str(secret))]
    event = events[0]
    rule = plan.rule(event.rule_id)
    assert rule is not None and rule.label == "who-read/files.rules[0]"
    assert event.kind == layout.KIND_FILE
    assert event.pid == probe.proc.pid and event.tid == probe.proc.pid
    assert event.ppid == os.getpid()
    assert event.comm == Path(sys.executable).name.encode()[:15]
    assert event.exe == Path(sys.executable).resolve().name.encode()
    assert event.flags == 0 and event.count == 1


def test_exec_of_an_audited_file_is_not_a_read(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path
) -> None:
    """Running a program is the exec section's business: the kernel's own opens
    of the program (and of its interpreter) are not file reads."""
    tool = tmp_path / "bin" / "tool"
    tool.parent.mkdir()
    tool.write_bytes(Path("/usr/bin/true").read_bytes())
    tool.chmod(0o755)
    guard.apply_yaml(files_policy("bins", [cgroup.path], [("audit", ["read"], [tool])]))
    done = subprocess.run([str(tool)], preexec_fn=_enter(cgroup), timeout=60)
    assert done.returncode == 0
    assert guard.log.for_cgroup(cgroup.id) == []
    assert probe.read(tool) == 0
    assert len(guard.log.for_cgroup(cgroup.id)) == 1


def _enter(cg: TestCgroup) -> Callable[[], None]:
    procs = str(cg.directory / "cgroup.procs")

    def move() -> None:
        with open(procs, "w") as f:
            f.write("0")

    return move


def test_file_created_after_load_in_an_audited_subtree_is_audited(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path
) -> None:
    watched = tmp_path / "ssh"
    watched.mkdir()
    guard.apply_yaml(files_policy("ssh", [cgroup.path], [
        ("audit", ["read", "write"], [tree(watched)])]))
    # Made after load, from outside the scope: new directories, new inodes.
    late = make(watched / "new" / "deeper" / "late_key")
    assert probe.read(late) == 0
    # Made from inside: the creation is a write (one event: the open that
    # created it is not judged twice), then a read.
    mine = watched / "new" / "mine"
    assert probe.call("open", mine, os.O_CREAT | os.O_EXCL | os.O_WRONLY) == 0
    assert probe.read(mine) == 0
    audit = int(Verdict.AUDIT)
    assert summary(guard.log.for_cgroup(cgroup.id)) == [
        (HOOK_FILE_OPEN, audit, READ, str(late)),
        (HOOK_PATH_CHANGE, audit, WRITE, str(mine)),
        (HOOK_FILE_OPEN, audit, READ, str(mine)),
    ]


# --- deny: nothing may be written under a subtree ----------------------------------


@pytest.mark.parametrize("filesystem", ["overlay", "tmpfs"])
def test_write_denied_subtree_refuses_every_kind_of_write(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path, filesystem: str
) -> None:
    """Opening for write, truncating, creating (file, directory, fifo, symlink),
    unlinking, removing a directory, renaming in, out and within, exchanging,
    linking in and out, chmod and chown: EPERM. Reads still work; the same
    operations outside the subtree, and from outside the scope, work."""
    root = tmp_path / "fs"
    root.mkdir()
    with contextlib.ExitStack() as stack:
        if filesystem == "tmpfs":
            stack.enter_context(mounted(["-t", "tmpfs", "tmpfs"], root))
        etc = root / "etc"
        a = make(etc / "a")
        make(etc / "sub" / "b")
        (etc / "empty").mkdir()
        out = root / "out"
        x = make(out / "x")
        plan = guard.apply_yaml(files_policy("ro-etc", [cgroup.path], [
            ("deny", ["write"], [tree(etc)])]))
        assert guard.last_warnings == ()

        refused: list[tuple[str, tuple[object, ...], str]] = [
            # (operation, arguments, the path the event names)
            ("open", (a, os.O_WRONLY), str(a)),
            ("open", (a, os.O_RDWR), str(a)),
            ("open", (a, os.O_WRONLY | os.O_APPEND), str(a)),
            ("open", (a, os.O_RDONLY | os.O_TRUNC), str(a)),
            ("open", (etc / "sub" / "b", os.O_WRONLY), str(etc / "sub" / "b")),
            ("open", (etc / "new", os.O_CREAT | os.O_WRONLY), str(etc / "new")),
            ("open", (etc / "sub" / "new", os.O_CREAT | os.O_RDONLY), str(etc / "sub" / "new")),
            ("mkdir", (etc / "newdir",), str(etc / "newdir")),
            ("mkfifo", (etc / "fifo",), str(etc / "fifo")),
            ("symlink", (x, etc / "ln"), str(etc / "ln")),
            ("unlink", (a,), str(a)),
            ("rmdir", (etc / "empty",), str(etc / "empty")),
            ("rename", (a, etc / "a2"), str(etc / "a2")),
            ("rename", (x, etc / "x"), str(etc / "x")),  # into
            ("rename", (a, out / "a"), str(a)),  # out of
            ("rename", (etc / "sub", out / "sub"), str(etc / "sub")),  # a directory out of
            ("exchange", (x, a), str(a)),
            ("link", (x, etc / "x-link"), str(etc / "x-link")),  # into
            ("link", (a, out / "a-link"), str(a)),  # a protected file, out of
            ("truncate", (a, 0), str(a)),
            ("chmod", (a, 0o600), str(a)),
            ("chown", (a,), str(a)),
        ]
        for op, args, _shown in refused:
            assert probe.call(op, *args) == EPERM, (op, args)
        events = guard.log.for_cgroup(cgroup.id)
        deny = int(Verdict.DENY)
        expected = [(HOOK_FILE_OPEN, deny, WRITE, shown) for _op, _a, shown in refused[:5]]
        expected += [(HOOK_PATH_CHANGE, deny, WRITE, shown) for _op, _a, shown in refused[5:]]
        # Moving a file out of the subtree counts as reading and writing it; the
        # rule names write only, so the event names write.
        assert summary(events) == expected
        assert {plan.rule(e.rule_id).label for e in events} == {  # type: ignore[union-attr]
            "ro-etc/files.rules[0]"}
        assert a.read_text() == "data\n" and (etc / "sub" / "b").exists()

        # Reads there still work, and so does everything outside the subtree.
        assert probe.read(a) == 0
        assert probe.call("open", etc / "sub", os.O_RDONLY | os.O_DIRECTORY) == 0
        assert probe.write(x) == 0
        assert probe.call("open", out / "new", os.O_CREAT | os.O_WRONLY) == 0
        assert probe.call("rename", out / "new", out / "renamed") == 0
        assert probe.call("link", out / "renamed", out / "linked") == 0
        assert probe.call("unlink", out / "linked") == 0
        assert probe.call("truncate", x, 0) == 0

        # From outside the scope, the same writes go through.
        a.write_text("outside\n")
        os.rename(a, etc / "a2")
        os.mkdir(etc / "newdir")
        assert guard.log.for_cgroup(cgroup.id) == events


def test_every_route_to_a_protected_file_leads_to_it(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path
) -> None:
    """Symlink, hard links made before load, /proc/self/fd, relative paths with
    "..", and a bind mount all end at the same dentry (or inode): refused."""
    etc = tmp_path / "etc"
    a = make(etc / "sub" / "a")
    exact = make(tmp_path / "single" / "secret")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "symlink").symlink_to(a)
    os.link(a, etc / "hardlink-inside")  # before load, inside the subtree
    os.link(exact, elsewhere / "hardlink-to-exact")  # before load, outside
    guard.apply_yaml(files_policy("routes", [cgroup.path], [
        ("deny", ["write"], [tree(etc), exact])]))

    routes: list[tuple[str, tuple[object, ...]]] = [
        ("open", (elsewhere / "symlink", os.O_WRONLY)),
        ("open", (etc / "hardlink-inside", os.O_WRONLY)),
        ("open", (elsewhere / "hardlink-to-exact", os.O_WRONLY)),
        ("proc_fd", (a, os.O_WRONLY)),
        ("proc_fd", (exact, os.O_RDWR)),
        ("open", (f"{etc}/sub/../sub/./a", os.O_WRONLY)),
    ]
    for op, args in routes:
        assert probe.call(op, *args) == EPERM, (op, args)
    assert probe.call("chdir", etc / "sub") == 0
    assert probe.call("open", "a", os.O_WRONLY) == EPERM
    assert probe.call("open", "../hardlink-inside", os.O_WRONLY) == EPERM
    assert probe.call("open", "a", os.O_RDONLY) == 0
    with mounted(["--bind", str(etc)], tmp_path / "bind"):
        assert probe.write(tmp_path / "bind" / "sub" / "a") == EPERM
        assert probe.call("open", tmp_path / "bind" / "new", os.O_CREAT | os.O_WRONLY) == EPERM
        assert probe.read(tmp_path / "bind" / "sub" / "a") == 0
        events = guard.log.for_cgroup(cgroup.id)
    assert probe.read(elsewhere / "symlink") == 0
    assert probe.call("proc_fd", a, os.O_RDONLY) == 0
    # The event names the file as reached: the real file for links and
    # /proc/self/fd, the bind mount's path through the bind mount.
    assert [e.path.decode() for e in events] == [
        str(a), str(etc / "hardlink-inside"), str(elsewhere / "hardlink-to-exact"), str(a),
        str(exact), str(a), str(a), str(etc / "hardlink-inside"),
        str(tmp_path / "bind" / "sub" / "a"), str(tmp_path / "bind" / "new")]


def test_subtree_rule_covers_a_mount_below_it(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path
) -> None:
    """The dentry walk stops at a file system's root; resolve registers the
    root of every mount below a subtree rule's directory with its decision."""
    top = tmp_path / "top"
    inner = top / "inner"
    with mounted(["-t", "tmpfs", "tmpfs"], inner):
        f = make(inner / "sub" / "f")
        guard.apply_yaml(files_policy("mounts", [cgroup.path], [
            ("deny", ["write"], [tree(top)])]))
        assert probe.write(f) == EPERM
        assert probe.call("mkdir", inner / "d") == EPERM
        assert probe.read(f) == 0
        f.write_text("from outside\n")


def test_a_process_outside_the_scope_is_not_affected(
    guard: GuestGuard, cgroup: TestCgroup, tmp_path: Path
) -> None:
    etc = tmp_path / "etc"
    a = make(etc / "a")
    scoped = cgroup.child("scoped")
    sibling = cgroup.child("sibling")
    guard.apply_yaml(files_policy("scoped-only", [scoped.path], [
        ("deny", ["write"], [tree(etc)]), ("audit", ["read"], [tree(etc)])]))
    inside, outside = FileProbe.start(scoped), FileProbe.start(sibling)
    try:
        assert inside.write(a) == EPERM
        assert inside.read(a) == 0
        assert outside.write(a) == 0
        assert outside.read(a) == 0
        assert outside.call("unlink", a) == 0
        assert outside.call("mkdir", etc / "d") == 0
        assert len(guard.log.for_cgroup(scoped.id)) == 2
        assert guard.log.for_cgroup(sibling.id) == []
        # a cgroup made below the scope after load is in it
        below = FileProbe.start(scoped.child("later"))
        try:
            assert below.call("rmdir", etc / "d") == EPERM
        finally:
            below.close()
    finally:
        inside.close()
        outside.close()


def test_a_path_named_exactly_is_matched_after_rename_over_and_creation(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path
) -> None:
    """EXACT follows the inode; NAME (directory inode + name) follows the name:
    a file renamed over the path, or created at it after load, is matched."""
    conf = make(tmp_path / "d" / "app.conf")
    later = tmp_path / "d" / "later.conf"
    guard.apply_yaml(files_policy("names", [cgroup.path], [
        ("deny", ["write"], [conf, later]), ("audit", ["read"], [conf, later])]))
    assert guard.last_warnings == ()
    replacement = make(tmp_path / "d" / ".app.conf.new", "v2\n")
    os.rename(replacement, conf)  # a package upgrade: a new inode at the name
    assert probe.write(conf) == EPERM
    assert probe.read(conf) == 0
    make(later)
    assert probe.write(later) == EPERM
    assert probe.read(later) == 0
    verdicts = [(e.verdict, e.access) for e in guard.log.for_cgroup(cgroup.id)]
    deny, audit = int(Verdict.DENY), int(Verdict.AUDIT)
    assert verdicts == [(deny, WRITE), (audit, READ), (deny, WRITE), (audit, READ)]


def test_a_name_that_hashes_alike_is_not_the_named_file(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path
) -> None:
    """A NAME key matches its name, not whatever hashes alike (issue 15, item 1).
    ``VCbjch.php`` and ``cache.json`` have the same FNV-1a 32, the hash NAME keys
    were once looked up by alone: with writes denied under www/ and allowed to
    www/cache.json, creating the other name is refused. Then the kernel is shown
    to compare the name stored in guard_names: with that name changed by hand
    (one byte, then one byte shorter), the allowed name itself is no match and
    falls to the subtree's deny; put back, it is allowed again."""
    from guard.kernel import apply
    from guard.kernel.resolve import Resolver

    assert fnv1a32(b"VCbjch.php") == fnv1a32(b"cache.json")
    www = tmp_path / "www"
    www.mkdir()
    allowed, twin = www / "cache.json", www / "VCbjch.php"
    create = os.O_WRONLY | os.O_CREAT
    guard.apply_yaml(files_policy("collide", [cgroup.path], [
        ("deny", ["write"], [tree(www)]), ("allow", ["write"], [allowed])]))
    assert guard.last_warnings == ()
    assert probe.call("open", twin, create) == EPERM
    assert not twin.exists()
    assert probe.call("open", allowed, create) == 0  # created: no EXACT key, the NAME key
    assert probe.write(allowed) == 0

    slot = guard.applier.writer().read_config().active_slot & 1
    directory = Resolver().identity(str(www))
    assert directory is not None
    table = guard.kernel.map(apply.NAMES)
    (key,) = [k for k in table
              if (k.ino, k.dev, k.match) == (directory.ino, directory.dev, layout.MATCH_NAME)
              and k.ruleset // layout.MAX_RULESETS == slot]
    saved = bytes(table[key])

    def store(name: bytes) -> None:
        value = layout.NameC(len=len(name))
        ctypes.memmove(value.name, name, len(name))
        table[key] = table.Leaf.from_buffer_copy(bytes(value))

    try:
        for other in (b"cache.jsoN", b"cache.jso"):
            store(other)
            assert probe.write(allowed) == EPERM, other
    finally:
        table[key] = table.Leaf.from_buffer_copy(saved)
    assert probe.write(allowed) == 0


def test_audit_mode_blocks_nothing_and_reports_would_deny(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path
) -> None:
    etc = tmp_path / "etc"
    a = make(etc / "a")
    guard.apply_yaml(files_policy("trial", [cgroup.path], [
        ("deny", ["write"], [tree(etc)])], mode="audit"))
    assert probe.write(a) == 0
    assert probe.call("unlink", a) == 0
    would = int(Verdict.WOULD_DENY)
    assert summary(guard.log.for_cgroup(cgroup.id)) == [
        (HOOK_FILE_OPEN, would, WRITE, str(a)), (HOOK_PATH_CHANGE, would, WRITE, str(a))]


# --- events: path text, floods -----------------------------------------------------


def test_long_path_keeps_its_final_components(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path
) -> None:
    """A path longer than the event's buffer: "..." and the final components."""
    deep = tmp_path.joinpath(*[f"component-{i:02d}" for i in range(20)])
    f = make(deep / "file")
    assert len(str(f)) > layout.PATH_LEN
    guard.apply_yaml(files_policy("long", [cgroup.path], [("audit", ["read"], [f])]))
    assert probe.read(f) == 0
    (event,) = guard.log.for_cgroup(cgroup.id)
    shown = event.path.decode()
    assert shown.startswith(".../") and str(f).endswith(shown[3:]), shown
    assert len(shown) > layout.PATH_LEN - 20


def test_a_burst_is_delivered_whole_and_aggregates_to_its_count(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path
) -> None:
    """Every open of a hammered file is an event, none lost; they differ only in
    the fields the aggregator ignores (time, tid), so they fold into one line
    after the first, whose count is the rest."""
    f = make(tmp_path / "hot")
    plan = guard.apply_yaml(files_policy("hot", [cgroup.path], [("audit", ["read"], [f])]))
    lost = guard.stat(layout.STAT_EVENTS_LOST)
    count = 2000
    assert probe.burst(f, os.O_RDONLY, count) == 0
    events = guard.log.for_cgroup(cgroup.id, settle_s=0.5)
    assert guard.stat(layout.STAT_EVENTS_LOST) == lost
    assert len(events) == count

    slot_plans = {0: plan, 1: plan}
    enricher = Enricher(
        rules=lambda ruleset, rule: slot_plans[(ruleset // layout.MAX_RULESETS) & 1].rule(rule),
        cgroups=lambda _id: cgroup.path)
    now = [0.0]
    aggregator = Aggregator(window=1.0, clock=lambda: now[0])
    lines = []
    for raw in events:
        lines += aggregator.push(enricher.enrich(raw))
    now[0] = 5.0
    lines += aggregator.flush(force=True)
    assert [(line.count, line.kind, line.action, line.access, line.path) for line in lines] == [
        (1, "file", "audit", "read", str(f)), (count - 1, "file", "audit", "read", str(f))]


# --- paths are the host's, whatever mount namespace resolves them ------------------


def test_paths_are_the_hosts_when_guard_resolves_them_with_a_private_tmp(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As the exec test of the same name: deny write under /tmp/x/**, resolved by
    a process with a tmpfs of its own on /tmp where /tmp/x exists too. Writes to
    the host's /tmp/x are refused in the cgroup; resolved in that process's own
    namespace (what guard did before), the rule named the private /tmp/x."""
    assert str(tmp_path).startswith("/tmp/"), tmp_path
    x = tmp_path / "x"
    f = make(x / "f")

    def prepare() -> None:  # in the private /tmp: the same names, other inodes
        make(f)

    real = kernel_resolve.resolve_files
    monkeypatch.setattr(kernel_resolve, "resolve_files",
                        lambda plan: in_private_tmp(lambda: real(plan), prepare))
    guard.apply_yaml(files_policy("host-tmp", [cgroup.path], [("deny", ["write"], [tree(x)])]))
    assert guard.last_warnings == ()
    assert probe.write(f) == EPERM
    assert probe.call("open", x / "new", os.O_WRONLY | os.O_CREAT) == EPERM
    assert probe.call("mkdir", x / "d") == EPERM
    assert probe.read(f) == 0
    assert probe.call("open", tmp_path / "beside", os.O_WRONLY | os.O_CREAT) == 0  # not under x
    f.write_text("outside the scope\n")  # this test is outside the scope

    monkeypatch.setattr(kernel_resolve, "resolve_files", lambda plan: in_private_tmp(
        lambda: real(plan, kernel_resolve.Resolver(view=kernel_resolve.View.own())), prepare))
    guard.apply_yaml(files_policy("own-tmp", [cgroup.path], [("deny", ["write"], [tree(x)])]))
    assert guard.last_warnings == ()
    assert probe.write(f) == 0  # the old behaviour: the private /tmp/x was denied


# --- the inode filter (guard_file_filter) ---------------------------------------------


def test_many_exact_rules_match_their_files_only_in_every_slot_and_the_filter_is_used(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path
) -> None:
    """200 exact rules in one directory: each named file is reported and its
    neighbours (same directory: the NAME lookup is made, and misses) are not,
    after each of three reloads (slot 1, slot 0, slot 1 again: each fill writes
    the idle half of the filter, each clear zeroes the old half). Then the
    kernel is shown to consult the filter: with the bits of one rule's file and
    directory cleared by hand in the active half, its open goes unreported; put
    back, it is reported again."""
    from guard.kernel import apply
    from guard.kernel.resolve import Resolver

    d = tmp_path / "many"
    files = [make(d / f"f{i:03d}") for i in range(400)]
    neighbours = [make(d / f"n{i:03d}") for i in range(10)]
    first, second = files[:200], files[200:]
    for rules, not_named in ((first, second), (second, first), (first, second)):
        guard.apply_yaml(files_policy("many", [cgroup.path], [("audit", ["read"], rules)]))
        assert guard.last_warnings == ()
        start = len(guard.log.for_cgroup(cgroup.id, settle_s=0))
        for f in rules[::20] + neighbours + not_named[::20]:
            assert probe.read(f) == 0
        events = guard.log.for_cgroup(cgroup.id)[start:]
        assert [e.path.decode() for e in events] == [str(f) for f in rules[::20]]

    target = first[7]
    resolver = Resolver()
    file_id, dir_id = resolver.identity(str(target)), resolver.identity(str(d))
    assert file_id is not None and dir_id is not None
    slot = guard.applier.writer().read_config().active_slot & 1
    table = guard.kernel.map(apply.FILE_FILTER)
    saved: dict[int, int] = {}
    for ino, dev in ((file_id.ino, file_id.dev), (dir_id.ino, dir_id.dev)):
        word, mask = layout.file_filter_word_mask(ino, dev)
        index = slot * layout.FILE_FILTER_WORDS + word
        value = saved.setdefault(index, int(table[ctypes.c_int(index)].value))
        assert value & mask == mask, "apply left a bit of a key's inode clear"
        current = int(table[ctypes.c_int(index)].value)
        table[ctypes.c_int(index)] = ctypes.c_uint64(current & ~mask)
    try:
        start = len(guard.log.for_cgroup(cgroup.id, settle_s=0))
        assert probe.read(target) == 0
        assert guard.log.for_cgroup(cgroup.id)[start:] == []
    finally:
        for index, word in saved.items():
            table[ctypes.c_int(index)] = ctypes.c_uint64(word)
    assert probe.read(target) == 0
    assert [e.path.decode() for e in guard.log.for_cgroup(cgroup.id)[start:]] == [str(target)]


# --- what the program cannot decide -----------------------------------------------


def test_too_deep_to_walk_fails_closed_for_that_access_only(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path
) -> None:
    """Past GUARD_MAX_PATH_DEPTH directories the walk cannot reach the root: the
    access gets the strongest decision any subtree rule of the ruleset has for
    it (here: deny write), flagged undecided and counted. Reads, which no
    subtree rule names, are not walked at all."""
    jail = tmp_path / "jail"
    jail.mkdir()
    deep = make(tmp_path.joinpath(*["d"] * (layout.MAX_PATH_DEPTH + 4), "f"))
    shallow = make(tmp_path.joinpath(*["s"] * 10, "f"))
    guard.apply_yaml(files_policy("deep", [cgroup.path], [("deny", ["write"], [tree(jail)])]))
    before = guard.stat(layout.STAT_UNDECIDED)
    assert probe.write(shallow) == 0
    assert probe.read(deep) == 0
    assert guard.stat(layout.STAT_UNDECIDED) == before
    assert probe.write(deep) == EPERM
    assert guard.stat(layout.STAT_UNDECIDED) == before + 1
    (event,) = guard.log.for_cgroup(cgroup.id)
    assert event.flags & layout.EVENT_UNDECIDED and event.access == WRITE


AT_FDCWD = -100
MAX_HANDLE_SZ = 128


def name_to_handle(path: Path) -> tuple[int, str]:
    """name_to_handle_at(2): (handle type, handle bytes in hex)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(MAX_HANDLE_SZ.to_bytes(4, "little"), 8 + MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), buf, ctypes.byref(mount_id), 0):
        raise OSError(ctypes.get_errno(), "name_to_handle_at")
    size = int.from_bytes(buf.raw[:4], "little")
    return int.from_bytes(buf.raw[4:8], "little", signed=True), buf.raw[8:8 + size].hex()


def drop_dentries() -> None:
    """Free every unused dentry and inode; twice per round, as a dentry the LRU saw
    used recently survives its first pass."""
    for _ in range(4):
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("2\n")


def test_a_file_opened_by_handle_with_its_path_out_of_the_cache_fails_closed(
    guard: GuestGuard, cgroup: TestCgroup, probe: FileProbe, tmp_path: Path
) -> None:
    """open_by_handle_at (CAP_DAC_READ_SEARCH: root in the scope) of a file whose
    directories have left the dentry cache gives a disconnected dentry: its own
    parent, but not its file system's root, so the subtree walk cannot see the
    read-denied directory it is in (issue 15, item 4). The walk is undecided and
    takes the strongest read verdict of the ruleset's subtree rules: EPERM,
    flagged. On ext4 (a loop image): tmpfs keeps every dentry, and the guest's
    overlays decode no handles. The test process, outside the scope, shows the
    dentry really was disconnected: the kernel cannot name its path."""
    subprocess.run(["modprobe", "-a", "loop", "ext4"], check=False, timeout=60)
    image = tmp_path / "fs.img"
    with image.open("wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=120,
                   capture_output=True)
    with mounted(["-o", "loop", str(image)], tmp_path / "mnt") as mnt:
        secret = make(mnt / "secret" / "deeper" / "key")
        public = make(mnt / "public" / "deeper" / "free")
        guard.apply_yaml(files_policy("handle", [cgroup.path], [
            ("deny", ["read"], [tree(mnt / "secret")])]))
        assert guard.last_warnings == ()
        assert probe.read(secret) == EPERM
        handles = {path: name_to_handle(path) for path in (secret, public)}

        drop_dentries()
        outside = FileProbe.start_outside()
        try:
            code, shown = outside.call_value("by_handle", mnt, *handles[secret])
        finally:
            outside.close()
        assert code == 0 and shown != str(secret), (code, shown)  # disconnected

        drop_dentries()
        before = guard.stat(layout.STAT_UNDECIDED)
        start = len(guard.log.for_cgroup(cgroup.id, settle_s=0))
        assert probe.call_value("by_handle", mnt, *handles[secret])[0] == EPERM
        assert guard.stat(layout.STAT_UNDECIDED) == before + 1
        (event,) = guard.log.for_cgroup(cgroup.id)[start:]
        assert event.flags & layout.EVENT_UNDECIDED and event.access == READ
        assert event.verdict == int(Verdict.DENY)
        # no rule decides writes: a disconnected file is not walked for them
        assert probe.call("open", secret, os.O_WRONLY) == 0
        # fail closed: any disconnected file is read-denied while a read-deny subtree
        # rule is in the ruleset, wherever it is; without the policy it opens
        drop_dentries()
        assert probe.call_value("by_handle", mnt, *handles[public])[0] == EPERM
        guard.clear()
        assert probe.call_value("by_handle", mnt, *handles[public])[0] == 0


# --- stacked file systems: the file below decides --------------------------------

# Run by an unprivileged user in its own user and mount namespaces (unshare -Urm):
# mounts overlays on the layers given and answers errnos as JSON. The system
# Python, stdlib only: the user cannot read the test's virtual environment.
OVERLAY_USER = textwrap.dedent("""\
    import json, os, subprocess, sys
    base = sys.argv[1]
    point = base + "/point"

    def mount(options):
        done = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, point],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit("mount -o " + options + ": " + done.stderr)

    def errno_of(action):
        try:
            action()
            return 0
        except OSError as error:
            return error.errno

    def read(name):
        with open(point + "/" + name, "rb") as f:
            f.read(1)

    def write(name):
        with open(point + "/" + name, "ab") as f:
            f.write(b"overlay\\n")

    found = {}
    mount(f"userxattr,lowerdir={base}/secret:{base}/other")
    found["lower_other"] = errno_of(lambda: read("ok"))
    found["lower_secret"] = errno_of(lambda: read("file"))
    subprocess.run(["umount", point], check=True)
    mount(f"userxattr,lowerdir={base}/low,upperdir={base}/up,workdir={base}/work")
    found["upper_read"] = errno_of(lambda: read("f"))
    found["upper_write"] = errno_of(lambda: write("f"))
    subprocess.run(["umount", point], check=True)
    print(json.dumps(found))
    """)
NOBODY = 65534


def test_an_overlay_is_judged_by_the_file_below(
    guard: GuestGuard, cgroup: TestCgroup, tmp_path: Path
) -> None:
    """An unprivileged user mounts overlays in its own user namespace (issue 15,
    item 3): its files have the overlay's own inodes, which no rule names, but
    overlayfs opens the real file below as a backing file, and that open is
    judged by the real file's identity. A read-denied file is refused through an
    overlay that has its directory as a lower layer; a write through an overlay
    whose upper layer is a write-denied directory is refused, and the file there
    is unchanged. Other files of the same overlays open."""
    base = Path("/dev/shm") / f"guard-overlay-{os.getpid()}-{tmp_path.name}"
    base.mkdir(mode=0o755)
    try:
        for name in ("secret", "other", "low", "point"):
            (base / name).mkdir(mode=0o755)
        for name in ("up", "work"):
            (base / name).mkdir(mode=0o755)
            os.chown(base / name, NOBODY, NOBODY)
        for path in (make(base / "secret" / "file"), make(base / "other" / "ok")):
            path.chmod(0o644)
        upper = make(base / "up" / "f", "before\n")
        os.chown(upper, NOBODY, NOBODY)
        guard.apply_yaml(files_policy("overlay", [cgroup.path], [
            ("deny", ["read"], [tree(base / "secret")]),
            ("deny", ["write"], [tree(base / "up")])]))
        assert guard.last_warnings == ()
        user = cgroup.spawn(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
             "unshare", "-Urm", "/usr/bin/python3", "-c", OVERLAY_USER, str(base)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = user.communicate(timeout=120)
        assert user.returncode == 0, err
        assert json.loads(out) == {"lower_other": 0, "lower_secret": EPERM,
                                   "upper_read": 0, "upper_write": EPERM}
        assert upper.read_text() == "before\n"
        events = guard.log.for_cgroup(cgroup.id)
        assert [(e.verdict, e.access) for e in events] == [
            (int(Verdict.DENY), READ), (int(Verdict.DENY), WRITE)]
        # the events name the file as the user reached it: through the overlay
        assert [e.path.decode() for e in events] == [str(base / "point" / "file"),
                                                    str(base / "point" / "f")]
    finally:
        subprocess.run(["umount", "-R", str(base / "point")], capture_output=True, timeout=30)
        shutil.rmtree(base, ignore_errors=True)


# --- the kernel agrees with guard explain ------------------------------------------


def test_kernel_agrees_with_the_evaluator(
    guard: GuestGuard, cgroup: TestCgroup, tmp_path: Path
) -> None:
    """A table of opens over nested scopes, exact and subtree rules, rules for one
    access only (the walk passes them over for the other), ties, audit mode, and
    paths through symlinks (explain resolves them as the kernel does)."""
    from guard.kernel.identity import plan_paths, resolve_question

    b = tmp_path / "t"
    names = [
        "etc/shadow", "etc/passwd", "etc/public", "etc/ssh/sshd_config",
        "etc/ssh/keys/host_key", "etc/ssh/keys/deep/k", "tie/t", "trial/x",
        "trial/sub/y", "var/log/app.log", "free/f",
    ]
    for name in names:
        make(b / name)
    (b / "link").mkdir()
    for name, target in {"shadow": "../etc/shadow", "public": "../etc/public",
                         "ssh": "../etc/ssh", "trial": "../trial/sub"}.items():
        (b / "link" / name).symlink_to(target)
    asked = [*names, "link/shadow", "link/public", "link/ssh/sshd_config",
             "link/ssh/keys/host_key", "link/trial/y"]
    child, other = cgroup.child("child"), cgroup.child("other")
    outside = cgroup.child("outside")
    p1 = files_policy("p1", [child.path, other.path], [
        ("audit", ["read", "write"], [b / "etc/shadow", tree(b / "etc/ssh")]),
        ("deny", ["write"], [tree(b / "etc")]),
        ("allow", ["write"], [b / "etc/public"]),
        ("allow", ["read"], [tree(b / "etc/ssh/keys"), b / "tie/t"]),
        ("audit", ["write"], [b / "var/log/app.log"]),
    ])
    p2 = files_policy("p2", [child.path], [("deny", ["write", "read"], [tree(b / "trial")])],
                      mode="audit")
    p3 = files_policy("p3", [child.path], [("deny", ["read"], [b / "tie/t"])])
    plan = plan_from_yaml(p1, p2, p3)
    guard.apply(plan)
    assert guard.last_warnings == ()

    probes = {cg.path: (cg, FileProbe.start(cg)) for cg in (child, other, outside)}
    seen: set[Verdict] = set()
    mismatches: list[str] = []
    try:
        for cg, probe in probes.values():
            for name in asked:
                for access, flags in (("read", os.O_RDONLY), ("write", os.O_WRONLY)):
                    path = b / name
                    expected = decide_open(plan, cg.path, str(path), access,
                                           resolve_question(plan_paths(plan), str(path)))
                    seen.add(expected.verdict)
                    start = len(guard.log.for_cgroup(cg.id, settle_s=0))
                    code = probe.call("open", path, flags)
                    events = guard.log.for_cgroup(cg.id)[start:]
                    got = (code, [(Verdict(e.verdict), e.rule_id) for e in events])
                    rule = expected.rule.id if expected.rule else 0
                    want = (EPERM if expected.verdict is Verdict.DENY else 0,
                            [] if expected.verdict is Verdict.ALLOW
                            else [(expected.verdict, rule)])
                    if got != want:
                        mismatches.append(f"{cg.path} {access} {path}: kernel {got}, "
                                          f"evaluator {want}\n{expected.render()}")
    finally:
        for _cg, probe in probes.values():
            probe.close()
    assert not mismatches, "\n".join(mismatches)
    assert seen == set(Verdict)  # the table exercises every verdict
