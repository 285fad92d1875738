"""Watch the policy directory and ask for one reload per burst of changes.

A ``git pull`` rewrites many files in a few milliseconds; an editor saves by
writing a temporary file and renaming it over the old one; a Kubernetes
ConfigMap volume swaps a ``..data`` symlink. All of these are bursts of
filesystem events that must become *one* reload of a consistent set, so the
watcher only says "something changed" and the ``Debouncer`` decides when the
burst is over: after ``quiet`` seconds without events, or ``max_wait`` seconds
after the first one, whichever comes first (so a directory that never stops
changing is still reloaded).

The reload itself re-reads the whole directory and compares it with what is
applied, so a spurious trigger costs a parse and changes nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

IGNORED_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__"})
IGNORED_SUFFIXES = (".swp", ".swx", ".swo", "~", ".tmp", ".bak")
IGNORED_PREFIXES = (".#",)


def is_relevant(path: str, root: Path) -> bool:
    """Could a change at ``path`` change the policy set under ``root``?

    Version-control metadata and editor droppings are not; everything else is,
    including dot-names such as ConfigMap's ``..data`` symlink, whose swap is the
    only event a ConfigMap update produces at the top level.
    """
    try:
        relative = PurePath(path).relative_to(root)
    except ValueError:
        relative = PurePath(path)
    parts = relative.parts
    if any(part in IGNORED_DIRS for part in parts):
        return False
    name = parts[-1] if parts else ""
    return not (name.endswith(IGNORED_SUFFIXES) or name.startswith(IGNORED_PREFIXES))


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
    ) -> None:
        self.directory = directory
        self.on_burst = on_burst
        self.debouncer = debouncer or Debouncer()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._observer: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return
                paths = [str(event.src_path), str(getattr(event, "dest_path", "") or "")]
                if any(p and is_relevant(p, watcher.directory) for p in paths):
                    watcher.notice()

        # Watch the directory's real location: if the configured path is itself
        # a symlink that gets swapped, the parent sees the swap.
        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.directory), recursive=True)
        parent = self.directory.parent
        if self.directory.is_symlink() and parent != self.directory:
            self._observer.schedule(Handler(), str(parent), recursive=False)
        self._observer.daemon = True
        self._observer.start()
        self._thread = threading.Thread(target=self._run, name="guard-watch", daemon=True)
        self._thread.start()

    def notice(self) -> None:
        with self._lock:
            self.debouncer.notice()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                wait = self.debouncer.seconds_until_due()
            self._wake.wait(timeout=wait if wait is not None else 1.0)
            self._wake.clear()
            with self._lock:
                fire = self.debouncer.due()
            if fire and not self._stop.is_set():
                self.on_burst()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
