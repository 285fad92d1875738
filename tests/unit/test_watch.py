"""The watcher turns bursts of filesystem changes into single reloads."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from guard.service.watch import Debouncer, PolicyWatcher, is_relevant


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_becomes_one_reload_after_quiet() -> None:
    clock = FakeClock()
    d = Debouncer(quiet=0.2, max_wait=1.0, clock=clock)
    assert not d.due()
    for _ in range(20):  # a git checkout rewriting twenty files
        d.notice()
        clock.now += 0.01
    assert not d.due()
    clock.now += 0.2
    assert d.due()
    assert not d.due()  # once per burst


def test_a_never_ending_burst_still_reloads_at_max_wait() -> None:
    clock = FakeClock()
    d = Debouncer(quiet=0.2, max_wait=0.5, clock=clock)
    fired = 0
    for _ in range(100):
        d.notice()
        clock.now += 0.1
        fired += d.due()
    # 10 s of constant churn, one reload at least every max_wait (+ one step)
    assert 10 * 0.5 / 0.6 <= fired <= 10 / 0.5


def test_relevance() -> None:
    root = Path("/p")
    assert is_relevant("/p/web.yaml", root)
    assert is_relevant("/p/..data", root)  # ConfigMap symlink swap
    assert is_relevant("/p/sub/x.yml", root)
    assert not is_relevant("/p/.git/index", root)
    assert not is_relevant("/p/.web.yaml.swp", root)
    assert not is_relevant("/p/web.yaml~", root)
    assert not is_relevant("/p/.#web.yaml", root)


def _watch(directory: Path) -> tuple[PolicyWatcher, list[float]]:
    fired: list[float] = []
    lock = threading.Lock()

    def on_burst() -> None:
        with lock:
            fired.append(time.monotonic())

    watcher = PolicyWatcher(directory, on_burst, Debouncer(quiet=0.1, max_wait=0.5))
    watcher.start()
    return watcher, fired


def _wait_for(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_many_writes_make_one_burst(tmp_path: Path) -> None:
    watcher, fired = _watch(tmp_path)
    try:
        for i in range(20):
            (tmp_path / f"p{i}.yaml").write_text("x: 1\n")
        assert _wait_for(lambda: len(fired) >= 1)
        time.sleep(0.4)
        assert len(fired) == 1
    finally:
        watcher.stop()


def test_atomic_save_and_remove_are_seen(tmp_path: Path) -> None:
    target = tmp_path / "web.yaml"
    target.write_text("a: 1\n")
    watcher, fired = _watch(tmp_path)
    try:
        tmp = tmp_path / ".web.yaml.tmp123"
        tmp.write_text("a: 2\n")
        os.replace(tmp, target)
        assert _wait_for(lambda: len(fired) == 1)
        target.unlink()
        assert _wait_for(lambda: len(fired) == 2)
    finally:
        watcher.stop()


def test_configmap_symlink_swap_is_seen(tmp_path: Path) -> None:
    v1 = tmp_path / "..2026_01"
    v1.mkdir()
    (v1 / "web.yaml").write_text("a: 1\n")
    (tmp_path / "..data").symlink_to(v1.name)
    (tmp_path / "web.yaml").symlink_to("..data/web.yaml")
    watcher, fired = _watch(tmp_path)
    try:
        v2 = tmp_path / "..2026_02"
        v2.mkdir()
        (v2 / "web.yaml").write_text("a: 2\n")
        (tmp_path / "..data_tmp").symlink_to(v2.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        assert _wait_for(lambda: len(fired) >= 1)
        assert (tmp_path / "web.yaml").read_text() == "a: 2\n"
    finally:
        watcher.stop()


def test_git_metadata_alone_does_not_reload(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    watcher, fired = _watch(tmp_path)
    try:
        for i in range(5):
            (tmp_path / ".git" / f"obj{i}").write_text("x")
        time.sleep(0.6)
        assert fired == []
    finally:
        watcher.stop()


def test_relevance_follows_what_the_parser_reads() -> None:
    root = Path("/p")
    assert is_relevant("/p/team", root, is_directory=True)  # a directory of policies
    assert is_relevant("/p", root, is_directory=True)  # the directory itself
    assert is_relevant("/p/..2026_01_01/web.yaml", root)  # ConfigMap payload
    assert not is_relevant("/p/README.md", root)
    assert not is_relevant("/p/notes.txt", root)
    assert not is_relevant("/p/.hidden/web.yaml", root)  # the parser skips hidden dirs
    assert not is_relevant("/p/.web.yaml", root)
    assert not is_relevant("/p/web.yaml.lock", root)
    # inside .git: only what names the checked-out commit
    assert is_relevant("/p/.git/HEAD", root)
    assert is_relevant("/p/.git/refs/heads/main", root)
    assert is_relevant("/p/.git/packed-refs", root)
    assert not is_relevant("/p/.git/HEAD.lock", root)
    assert not is_relevant("/p/.git/refs/heads/main.lock", root)
    assert not is_relevant("/p/.git/logs/HEAD", root)
    assert not is_relevant("/p/.git/FETCH_HEAD", root)
    assert not is_relevant("/p/.git/refs/remotes/origin/main", root)


def test_editor_droppings_at_the_top_do_not_reload(tmp_path: Path) -> None:
    watcher, fired = _watch(tmp_path)
    try:
        for name in (".web.yaml.swp", "web.yaml~", ".#web.yaml", "README.md"):
            (tmp_path / name).write_text("x")
        time.sleep(0.6)
        assert fired == []
        (tmp_path / "web.yaml").write_text("x")
        assert _wait_for(lambda: len(fired) == 1)
    finally:
        watcher.stop()


def test_a_removed_and_recreated_directory_is_watched_again(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "a.yaml").write_text("a: 1\n")
    watcher, fired = _watch(policies)
    try:
        for path in (policies / "a.yaml", policies):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
        assert _wait_for(lambda: len(fired) >= 1)
        policies.mkdir()
        assert _wait_for(lambda: len(fired) >= 2)
        count = len(fired)
        time.sleep(0.3)
        # the new directory's contents are seen, by the watch moved onto it
        (policies / "b.yaml").write_text("b: 1\n")
        assert _wait_for(lambda: len(fired) > count)
        assert watcher.rearms >= 1
    finally:
        watcher.stop()


def test_a_directory_renamed_over_is_watched_again(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    watcher, fired = _watch(policies)
    try:
        fresh = tmp_path / "policies.new"
        fresh.mkdir()
        (fresh / "a.yaml").write_text("a: 1\n")
        old = tmp_path / "policies.old"
        policies.rename(old)
        fresh.rename(policies)
        assert _wait_for(lambda: len(fired) >= 1)
        time.sleep(0.3)
        count = len(fired)
        (old / "ignored.yaml").write_text("the old directory is not ours any more")
        time.sleep(0.5)
        assert len(fired) == count
        (policies / "b.yaml").write_text("b: 1\n")
        assert _wait_for(lambda: len(fired) > count)
    finally:
        watcher.stop()


def test_a_symlinked_directory_follows_its_target(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    link = tmp_path / "policies"
    link.symlink_to(v1.name)
    watcher, fired = _watch(link)
    try:
        (v1 / "a.yaml").write_text("a: 1\n")  # seen through the link
        assert _wait_for(lambda: len(fired) == 1)
        tmp_link = tmp_path / "policies.tmp"
        tmp_link.symlink_to(v2.name)
        os.replace(tmp_link, link)  # re-point the link
        assert _wait_for(lambda: len(fired) == 2)
        time.sleep(0.3)
        (v2 / "b.yaml").write_text("b: 1\n")
        assert _wait_for(lambda: len(fired) == 3)
    finally:
        watcher.stop()


def test_a_git_operation_in_progress_holds_the_burst(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    lock = tmp_path / ".git" / "index.lock"
    fired: list[float] = []
    watcher = PolicyWatcher(tmp_path, lambda: fired.append(time.monotonic()),
                            Debouncer(quiet=0.1, max_wait=0.3), busy_max=5.0)
    watcher.start()
    try:
        lock.write_text("")
        (tmp_path / "a.yaml").write_text("a: 1\n")
        time.sleep(1.0)  # well past max_wait: still held while git works
        assert fired == []
        released = time.monotonic()
        lock.unlink()
        assert _wait_for(lambda: len(fired) == 1)
        assert fired[0] - released < 0.5
    finally:
        watcher.stop()


def test_a_stale_git_lock_delays_but_does_not_block(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "index.lock").write_text("")
    fired: list[float] = []
    watcher = PolicyWatcher(tmp_path, lambda: fired.append(time.monotonic()),
                            Debouncer(quiet=0.1, max_wait=0.3), busy_max=0.5)
    watcher.start()
    try:
        (tmp_path / "a.yaml").write_text("a: 1\n")
        assert _wait_for(lambda: len(fired) == 1, timeout=3.0)
    finally:
        watcher.stop()


def test_a_file_moved_out_does_not_delay_later_changes(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "a.yaml").write_text("a: 1\n")
    watcher, fired = _watch(policies)  # quiet 0.1
    try:
        time.sleep(0.2)
        start = time.monotonic()
        (policies / "a.yaml").rename(tmp_path / "a.yaml")  # no IN_MOVED_TO in the tree
        assert _wait_for(lambda: len(fired) == 1)
        # watchdog alone would hold this burst back 0.5 s waiting for a pair
        assert fired[0] - start < 0.4, fired[0] - start
    finally:
        watcher.stop()
