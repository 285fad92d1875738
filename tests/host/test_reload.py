"""Hot reload under a running ``guard run``: every kind of change, proved by connect().

Each test starts the daemon as a subprocess on a policy directory in a tmp dir,
its programs attached to a cgroup this module made; a long-lived probe process
in a child cgroup owns loopback listeners and makes one real connect() per
request. After a change to the directory the test polls the probe until the
new verdicts hold (at most 5 s) and records how long that took, measured from
the moment the change was complete on disk.

    /guard-test-XXXX            --host-cgroup: programs attached here
    /guard-test-XXXX/in         the probe runs here

The policies are whole-host (that is: the --host-cgroup) egress deny lists of
loopback ports the probe listens on.
"""

from __future__ import annotations

import errno
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import need
from support.cgroup import TestCgroup
from support.daemon import ConnectProbe, GuardDaemon, running_daemon
from support.lab import syslog_and_cgroup
from support.policies import egress, policy_text, tcp_rule
from support.rsyslog import Rsyslog, Syslog5424, guard_messages

pytestmark = pytest.mark.host

EPERM = errno.EPERM
OK = 0
BOUND_S = 5.0  # the longest a change may take to be enforced in these tests


@dataclass
class Lab:
    top: TestCgroup
    syslog: Rsyslog
    probe: ConnectProbe
    work: Path
    latencies: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ports(self) -> list[int]:
        return self.probe.ports

    @property
    def syslog_target(self) -> str:
        return f"unix:{self.syslog.unix_path}"

    def daemon(self, policies: Path, name: str, extra: tuple[str, ...] = ()
               ) -> AbstractContextManager[GuardDaemon]:
        return running_daemon(policies, self.top, self.syslog_target, self.work, name, extra)

    def expect(self, denied: set[int], what: str, since: float | None = None) -> float:
        """Wait until exactly ``denied`` of our ports are refused; the latency."""
        expected = {p: (EPERM if p in denied else OK) for p in self.ports}
        latency = self.probe.wait_for(expected, timeout=BOUND_S, since=since)
        if since is not None:
            self.latencies.setdefault(what, []).append(latency)
            print(f"{what}: enforced {latency * 1000:.0f} ms after the change")
        return latency

    def messages(self, predicate: Callable[[Syslog5424], bool], count: int = 1,
                 timeout: float = 15.0) -> list[Syslog5424]:
        lines = self.syslog.wait_for(
            lambda lines: len([m for m in guard_messages(lines) if predicate(m)]) >= count,
            timeout)
        return [m for m in guard_messages(lines) if predicate(m)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    need(shutil.which("git") is not None, "git is not installed")
    work = tmp_path_factory.mktemp("reload")
    with syslog_and_cgroup(work) as (top, syslog):
        probe = ConnectProbe.start(top.child("in"), 4)
        built = Lab(top, syslog, probe, work)
        try:
            yield built
        finally:
            probe.close()
            for what, values in sorted(built.latencies.items()):
                print(f"latency {what}: " + ", ".join(f"{v * 1000:.0f}" for v in values)
                      + " ms")


def deny_policy(name: str, ports: list[int], header: str = "") -> str:
    """A whole-host egress policy denying TCP to each of ``ports`` on 127.0.0.1, one rule
    per port (so each is its own rule label)."""
    return header + policy_text(name, egress(*(tcp_rule("deny", port) for port in ports)))


def save_atomically(path: Path, text: str) -> None:
    """What editors do: write a temporary file beside it, rename it over."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def policy_dir(lab: Lab, name: str) -> Path:
    directory = lab.work / name
    directory.mkdir()
    return directory


def reloads_after(guard: GuardDaemon, before: int, timeout: float = BOUND_S) -> dict[str, Any]:
    return guard.wait_status(lambda s: s["reloads"] > before, timeout)


# --- every kind of change ----------------------------------------------------------------


def test_an_edit_in_place_is_enforced_and_logged(lab: Lab) -> None:
    p0, p1 = lab.ports[:2]
    policies = policy_dir(lab, "edit")
    lock = policies / "lock.yaml"
    lock.write_text(deny_policy("lock", [p0]))
    with lab.daemon(policies, "edit") as guard:
        lab.expect({p0}, "start")
        before = guard.status()
        assert before["watch"]["enabled"]

        lock.write_text(deny_policy("lock", [p1]))  # truncate + write, as `>` does
        lab.expect({p1}, "edit in place", since=time.monotonic())

        status = guard.wait_status(lambda s: s["generation"] > before["generation"])
        last = status["last_reload"]
        assert last["ok"] and last["changed"] and last["reason"] == "watch", last
        assert (last["rules_added"], last["rules_removed"]) == (1, 1)
        assert last["added"] == last["removed"] == ["lock/egress.rules[0]"]
        assert last["previous"] == before["revision"] != status["revision"]
        assert status["last_reload_error"] is None
        [line] = lab.messages(lambda m: m.msgid == "reload" and m.procid == str(guard.proc.pid)
                              and m.fields.get("revision") == status["revision"])
        assert "applied revision" in line.msg and "+1 -1 rules" in line.msg, line.msg
        assert "added: lock/egress.rules[0]" in line.msg
        assert line.fields["previous"] == before["revision"]
        assert (line.fields["added"], line.fields["removed"], line.fields["changed"]) == \
            ("1", "1", "1")


def test_add_rename_and_delete_files(lab: Lab) -> None:
    p0, p1, p2, p3 = lab.ports
    policies = policy_dir(lab, "files")
    lock = policies / "lock.yaml"
    lock.write_text(deny_policy("lock", [p0]))
    with lab.daemon(policies, "files") as guard:
        lab.expect({p0}, "start")

        (policies / "extra.yaml").write_text(deny_policy("extra", [p2]))
        lab.expect({p0, p2}, "add a file", since=time.monotonic())

        save_atomically(lock, deny_policy("lock", [p1, p3]))
        lab.expect({p1, p2, p3}, "atomic save (rename over)", since=time.monotonic())

        (policies / "extra.yaml").rename(policies / "extra.yaml.disabled")
        lab.expect({p1, p3}, "rename to a non-policy name", since=time.monotonic())

        (policies / "extra.yaml.disabled").rename(policies / "extra.yml")
        lab.expect({p1, p2, p3}, "rename back to a policy name", since=time.monotonic())

        sub = policies / "team"
        sub.mkdir()
        (policies / "extra.yml").rename(sub / "extra.yaml")
        lab.expect({p1, p2, p3}, "move into a subdirectory")
        shutil.rmtree(sub)
        lab.expect({p1, p3}, "remove a subdirectory", since=time.monotonic())

        lock.unlink()
        lab.expect(set(), "delete a file", since=time.monotonic())
        status = guard.wait_status(lambda s: s["rules"] == 0)
        assert status["policies"] == [] and status["last_reload"]["ok"]
        assert status["last_reload"]["rules_removed"] == 3  # two rules and the default
        lab.messages(lambda m: m.msgid == "reload" and m.procid == str(guard.proc.pid)
                     and "holds no policies: nothing is enforced" in m.msg)


def write_configmap_version(directory: Path, version: str, files: dict[str, str]) -> None:
    """What the kubelet does on a ConfigMap update: a new timestamped directory, the
    ``..data`` symlink swapped to it by a rename, then the keys' symlinks."""
    payload = directory / f"..{version}"
    payload.mkdir()
    for name, text in files.items():
        (payload / name).write_text(text)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(payload.name)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    os.replace(tmp, directory / "..data")
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    for link in list(directory.iterdir()):
        if link.is_symlink() and not link.name.startswith("..") and not link.exists():
            link.unlink()  # a key that is gone
    if old is not None:
        shutil.rmtree(directory / old)


def test_configmap_symlink_swap(lab: Lab) -> None:
    p0, p1, p2, _ = lab.ports
    policies = policy_dir(lab, "configmap")
    write_configmap_version(policies, "2026_11_25_10_00_00.1", {
        "lock.yaml": deny_policy("lock", [p0])})
    with lab.daemon(policies, "configmap") as guard:
        lab.expect({p0}, "start")
        write_configmap_version(policies, "2026_11_25_10_05_00.2", {
            "lock.yaml": deny_policy("lock", [p1]),
            "more.yaml": deny_policy("more", [p2])})
        lab.expect({p1, p2}, "configmap ..data swap", since=time.monotonic())
        # (the kernel flips before the reload ends: status follows a moment later)
        status = guard.wait_status(lambda s: len(s["policies"]) == 2)
        assert sorted(p["name"] for p in status["policies"]) == ["lock", "more"]
        # the files read are the keys' symlinks, never the timestamped directories
        assert all(".." not in Path(p["file"]).name for p in status["policies"])

        write_configmap_version(policies, "2026_11_25_10_10_00.3", {
            "lock.yaml": deny_policy("lock", [p0])})  # "more" is deleted from the map
        lab.expect({p0}, "configmap key removed", since=time.monotonic())


def test_a_reload_that_changes_nothing_writes_nothing(lab: Lab) -> None:
    p0 = lab.ports[0]
    policies = policy_dir(lab, "noop")
    lock = policies / "lock.yaml"
    lock.write_text(deny_policy("lock", [p0]))
    with lab.daemon(policies, "noop") as guard:
        lab.expect({p0}, "start")
        before = guard.status()
        # Three comment lines on top: another revision (content hash), the same
        # entries; the rule moves from line 11 to line 14.
        lock.write_text(deny_policy("lock", [p0], header="# reviewed\n# again\n# and again\n"))
        status = reloads_after(guard, before["reloads"])
        last = status["last_reload"]
        assert last["ok"] and not last["changed"] and last["written"] == 0, last
        assert status["generation"] == before["generation"]  # read back from guard_config
        assert status["active_slot"] == before["active_slot"]
        assert status["revision"] != before["revision"]
        assert last["summary"].startswith("unchanged: "), last["summary"]
        [line] = lab.messages(lambda m: m.msgid == "reload" and m.procid == str(guard.proc.pid)
                              and m.fields.get("revision") == status["revision"])
        assert "unchanged" in line.msg and line.fields["changed"] == "0"
        lab.expect({p0}, "no-op")
        # events name the rule where it is now
        [deny] = lab.messages(lambda m: m.fields.get("kind") == "connect"
                              and m.fields.get("port") == str(p0)
                              and m.fields.get("location") == f"{lock}:14")
        assert deny.fields["rule"] == "lock/egress.rules[0]"

        # nothing changed at all: one more reload, nothing written
        guard.wait_reloaded(guard.sighup())
        again = guard.status()
        assert again["reloads"] == status["reloads"] + 1
        assert again["last_reload"]["reason"] == "SIGHUP"
        assert not again["last_reload"]["changed"] and again["last_reload"]["written"] == 0
        assert again["generation"] == before["generation"]
        assert again["revision"] == status["revision"]


def test_no_watch_reloads_on_sighup_only(lab: Lab) -> None:
    p0, p1 = lab.ports[:2]
    policies = policy_dir(lab, "nowatch")
    lock = policies / "lock.yaml"
    lock.write_text(deny_policy("lock", [p0]))
    with lab.daemon(policies, "nowatch", extra=("--no-watch",)) as guard:
        lab.expect({p0}, "start")
        assert not guard.status()["watch"]["enabled"]
        save_atomically(lock, deny_policy("lock", [p1]))
        time.sleep(1.5)  # well past the debounce: nothing may have happened
        assert lab.probe.verdicts()[p0] == EPERM and lab.probe.verdicts()[p1] == OK
        assert guard.status()["reloads"] == 0
        guard.wait_reloaded(guard.sighup())
        lab.expect({p1}, "SIGHUP")
        last = guard.status()["last_reload"]
        assert last["ok"] and last["changed"] and last["reason"] == "SIGHUP"


# --- broken sets -------------------------------------------------------------------------


def test_a_broken_policy_keeps_the_old_set_and_says_where(lab: Lab) -> None:
    p0, p1 = lab.ports[:2]
    policies = policy_dir(lab, "broken")
    lock = policies / "lock.yaml"
    lock.write_text(deny_policy("lock", [p0]))
    with lab.daemon(policies, "broken") as guard:
        lab.expect({p0}, "start")
        before = guard.status()

        # one bad key in the file in force, and a file of binary garbage beside it
        bad = deny_policy("lock", [p1]).replace("protocol: tcp}", "protocol: tcp, color: red}")
        lock.write_text(bad)
        (policies / "garbage.yaml").write_bytes(b"apiVersion: guard/v1\nkind: \xff\xfe\x00\x01")
        guard.wait_status(lambda s: s["last_reload_error"] is not None)
        # the old rules still decide
        assert lab.probe.verdicts()[p0] == EPERM and lab.probe.verdicts()[p1] == OK
        time.sleep(0.5)
        assert lab.probe.verdicts()[p0] == EPERM and lab.probe.verdicts()[p1] == OK
        assert guard.alive
        column = bad.splitlines()[10].index("color") + 1
        key_error = f"{lock}:11:{column}: error: unknown key 'color'"
        byte_error = f"{policies / 'garbage.yaml'}:2:7: error: not UTF-8 text"

        # the errors at the real rsyslogd, each with FILE:LINE:COL, at severity err
        for expected in (key_error, byte_error):
            [line] = lab.messages(lambda m, e=expected: m.msgid == "reload"  # type: ignore[misc]
                                  and m.msg.startswith(f"guard: {e}"))
            assert line.severity == 3 and line.procid == str(guard.proc.pid)
        [rejected] = lab.messages(lambda m: m.msgid == "reload" and "rejected" in m.msg
                                  and m.procid == str(guard.proc.pid))
        assert f"still enforcing revision {before['revision']}" in rejected.msg

        # guard status --json (the command) shows them
        shown = guard.status_cli()
        error = shown["last_reload_error"]
        assert not error["ok"] and error["reason"] == "watch"
        assert any(e.startswith(key_error) for e in error["errors"]), error
        assert any(e.startswith(byte_error) for e in error["errors"]), error
        assert shown["revision"] == before["revision"]
        assert shown["generation"] == before["generation"]
        text = subprocess.run([sys.executable, "-m", "guard", "status", "--state-dir",
                               str(guard.state_dir)], capture_output=True, text=True,
                              timeout=60, cwd=Path(__file__).resolve().parents[2])
        assert "last reload: REJECTED" in text.stdout and key_error in text.stdout

        # fixing it applies it, and the error is cleared
        (policies / "garbage.yaml").unlink()
        lock.write_text(deny_policy("lock", [p1]))
        since = time.monotonic()
        lab.expect({p1}, "fix after a broken edit", since=since)
        fixed = guard.wait_status(lambda s: s["last_reload_error"] is None)
        assert fixed["last_reload"]["ok"] and fixed["generation"] == before["generation"] + 1


def bad_states(lab: Lab, policies: Path, good_text: str
               ) -> list[tuple[str, Callable[[], None], Callable[[], None], str]]:
    """(what, break it, repair it, expected error text) for each way a directory goes bad."""
    parent = policies.parent
    moved = parent / f"{policies.name}.moved"

    def garbage() -> None:
        (policies / "random.yaml").write_bytes(bytes(range(256)) * 16)

    def fifo() -> None:
        os.mkfifo(policies / "pipe.yaml")

    def dangling() -> None:
        (policies / "dangling.yaml").symlink_to(policies / "nowhere.yaml")

    def unreadable() -> None:
        # root reads through any mode bits; a read of the reader's own address 0 fails (EIO)
        (policies / "unreadable.yaml").symlink_to("/proc/self/mem")

    def deep() -> None:
        (policies / "deep.yaml").write_text("[" * 100_000)

    def replace_with_file() -> None:
        policies.rename(moved)
        # a VALID policy where the directory was: reading it as a policy file would apply it
        policies.write_text(deny_policy("trap", lab.ports))

    def restore_directory() -> None:
        policies.unlink()
        moved.rename(policies)

    def remove() -> None:
        shutil.rmtree(policies)

    def recreate() -> None:
        fresh = parent / f"{policies.name}.fresh"
        fresh.mkdir()
        (fresh / "lock.yaml").write_text(good_text)
        fresh.rename(policies)

    def unlink(name: str) -> Callable[[], None]:
        return lambda: (policies / name).unlink()

    return [
        ("binary garbage", garbage, unlink("random.yaml"),
         "random.yaml:2:118: error: not UTF-8 text: byte 0x80"),
        ("a FIFO", fifo, unlink("pipe.yaml"), "pipe.yaml:1:1: error: not a regular file"),
        ("a dangling symlink", dangling, unlink("dangling.yaml"),
         "dangling.yaml:1:1: error: broken symbolic link"),
        ("an unreadable file", unreadable, unlink("unreadable.yaml"),
         "unreadable.yaml:1:1: error: cannot read"),
        ("nesting too deep", deep, unlink("deep.yaml"), "deep.yaml:1:"),
        ("the directory replaced by a file", replace_with_file, restore_directory,
         "error: the policy directory is not a directory"),
        ("the directory removed", remove, recreate,
         "error: the policy directory does not exist"),
    ]


def test_no_bad_directory_state_crashes_the_daemon_or_loosens_it(lab: Lab) -> None:
    p0, p1 = lab.ports[:2]
    base = lab.work / "bad"
    base.mkdir()
    policies = base / "policies"
    policies.mkdir()
    good = deny_policy("lock", [p0])
    (policies / "lock.yaml").write_text(good)
    with lab.daemon(policies, "bad") as guard:
        lab.expect({p0}, "start")
        for what, spoil, repair, expected in bad_states(lab, policies, good):
            before = guard.status()
            spoil()
            status = guard.wait_status(lambda s, b=before: s["reloads"] > b["reloads"]  # type: ignore[misc]
                                       and s["last_reload_error"] is not None)
            errors = status["last_reload_error"]["errors"]
            assert any(expected in e for e in errors), (what, errors)
            assert guard.alive, what
            # the set in force is untouched: same generation, same verdicts
            assert status["generation"] == before["generation"], what
            assert lab.probe.verdicts() == {p: (EPERM if p == p0 else OK) for p in lab.ports}
            lab.messages(lambda m, e=expected: m.msgid == "reload" and e in m.msg)  # type: ignore[misc]

            repair()
            since = time.monotonic()
            fixed = guard.wait_status(lambda s: s["last_reload_error"] is None
                                      and s["last_reload"]["ok"])
            lab.expect({p0}, f"repaired: {what}", since=since)
            assert guard.alive
            print(f"{what}: rejected ({expected}), repaired, reloads {fixed['reloads']}")
        # after all of it the watch still follows the (recreated) directory
        save_atomically(policies / "lock.yaml", deny_policy("lock", [p1]))
        lab.expect({p1}, "edit after the directory was recreated", since=time.monotonic())
        assert guard.status()["watch"]["rearms"] >= 2


# --- git ---------------------------------------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=guard test", "-c", "user.email=test@guard.invalid",
         "-c", "init.defaultBranch=main", "-c", "advice.detachedHead=false", *args],
        cwd=cwd, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


def test_git_checkout_is_one_reload_named_by_the_commit(lab: Lab) -> None:
    """Two commits that differ in twenty files (rewritten, added, removed): a checkout
    from one to the other is exactly one reload, and status names the commit."""
    p0, p1 = lab.ports[:2]
    repo = policy_dir(lab, "repo")
    git(repo, "init", "-q")
    (repo / "README.md").write_text("policies of the test\n")
    # never-contacted addresses: these policies only make the checkout big
    filler = "- {{action: deny, to: [192.0.2.{i}/32], ports: [{port}], protocol: tcp}}"

    def commit(lock_port: int, shift: int, names: range) -> str:
        for old in repo.glob("team-*.yaml"):
            old.unlink()
        for i in names:
            (repo / f"team-{i:02d}.yaml").write_text(
                deny_policy(f"team-{i:02d}", []).replace(
                    "rules: []", "rules:\n        " + filler.format(i=i, port=1000 + shift + i)))
        (repo / "lock.yaml").write_text(deny_policy("lock", [lock_port]))
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", f"lock {lock_port}")
        return git(repo, "rev-parse", "HEAD")

    first = commit(p0, 0, range(0, 20))
    second = commit(p1, 7, range(2, 22))  # 18 rewritten, 2 removed, 2 added, lock changed
    git(repo, "checkout", "-q", first)
    with lab.daemon(repo, "git") as guard:
        lab.expect({p0}, "start")
        status = guard.status()
        assert status["revision_detail"]["id"] == first and not status["revision_detail"]["dirty"]
        assert status["revision"] == f"git:{first[:12]}"

        for target, port in ((second, p1), (first, p0)):
            before = guard.status()["reloads"]
            since = time.monotonic()
            git(repo, "checkout", "-q", target)
            lab.expect({port}, "git checkout", since=since)
            time.sleep(1.5)  # longer than a burst can last: any second reload would be seen
            status = guard.status()
            assert status["reloads"] == before + 1, status["last_reload"]
            assert status["revision_detail"]["id"] == target
            assert not status["revision_detail"]["dirty"]
            assert status["last_reload"]["ok"] and status["last_reload"]["changed"]
            assert len(status["policies"]) == 21
            [line] = lab.messages(lambda m, t=target: m.msgid == "reload"  # type: ignore[misc]
                                  and m.procid == str(guard.proc.pid)
                                  and m.fields.get("revision") == f"git:{t[:12]}")
            assert "applied revision" in line.msg

        # an uncommitted edit: applied, and the revision says so
        save_atomically(repo / "lock.yaml", deny_policy("lock", [p1]))
        lab.expect({p1}, "edit in a git checkout", since=time.monotonic())
        status = guard.wait_status(lambda s: s["revision_detail"]["dirty"])
        assert status["revision"] == f"git:{first[:12]}+dirty"


# --- how fast --------------------------------------------------------------------------


def test_save_to_enforced_latency(lab: Lab) -> None:
    """Many saves (atomic rename, as editors do), each measured from the rename to the
    first connect() that gets the new verdict."""
    p0, p1 = lab.ports[:2]
    policies = policy_dir(lab, "latency")
    lock = policies / "lock.yaml"
    lock.write_text(deny_policy("lock", [p0]))
    edits = int(os.environ.get("GUARD_RELOAD_EDITS", "100"))
    with lab.daemon(policies, "latency") as guard:
        lab.expect({p0}, "start")
        seen: list[float] = []
        for i in range(edits):
            port = p1 if i % 2 == 0 else p0
            save_atomically(lock, deny_policy("lock", [port]))
            seen.append(lab.probe.wait_for(
                {p0: EPERM if port == p0 else OK, p1: EPERM if port == p1 else OK},
                timeout=BOUND_S, since=time.monotonic(), interval=0.002))
            time.sleep(0.05)
        status = guard.status()
        assert status["reloads"] >= edits and status["last_reload_error"] is None
    seen.sort()
    p99 = seen[min(len(seen) - 1, round(0.99 * (len(seen) - 1)))]
    print(f"save-to-enforced over {edits} saves: median {statistics.median(seen) * 1000:.0f} "
          f"ms, p99 {p99 * 1000:.0f} ms, max {seen[-1] * 1000:.0f} ms, "
          f"min {seen[0] * 1000:.0f} ms")
    assert statistics.median(seen) < 1.0
