"""Folding repeats, and counting what is lost.

``Folder`` folds identical records (same everything except time, tid and
count) inside a window into one line with ``count=N``, so a process retrying a
denied connect in a loop does not drown the operator. The reader runs it on the
records' bytes (``record_identity``): a repeat inside a window then costs a
slice and a dict lookup, and only the records that become lines are decoded,
enriched and formatted. ``Aggregator`` is the same folding over ``AuditEvent``
values, for callers that already hold events.

Nothing is dropped without a count: ``LossTracker`` turns the kernel's
GUARD_STAT_EVENTS_LOST counter (events the ring buffer could not take) and the
reader's own drops (records rejected, queue overflow) into ``kind=lost`` events
that travel the same stream as everything else.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from guard.events.records import KIND_LOST, LOST_KERNEL, LOST_QUEUE, AuditEvent, lost_event

# --- aggregation --------------------------------------------------------------


T = TypeVar("T")


@dataclass(slots=True)
class _Window(Generic[T]):
    closes_at: float
    repeats: int = 0  # events folded since the last line went out (sum of counts)
    last: T | None = None


@dataclass(frozen=True)
class AggregatorStats:
    seen: int  # events pushed (each counted by its own ``count``)
    emitted_lines: int  # lines that went out
    pending: int  # events counted in an open window, not yet in a line

    @property
    def aggregated(self) -> int:
        """Events that went out inside another event's line (seen = lines + these)."""
        return self.seen - self.pending - self.emitted_lines


class Folder(Generic[T]):
    """Folds identical items within ``window`` seconds into one line.

    The first item of a kind goes out at once (``add`` says so), so an operator
    sees an attack begin without delay. Identical items inside the window are
    only counted; when the window closes they go out as ONE line whose count is
    their sum (kernel-folded events add their own count), made from the last
    one (``closed``). If repeats went out, a new window opens for the same key,
    so a sustained flood costs one line per window rather than one per event; a
    window that closes with nothing folded ends the aggregation.

    The caller names each item's identity (``key``) and count, and turns an item
    and a count into a line; it calls ``closed`` before it adds what arrived
    after a window's end (the daemon does once per batch of records, so a window
    may take in a few milliseconds' more events than its second: counts stay
    exact). Pure apart from the injected clock; ``max_keys`` bounds memory: when
    that many distinct items are open, a new one goes out unaggregated (never
    lost).
    """

    def __init__(
        self,
        window: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 4096,
    ) -> None:
        if window < 0:
            raise ValueError("aggregation window must be >= 0 seconds")
        self.window = window
        self.clock = clock
        self.max_keys = max_keys if window > 0 else 0
        # Ordered by closing time: a window is appended when it opens and moved to
        # the end when it reopens, and every window is ``window`` long, so closed()
        # only looks at the front.
        self._open: OrderedDict[Hashable, _Window[T]] = OrderedDict()
        self.seen = 0
        self.emitted_lines = 0
        self._pending = 0

    def stats(self) -> AggregatorStats:
        return AggregatorStats(self.seen, self.emitted_lines, self._pending)

    def add(self, key: Hashable, item: T, count: int) -> bool:
        """Count one item; True when it must go out now, as a line of its own."""
        self.seen += count
        window = self._open.get(key)
        if window is not None:
            window.repeats += count
            window.last = item
            self._pending += count
            return False
        if len(self._open) < self.max_keys:
            self._open[key] = _Window(self.clock() + self.window)
        self.emitted_lines += 1
        return True

    def closed(self, force: bool = False) -> list[tuple[T, int]]:
        """The lines of the windows that have closed (all of them with ``force``):
        the last item folded in each, and how many events the line stands for."""
        out: list[tuple[T, int]] = []
        if not self._open:
            return out
        now = self.clock()
        reopened: list[tuple[Hashable, _Window[T]]] = []
        while self._open:
            key, window = next(iter(self._open.items()))
            if not force and window.closes_at > now:
                break
            del self._open[key]
            if window.repeats and window.last is not None:
                out.append((window.last, window.repeats))
                self._pending -= window.repeats
                if not force:
                    window.repeats, window.last = 0, None
                    window.closes_at = now + self.window
                    reopened.append((key, window))
        self._open.update(reopened)  # at the end: they close last
        self.emitted_lines += len(out)
        return out

    def next_deadline(self) -> float | None:
        """Clock time when the earliest open window closes."""
        for window in self._open.values():
            return window.closes_at
        return None

    @property
    def pending(self) -> int:
        """Events counted but not yet sent in a line."""
        return self._pending


class Aggregator(Folder[AuditEvent]):
    """``Folder`` over AuditEvents, keyed by ``AuditEvent.identity``: events in,
    lines out (a folded line is the last event with the window's count, stamped
    with its time). Lost-event reports are never folded."""

    def push(self, event: AuditEvent) -> list[AuditEvent]:
        """Take one event; return what must go out now (closed windows first)."""
        out = self.flush()
        if event.kind == KIND_LOST:
            self.seen += event.count
            self.emitted_lines += 1
            out.append(event)
        elif self.add(event.identity(), event, event.count):
            out.append(event)
        return out

    def flush(self, force: bool = False) -> list[AuditEvent]:
        """Lines of the windows that have closed (all of them with ``force``)."""
        return [last._replace(count=n) for last, n in self.closed(force)]


# --- loss accounting ----------------------------------------------------------


class LossTracker:
    """Turns lost-event counters into ``kind=lost`` events, each loss reported once.

    The kernel's counter is cumulative over the map's life. The maps are created
    by this daemon's loader, so the count starts at 0 with us and the first
    reading is reported in full; a daemon that adopts pinned maps (a later
    issue) passes the count the previous daemon reported as ``kernel_baseline``.
    """

    def __init__(self, kernel_baseline: int = 0) -> None:
        self._kernel_seen = kernel_baseline
        self.kernel_lost = 0  # reported so far
        self.reader_lost = 0  # counted by the reader: malformed records, queue overflow
        self._reader_reported = 0

    def kernel_reading(self, total: int, time_ns: int | None = None) -> AuditEvent | None:
        previous = self._kernel_seen
        self._kernel_seen = total
        if total <= previous:
            return None
        self.kernel_lost += total - previous
        return lost_event(total - previous, LOST_KERNEL, time_ns)

    def reader_dropped(self, n: int = 1) -> None:
        self.reader_lost += n

    def reader_report(self, time_ns: int | None = None) -> AuditEvent | None:
        new = self.reader_lost - self._reader_reported
        if new <= 0:
            return None
        self._reader_reported = self.reader_lost
        return lost_event(new, LOST_QUEUE, time_ns)
