"""Watch the policy directory and ask for one reload per burst of changes.

A ``git pull`` rewrites many files in a few milliseconds; an editor saves by
writing a temporary file and renaming it over the old one; a Kubernetes
ConfigMap volume swaps a ``..data`` symlink. All of these are bursts of
filesystem events that must become *one* reload of a consistent set, so the
watcher only says "something changed" and the ``Debouncer`` decides when the
burst is over: after ``quiet`` seconds without events, or ``max_wait`` seconds
after the first one, whichever comes first (so a directory that never stops
changing is still reloaded).

Two more things keep a burst whole:

- a git operation in progress (``.git/index.lock`` exists in the watched
  directory) keeps the burst open, up to ``busy_max`` seconds, so a slow
  checkout is read once it is finished, not halfway;
- the commit git records last (``.git/HEAD``, ``refs/heads/*``,
  ``packed-refs``) counts as a change, so a checkout's burst ends after HEAD
  moved and the reload names the new commit, not the old one plus "dirty".

The directory itself may go away and come back (``rm -r`` and a fresh clone, a
directory renamed over, a symlinked directory re-pointed). inotify watches an
inode, not a name, so the watcher also watches the parent's entry of that name
and re-checks the directory's identity every ``rearm_every`` seconds; when it
changed, the recursive watch is moved to the new directory and a reload is
asked for.

The reload itself re-reads the whole directory and compares it with what is
applied, so a spurious trigger costs a parse and changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from guard.policy.parse import EDITOR_DROPPINGS, POLICY_SUFFIXES

log = logging.getLogger(__name__)

IGNORED_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__"})
IGNORED_SUFFIXES = (*EDITOR_DROPPINGS, ".tmp", ".bak", ".lock")
IGNORED_PREFIXES = (".#",)
REARM_EVERY_S = 1.0
BUSY_MAX_S = 5.0


def _names_commit(inside_git: tuple[str, ...]) -> bool:
    """Is this path below ``.git`` one that names the checked-out commit?"""
    if not inside_git or inside_git[-1].endswith(".lock"):
        return False
    return inside_git in (("HEAD",), ("packed-refs",)) or inside_git[:2] == ("refs", "heads")


def is_relevant(path: str, root: Path, is_directory: bool = False) -> bool:
    """Could a change at ``path`` change the policy set under ``root`` (or its revision)?

    Relevant: policy files (the names the parser reads), directories (a
    directory of policies added, removed or renamed), ConfigMap's ``..``
    names (its ``..data`` symlink swap is the only event an update makes at
    the top level) and the git files naming the commit. Not relevant: the
    rest of ``.git``, editor droppings, hidden directories, README and other
    files the parser never reads.
    """
    try:
        relative = PurePath(path).relative_to(root)
    except ValueError:
        relative = PurePath(path)
    parts = relative.parts
    if not parts or relative.is_absolute():
        return True  # the watched directory itself (or a path we cannot place)
    if parts[0] == ".git":
        return _names_commit(parts[1:])
    *dirs, name = parts
    if any(d in IGNORED_DIRS or (d.startswith(".") and not d.startswith("..")) for d in dirs):
        return False
    if name.startswith(".."):
        return True  # ConfigMap: ..data, ..data_tmp, ..2026_01_01_...
    if name.startswith(IGNORED_PREFIXES) or name.endswith(IGNORED_SUFFIXES):
        return False
    if name.startswith((".", "#")) or name in IGNORED_DIRS:
        return False
    return is_directory or name.endswith(POLICY_SUFFIXES)


def git_busy(directory: Path) -> bool:
    """A git command is changing the work tree in ``directory`` right now."""
    return (directory / ".git" / "index.lock").exists()


@dataclass
class Debouncer:
    """Turns a stream of change notices into reload times. Clock injected for tests."""

    quiet: float = 0.15
    max_wait: float = 0.6
    clock: Callable[[], float] = time.monotonic
    _first: float | None = field(default=None, init=False)
    _last: float | None = field(default=None, init=False)

    def notice(self) -> None:
        now = self.clock()
        if self._first is None:
            self._first = now
        self._last = now

    def due(self) -> bool:
        """True once when a pending burst is over; resets for the next burst."""
        if self._first is None or self._last is None:
            return False
        now = self.clock()
        if now - self._last >= self.quiet or now - self._first >= self.max_wait:
            self._first = self._last = None
            return True
        return False

    def seconds_until_due(self) -> float | None:
        if self._first is None or self._last is None:
            return None
        now = self.clock()
        return max(0.0, min(self._last + self.quiet, self._first + self.max_wait) - now)


Identity = tuple[str, int, int]  # (real path, st_dev, st_ino) of a directory


def directory_identity(path: Path) -> Identity | None:
    """What the name ``path`` stands for now: None when it is not a directory."""
    try:
        real = os.path.realpath(path)
        info = os.stat(real)
    except (OSError, ValueError):
        return None
    if not stat.S_ISDIR(info.st_mode):
        return None
    return real, info.st_dev, info.st_ino


def _no_move_pairing_delay() -> None:
    """Stop watchdog holding events back to pair moves.

    watchdog's inotify backend keeps an IN_MOVED_FROM for 0.5 s hoping to pair
    it with its IN_MOVED_TO, and its queue is first-in first-out: after a file
    is moved *out* of the tree (no IN_MOVED_TO ever comes), every later event
    waits those 0.5 s too (measured: an edit right after ``mv web.yaml /tmp``
    arrived 506 ms late). The watcher judges each path on its own and never
    needs a pair, so the delay only costs latency. With no delay a move whose
    two halves are both queued is still paired; otherwise it arrives as a
    deletion and a creation, which are just as relevant. (A class attribute:
    this process has no other watchdog user.)
    """
    try:
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
    except ImportError:  # another watchdog version or backend: keep its behaviour
        return
    if hasattr(InotifyMoveEventGrouper, "delay"):
        InotifyMoveEventGrouper.delay = 0


class PolicyWatcher:
    """Calls ``on_burst`` (from its own thread) once per settled burst of changes.

    The callback should only signal the daemon's main loop (set an event, write
    a pipe): the reload runs there, so a reload never races another one.
    """

    def __init__(
        self,
        directory: Path,
        on_burst: Callable[[], None],
        debouncer: Debouncer | None = None,
        *,
        rearm_every: float = REARM_EVERY_S,
        busy: Callable[[], bool] | None = None,
        busy_max: float = BUSY_MAX_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.on_burst = on_burst
        self.debouncer = debouncer or Debouncer()
        self.rearm_every = rearm_every
        self.busy = busy if busy is not None else (lambda: git_busy(self.directory))
        self.busy_max = busy_max
        self.clock = clock
        self.bursts = 0  # on_burst calls so far
        self.rearms = 0  # times the recursive watch moved to another directory
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._check = False  # the parent saw our name change: re-check the identity now
        self._observer: Any = None
        self._thread: threading.Thread | None = None
        self._tree: tuple[Identity | None, Any] = (None, None)  # identity, watch
        self._parent: tuple[Identity | None, Any] = (None, None)
        self._busy_since: float | None = None

    # -- watches ---------------------------------------------------------------------

    def _handler(self, root: Path, only_name: str | None = None) -> Any:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return
                paths = [os.fsdecode(event.src_path),
                         os.fsdecode(getattr(event, "dest_path", "") or "")]
                if only_name is not None:
                    # the parent directory: only our own entry matters
                    if any(p and os.path.basename(p) == only_name for p in paths):
                        watcher.notice(check=True)
                    return
                if event.is_directory and event.event_type == "modified":
                    # "an entry changed": the entry's own event says whether it matters
                    return
                if event.event_type == "deleted" and paths[0] == str(root):
                    watcher.notice(check=True)  # our directory is gone: re-arm
                    return
                if any(p and is_relevant(p, root, event.is_directory) for p in paths):
                    watcher.notice()

        return Handler()

    def _schedule(self, path: str, recursive: bool, only_name: str | None) -> Any:
        try:
            return self._observer.schedule(self._handler(Path(path), only_name), path,
                                           recursive=recursive)
        except OSError as error:
            # ENOENT (raced a removal), ENOSPC (inotify limits): tried again at
            # the next re-check; SIGHUP still reloads meanwhile
            log.warning("cannot watch %s: %s", path, error)
            return None

    def _unschedule(self, watch: Any) -> None:
        if watch is not None:
            with contextlib.suppress(KeyError, ValueError, RuntimeError, OSError):
                self._observer.unschedule(watch)

    def rearm(self, force: bool = False) -> bool:
        """Point the watches at what the names stand for now; True when that changed.

        ``force``: schedule the recursive watch again even when the identity
        looks the same (a removed directory's inode number can be reused by
        the one that replaces it, and the old watch died with the old one).
        """
        moved = False
        parent = self.directory.parent
        parent_id = directory_identity(parent)
        old_id, old_watch = self._parent
        if parent_id != old_id or (parent_id is not None and old_watch is None):
            self._unschedule(old_watch)
            watch = None
            if parent_id is not None and parent != self.directory:
                watch = self._schedule(parent_id[0], False, self.directory.name)
            self._parent = (parent_id, watch)
        tree_id = directory_identity(self.directory)
        old_id, old_watch = self._tree
        if force or tree_id != old_id or (tree_id is not None and old_watch is None):
            self._unschedule(old_watch)
            watch = self._schedule(tree_id[0], True, None) if tree_id is not None else None
            moved = force or tree_id != old_id
            self._tree = (tree_id, watch)
            if moved:
                self.rearms += 1
        return moved

    # -- life ------------------------------------------------------------------------

    def start(self) -> None:
        from watchdog.observers import Observer

        _no_move_pairing_delay()
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.start()
        self.rearm()
        self.rearms = 0  # the first arming is not a move
        self._thread = threading.Thread(target=self._run, name="guard-watch", daemon=True)
        self._thread.start()

    def notice(self, check: bool = False) -> None:
        with self._lock:
            self.debouncer.notice()
            if check:
                self._check = True
        self._wake.set()

    def _run(self) -> None:
        next_rearm = self.clock() + self.rearm_every
        while not self._stop.is_set():
            with self._lock:
                wait = self.debouncer.seconds_until_due()
            until_rearm = max(0.0, next_rearm - self.clock())
            self._wake.wait(timeout=until_rearm if wait is None else min(wait, until_rearm))
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                check, self._check = self._check, False
            if check or self.clock() >= next_rearm:
                next_rearm = self.clock() + self.rearm_every
                try:
                    moved = self.rearm(force=check)
                except Exception as error:  # never let the thread die: SIGHUP must not be
                    log.warning("re-checking the policy directory failed: %s", error)
                    moved = False
                if moved:
                    self.notice()
            self._maybe_fire()

    def _maybe_fire(self) -> None:
        with self._lock:
            fire = self.debouncer.due()
            if fire and self._held_by_git():
                self.debouncer.notice()  # keep the burst open; look again after `quiet`
                fire = False
        if fire and not self._stop.is_set():
            self.bursts += 1
            try:
                self.on_burst()
            except Exception as error:
                log.warning("reload request failed: %s", error)

    def _held_by_git(self) -> bool:
        try:
            busy = self.busy()
        except OSError:
            busy = False
        now = self.clock()
        if not busy:
            self._busy_since = None
            return False
        if self._busy_since is None:
            self._busy_since = now
        if now - self._busy_since >= self.busy_max:
            self._busy_since = None  # a stale lock: reload anyway, and wait again next time
            return False
        return True

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
