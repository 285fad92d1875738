"""The watcher turns bursts of filesystem changes into single reloads."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from guard.watch import Debouncer, PolicyWatcher, is_relevant


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
