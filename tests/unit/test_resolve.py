"""guard.kernel.resolve: plan paths to the inode keys the kernel looks up.

These run on the host against its real file systems (identity must come from
the kernel's own view, /proc/self/fdinfo and mountinfo); that the kernel
programs compute the same keys is proven in the guest
(tests/guest/test_exec_enforce.py: name hashes, mounts, links).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from guard import layout
from guard.errors import Location
from guard.kernel.resolve import (
    FileInodeEntry,
    Identity,
    InodeEntry,
    InodeKey,
    Match,
    Resolver,
    View,
    fnv1a64,
    host_view,
    parse_fdinfo,
    parse_mountinfo,
    real_path_in,
    resolve_exec,
    resolve_files,
    summary_key,
    unescape,
)
from guard.policy.plan import (
    Decision,
    ExecEntry,
    FileEntry,
    Plan,
    RuleRef,
    Ruleset,
    RulesetDefaults,
    ScopeEntry,
    Verdict,
)

ALLOW = Decision(Verdict.ALLOW, 1)
AUDIT = Decision(Verdict.AUDIT, 2)
DENY = Decision(Verdict.DENY, 3)
WOULD = Decision(Verdict.WOULD_DENY, 4)


def plan_of(exec_entries: tuple[ExecEntry, ...] = (),
            file_entries: tuple[FileEntry, ...] = ()) -> Plan:
    where = Location("t.yaml", 1, 1)
    return Plan(
        rules=tuple(RuleRef(i, "p", "exec", i - 1, where) for i in range(1, 5)),
        rulesets=(Ruleset(0, ("p",)), Ruleset(1, ("q",))),
        scopes=(ScopeEntry("/a", 0), ScopeEntry("/b", 1)),
        defaults=(RulesetDefaults(0, ALLOW, None), RulesetDefaults(1, ALLOW, None)),
        exec=exec_entries,
        files=file_entries,
        net=(),
        port_tables=(),
    )


# --- the hash ------------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), [
    # Published FNV-1a 64-bit test vectors.
    (b"", 0xCBF29CE484222325),
    (b"a", 0xAF63DC4C8601EC8C),
    (b"b", 0xAF63DF4C8601F1A5),
    (b"foobar", 0x85944171F73967E8),
])
def test_fnv1a64_matches_the_published_vectors(data: bytes, expected: int) -> None:
    assert fnv1a64(data) == expected


def test_fnv1a64_hashes_bytes_not_characters() -> None:
    assert fnv1a64("é".encode()) == fnv1a64(b"\xc3\xa9") != fnv1a64(b"\xe9")


# --- parsing /proc ---------------------------------------------------------------

MOUNTINFO = (
    "23 1 0:22 / / ro,relatime - 9p /dev/root ro\n"
    "48 23 0:41 / /usr rw,relatime - overlay ovl rw,lowerdir=/usr\n"
    "63 51 0:24 /tmp/lock /var/lib/dpkg/lock rw - tmpfs run rw\n"
    "70 23 8:1 / /mnt/with\\040space rw shared:1 master:2 - ext4 /dev/sda1 rw\n"
    "broken line\n"
)


def test_parse_mountinfo_reads_ids_devices_roots_and_escaped_points() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m.mnt_id for m in mounts] == [23, 48, 63, 70]
    assert mounts[1].dev == layout.kernel_dev(0, 41) == 41
    assert mounts[2].root == "/tmp/lock" and mounts[2].point == "/var/lib/dpkg/lock"
    assert mounts[3].point == "/mnt/with space"
    assert mounts[3].dev == (8 << 20) | 1
    assert mounts[3].fstype == "ext4"  # optional fields before the separator are skipped


def test_unescape_leaves_non_octal_backslashes() -> None:
    assert unescape(r"a\134b\011c\x") == "a\\b\tc\\x"


def test_parse_fdinfo_reads_octal_flags_and_decimal_numbers() -> None:
    info = parse_fdinfo("pos:\t0\nflags:\t012000000\nmnt_id:\t48\nino:\t521919\nweird: x\n")
    assert info == {"pos": 0, "flags": 0o12000000, "mnt_id": 48, "ino": 521919}


# --- identities on this machine --------------------------------------------------------


def test_identity_is_the_kernel_inode_and_the_mount_superblock(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    resolver = Resolver()
    found = resolver.lookup(str(target))
    assert found is not None
    identity, mnt_id = found
    assert identity.ino == os.stat(target).st_ino
    mount = next(m for m in resolver.mounts if m.mnt_id == mnt_id)
    assert identity.dev == mount.dev
    assert resolver.identity(str(tmp_path / "missing")) is None


def test_symlinks_resolve_to_their_target(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target)
    resolver = Resolver()
    assert resolver.identity(str(link)) == resolver.identity(str(target))


def test_mount_roots_below_a_directory_are_the_visible_mounts(tmp_path: Path) -> None:
    resolver = Resolver()
    roots = dict(resolver.mount_roots_below("/"))
    assert roots["/proc"] == resolver.identity("/proc")
    assert "/" not in roots
    assert resolver.mount_roots_below(str(tmp_path)) == []


def test_fdinfo_fallback_uses_stat_when_ino_is_missing(tmp_path: Path) -> None:
    """An old kernel's fdinfo without ``ino:`` (error path: a fake /proc/self)."""
    fake = tmp_path / "proc"
    (fake / "fdinfo").mkdir(parents=True)
    (fake / "mountinfo").write_text("")
    for fd in range(4096):  # any fd the resolver may get shows no ino and no mnt_id
        (fake / "fdinfo" / str(fd)).write_text("pos:\t0\nflags:\t0\n")
    target = tmp_path / "f"
    target.write_text("x")
    st = os.stat(target)
    assert Resolver(fake).identity(str(target)) == Identity(
        st.st_ino, layout.kernel_dev(os.major(st.st_dev), os.minor(st.st_dev)))


# --- keys of plan entries --------------------------------------------------------------


def keys_of(items: tuple[InodeEntry, ...] | tuple[FileInodeEntry, ...]) -> dict[InodeKey, Any]:
    return {item.key: item for item in items}


def test_exact_path_gets_its_inode_and_its_name(tmp_path: Path) -> None:
    tool = tmp_path / "tool"
    tool.write_text("x")
    items, warnings = resolve_exec(plan_of((ExecEntry(0, str(tool), False, DENY),)))
    assert warnings == ()
    resolver = Resolver()
    file_id = resolver.identity(str(tool))
    dir_id = resolver.identity(str(tmp_path))
    assert file_id is not None and dir_id is not None
    assert {(i.key, i.decision) for i in items} == {
        (InodeKey(file_id.ino, file_id.dev, 0, Match.EXACT), DENY),
        (InodeKey(dir_id.ino, dir_id.dev, 0, Match.NAME, fnv1a64(b"tool"), b"tool"), DENY),
    }


def test_a_path_that_does_not_exist_yet_is_matched_by_name(tmp_path: Path) -> None:
    later = tmp_path / "later"
    missing_dir = tmp_path / "nowhere" / "x"
    items, warnings = resolve_exec(plan_of((
        ExecEntry(0, str(later), False, DENY),
        ExecEntry(0, str(missing_dir), False, DENY),
        ExecEntry(0, str(tmp_path / "gone"), True, DENY),
    )))
    assert [i.key.match for i in items] == [Match.NAME]
    assert {w.path for w in warnings} == {str(missing_dir), f"{tmp_path}/gone/**"}
    assert all("not loaded" in w.message for w in warnings)


def test_symlinked_exact_path_names_the_real_file(tmp_path: Path) -> None:
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    (real_dir / "python3.11").write_text("x")
    (tmp_path / "python3").symlink_to(real_dir / "python3.11")
    items, _ = resolve_exec(plan_of((ExecEntry(0, str(tmp_path / "python3"), False, DENY),)))
    name = next(i.key for i in items if i.key.match is Match.NAME)
    real = Resolver().identity(str(real_dir))
    assert real is not None
    assert (name.ino, name.dev, name.name_hash) == (real.ino, real.dev, fnv1a64(b"python3.11"))


def test_hard_links_share_one_exact_key_and_the_stronger_verdict_wins(tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.write_text("x")
    os.link(first, tmp_path / "second")
    items, _ = resolve_exec(plan_of((
        ExecEntry(0, str(first), False, ALLOW),
        ExecEntry(0, str(tmp_path / "second"), False, DENY),
    )))
    exact = [i for i in items if i.key.match is Match.EXACT]
    assert len(exact) == 1 and exact[0].decision == DENY
    names = {i.key.name_hash: i.decision for i in items if i.key.match is Match.NAME}
    assert names == {fnv1a64(b"first"): ALLOW, fnv1a64(b"second"): DENY}


def test_subtree_registers_mount_roots_and_the_deeper_rule_keeps_a_shared_key() -> None:
    """``/**`` registers /proc's root (a mount below /); ``/proc/**`` names that same
    inode as its directory: the deeper rule's decision stays, whatever the verdicts."""
    items, warnings = resolve_exec(plan_of((
        ExecEntry(0, "/", True, DENY),
        ExecEntry(0, "/proc", True, ALLOW),
    )))
    assert warnings == ()
    proc = Resolver().identity("/proc")
    assert proc is not None
    by_key = keys_of(items)
    assert by_key[InodeKey(proc.ino, proc.dev, 0, Match.SUBTREE)].decision == ALLOW
    root = Resolver().identity("/")
    assert root is not None
    assert by_key[InodeKey(root.ino, root.dev, 0, Match.SUBTREE)].decision == DENY
    assert len([i for i in items if i.key.match is Match.SUBTREE]) > 2  # other mounts too


def test_summary_key_carries_the_strongest_subtree_verdict_per_ruleset(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "f").write_text("x")
    items, _ = resolve_exec(plan_of((
        ExecEntry(0, str(tmp_path), True, AUDIT),
        ExecEntry(0, str(tmp_path / "a"), True, WOULD),
        ExecEntry(0, str(tmp_path / "f"), False, DENY),  # exact: not in the summary
        ExecEntry(1, str(tmp_path / "f"), False, DENY),  # ruleset 1: no subtree, no summary
    )))
    by_key = keys_of(items)
    assert by_key[summary_key(0)].decision == WOULD
    assert summary_key(1) not in by_key


def test_keys_are_slot_qualified_for_the_kernel() -> None:
    key = InodeKey(7, 41, 3, Match.NAME, 99).to_c(1)
    assert (key.ino, key.dev, key.ruleset, key.match, key.name_hash) == (
        7, 41, layout.MAX_RULESETS + 3, layout.MATCH_NAME, 99)


def test_file_entries_merge_read_and_write_separately(tmp_path: Path) -> None:
    target = tmp_path / "shadow"
    target.write_text("x")
    items, warnings = resolve_files(plan_of(file_entries=(
        FileEntry(0, str(target), False, AUDIT, None),
        FileEntry(0, str(tmp_path), True, None, DENY),
    )))
    assert warnings == ()
    by_key = keys_of(items)
    identity = Resolver().identity(str(target))
    assert identity is not None
    exact = by_key[InodeKey(identity.ino, identity.dev, 0, Match.EXACT)]
    assert (exact.read, exact.write) == (AUDIT, None)
    summary = by_key[summary_key(0)]
    assert (summary.read, summary.write) == (None, DENY)


# --- whose paths: the host's (PID 1's root), whatever namespace guard is in ----------------

# A file system as a table of symlinks: path -> target; every other path is not a link.
LINKS = {
    "/usr/bin/python3": "python3.11",  # relative: beside the link
    "/bin": "usr/bin",  # relative, at the root
    "/etc/alternatives/py": "/usr/bin/python3",  # absolute: from the root
    "/opt/up": "../usr/./bin",
    "/opt/escape": "../../../../etc",  # .. never climbs above the root
    "/loop/a": "b",
    "/loop/b": "a",
    "/dangling": "/nowhere/x",
}


def fake_readlink(path: str) -> str | None:
    return LINKS.get(path)


@pytest.mark.parametrize(("path", "real"), [
    ("/usr/bin/python3", "/usr/bin/python3.11"),
    ("/bin/python3", "/usr/bin/python3.11"),
    ("/etc/alternatives/py", "/usr/bin/python3.11"),
    ("/opt/up/python3", "/usr/bin/python3.11"),
    ("/opt/escape/passwd", "/etc/passwd"),
    ("/../../bin/../etc/./x", "/usr/etc/x"),  # .. of a link: the parent of its target
    ("/", "/"),
    ("//usr///lib/", "/usr/lib"),
    ("/dangling", "/nowhere/x"),  # missing: kept as written, as os.path.realpath does
    ("/missing/../usr", "/usr"),
])
def test_real_path_in_follows_symlinks_within_the_root(path: str, real: str) -> None:
    assert real_path_in(path, fake_readlink) == real


def test_real_path_in_stops_following_a_loop() -> None:
    calls: list[str] = []

    def counting(path: str) -> str | None:
        calls.append(path)
        return fake_readlink(path)

    assert real_path_in("/loop/a/x", counting).startswith("/loop/")
    assert len(calls) <= 45  # MAX_SYMLINKS links followed, then taken as written


def test_real_path_in_agrees_with_os_path_realpath(tmp_path: Path) -> None:
    """With this process's root: what os.path.realpath gives, link by link."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "rel").symlink_to("real/sub")
    (tmp_path / "abs").symlink_to(tmp_path / "rel")
    (tmp_path / "real" / "up").symlink_to("..")
    for path in ("abs/f", "rel/../x", "real/up/up/abs", "abs/../../y", "missing/../abs"):
        full = f"{tmp_path}/{path}"
        assert real_path_in(full, View.own().readlink) == os.path.realpath(full)


def test_a_rooted_view_resolves_absolute_symlinks_inside_its_root(tmp_path: Path) -> None:
    """openat2(RESOLVE_IN_ROOT): a symlink to /etc/target, and a walk up past the
    top, stay inside the root (as /proc/1/root: PID 1's /, not guard's)."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "target").write_text("x")
    (root / "link").symlink_to("/etc/target")
    (root / "etcdir").symlink_to("/etc")
    view = View.rooted(root, Path("/proc/self/mountinfo"))
    resolver = Resolver(view=view)
    try:
        inside = Resolver(view=View.own()).identity(str(root / "etc" / "target"))
        assert inside is not None
        assert resolver.identity("/link") == inside
        assert resolver.identity("/../../../etc/target") == inside
        assert resolver.identity("/etc/passwd") is None  # the host's /etc is outside
        assert resolver.real_path("/link") == "/etc/target"
        assert resolver.real_path("/etcdir/target") == "/etc/target"
        items, warnings = resolve_exec(plan_of((ExecEntry(0, "/link", False, DENY),)), resolver)
        assert warnings == ()
        etc = Resolver(view=View.own()).identity(str(root / "etc"))
        assert etc is not None
        assert {i.key for i in items} == {
            InodeKey(inside.ino, inside.dev, 0, Match.EXACT),
            InodeKey(etc.ino, etc.dev, 0, Match.NAME, fnv1a64(b"target"), b"target"),
        }
    finally:
        resolver.close()
    assert view.root_fd is None


def test_rooted_at_slash_gives_the_keys_of_the_own_view(tmp_path: Path) -> None:
    """The openat2 path, rooted at this process's / , changes no key: what guard
    resolves through /proc/1/root is what it resolved before, in one namespace."""
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "f").write_text("x")
    (tmp_path / "abs").symlink_to(tmp_path / "d")
    (tmp_path / "rel").symlink_to("d/f")
    plan = plan_of(
        (ExecEntry(0, f"{tmp_path}/abs/f", False, DENY), ExecEntry(0, f"{tmp_path}/rel", False,
                                                                    AUDIT),
         ExecEntry(1, f"{tmp_path}/abs", True, DENY), ExecEntry(1, "/", True, ALLOW),
         ExecEntry(0, f"{tmp_path}/abs/later", False, DENY)),
        (FileEntry(0, f"{tmp_path}/rel", False, AUDIT, DENY),
         FileEntry(0, "/proc", True, None, DENY)))
    rooted = Resolver(view=View.rooted("/", Path("/proc/self/mountinfo")))
    try:
        assert resolve_exec(plan, rooted) == resolve_exec(plan, Resolver(view=View.own()))
        assert resolve_files(plan, rooted) == resolve_files(plan, Resolver(view=View.own()))
    finally:
        rooted.close()


def fake_proc(tmp_path: Path, own: str, init: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "1").mkdir()
    (proc / "self" / "mountinfo").write_text(own)
    (proc / "1" / "mountinfo").write_text(init)
    return proc


def test_host_view_is_the_own_view_when_the_mount_tables_agree(tmp_path: Path) -> None:
    view = host_view(fake_proc(tmp_path, MOUNTINFO, MOUNTINFO))
    assert view.root_fd is None and view.problem == ""
    assert view.mountinfo == tmp_path / "proc" / "self" / "mountinfo"
    assert "shares PID 1's" in view.where


def test_host_view_opens_pid1s_root_when_the_tables_differ(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, MOUNTINFO, MOUNTINFO.replace("23 1 ", "99 1 "))
    host_root = tmp_path / "host"
    (host_root / "tmp").mkdir(parents=True)
    (proc / "1" / "root").symlink_to(host_root)
    view = host_view(proc)
    try:
        assert view.root_fd is not None and view.problem == ""
        assert view.mountinfo == proc / "1" / "mountinfo"
        assert view.read_mounts()[0].mnt_id == 99
        assert f"through {proc}/1/root" in view.where
        fd = view.open("/tmp")
        try:
            assert os.fstat(fd).st_ino == os.stat(host_root / "tmp").st_ino
        finally:
            os.close(fd)
    finally:
        view.close()


def test_host_view_says_why_it_cannot_be_the_hosts(tmp_path: Path) -> None:
    """No access to /proc/1/root (here: none at all): the own view, and a problem
    that says whose paths these are and what it takes."""
    proc = fake_proc(tmp_path, MOUNTINFO, "")
    view = host_view(proc)
    assert view.root_fd is None and view.mountinfo == proc / "self" / "mountinfo"
    assert view.where == "guard's own mount namespace"
    assert "not the host's" in view.problem
    assert f"cannot read {proc}/1/root" in view.problem and "CAP_SYS_PTRACE" in view.problem
    (proc / "1" / "mountinfo").unlink()
    assert f"cannot read {proc}/1/mountinfo" in host_view(proc).problem
