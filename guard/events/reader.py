"""The reader: kernel records from the ring buffer to lines in the sink.

One ``EventReader`` per daemon, driven by the daemon's loop (guard.service.daemon)
one round at a time (``round``), from one thread:

    ring buffer --(bcc callback: copy, queue)--> record queue
        --(fold on the bytes: guard.events.fold.Folder)--> a line per window
        --(decode, enrich, format)--> the sink's queue --> the syslog target

A round takes at most RECORD_BATCH records and drains the ring buffer before
each, so a flood neither overflows the ring while a backlog is worked off nor
keeps signals, reloads and status waiting; a round that follows a busy one
waits GATHER_S first (``gather``), so a stream of events costs one round per
millisecond, not one per event; while the syslog target is full it makes no
more lines (the records wait in the queue, counted if it overflows). Only the
records that become lines are decoded, enriched and formatted.

Nothing is dropped without a count: records the queue cannot take, records
shorter than ``struct guard_event``, and the kernel's own lost counter all
become ``kind=lost`` lines (guard.events.fold.LossTracker).
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from guard.events.enrich import Enricher
from guard.events.fold import Folder, LossTracker
from guard.events.records import EVENT_SIZE, AuditEvent, decode, record_count, record_identity
from guard.events.transports import Sink

RECORD_QUEUE_MAX = 65_536  # records taken from the ring buffer and not yet processed
RECORD_BATCH = 512  # records one round takes (a few ms of work at most)
GATHER_S = 0.001  # a busy ring buffer is read at most this often (``gather``)
CONGESTED_READ_S = 0.005  # ... and at least this often while the syslog target is full
LOST_CHECK_S = 1.0  # the kernel's lost counter is read this often
MAX_WAIT_S = 1.0
ACTORS_MAX = 4096  # windows whose first line's process is remembered


class EventReader:
    """The record queue, the fold, and the counters ``guard status`` shows."""

    def __init__(self, sink: Sink, *, aggregate_window: float = 1.0) -> None:
        self.sink = sink
        # folds records on their bytes before anything else is done with them
        self.folder: Folder[bytes] = Folder(window=aggregate_window)
        self.losses = LossTracker()
        self.enricher: Enricher | None = None
        self.records: deque[bytes] = deque()
        self.received = 0
        self.malformed = 0
        self.dropped = 0
        self.lines = 0
        self.rule_hits: dict[str, int] = {}  # rule label -> reported decisions
        # (policy, rule label, action, kind) -> events sent (the metrics endpoint)
        self.event_counts: dict[tuple[str, str, str, str], int] = {}
        # fold key -> (ppid, exe) of the window's first line (``_same_actor``)
        self._actors: dict[Hashable, tuple[int, str]] = {}
        # also given every event sent (guard events, the live tail); must not block
        self.tap: Callable[[AuditEvent], None] | None = None
        self.last_busy = 0.0  # monotonic time of the last round that read or sent
        self.next_lost_check = 0.0

    # -- in: the ring buffer ---------------------------------------------------------

    def on_record(self, _ctx: Any, data: Any, size: int) -> int:
        """Called by bcc from inside ring_buffer_consume: copy and return, never raise."""
        if len(self.records) >= RECORD_QUEUE_MAX:
            self.dropped += 1
            self.losses.reader_dropped()
            return 0
        self.records.append(ctypes.string_at(data, size))
        return 0

    # -- one round ---------------------------------------------------------------------

    def round(self, consume: Callable[[], object] | None,
              kernel_lost: Callable[[], int | None]) -> int:
        """Take records (``consume`` drains the ring buffer into the queue), send
        lines, report losses, deliver. The kernel's lost counter when it was read
        and moved on (for the caller to record), else -1."""
        delivered, taken = self.sink.delivered, self.received
        if self.congested():
            self.sink.pump()  # woken because the target has room again, or by a timer
        if consume is not None:
            # also while congested: the record queue absorbs a burst the target
            # cannot take yet, where the ring buffer would overflow
            consume()
        self.send_closed()
        self.process(self.batch_limit())
        reported = -1
        now = time.monotonic()
        if now >= self.next_lost_check:
            self.next_lost_check = now + LOST_CHECK_S
            reported = self.check_losses(kernel_lost())
        self.sink.pump()
        if self.received != taken or self.sink.delivered != delivered:
            self.last_busy = now
        return reported

    def gather(self, timeout_ms: int) -> int:
        """The poll timeout after sleeping out the rest of GATHER_S since the
        last busy round, if there was one: a stream of events then gathers in
        the ring buffer (and room in a syslog socket that was full), so a
        round's fixed cost (waking up, the ring buffer's library call, a send
        and the receiver's wake-up) is paid per few dozen records or lines, not
        per one. The first record after a quiet spell wakes the loop at once; a
        backlog of records, or a congested target (it gets every free slot as
        soon as there is one), is never waited for."""
        if timeout_ms == 0 or self.congested():
            return timeout_ms
        wait = self.last_busy + GATHER_S - time.monotonic()
        if wait <= 0:
            return timeout_ms
        time.sleep(wait)
        return 0

    def wait_ms(self) -> int:
        """How long the loop may wait for the ring buffer before the next round."""
        if self.records and self.batch_limit() > 0:
            return 0  # a backlog to work off: no waiting
        now = time.monotonic()
        # congested, the ring buffer's fd is not polled; it is read this often
        deadlines = [now + (CONGESTED_READ_S if self.congested() else MAX_WAIT_S),
                     self.next_lost_check]
        flush_at = self.folder.next_deadline()
        if flush_at is not None:
            deadlines.append(flush_at)
        retry = self.sink.retry_in()
        if retry is not None:
            deadlines.append(now + retry)
        return max(0, int((min(deadlines) - now) * 1000) + 1)

    def congested(self) -> bool:
        """The syslog target is connected but full with a quarter of the queue
        waiting: making more lines now would only fill the queue, and take CPU
        from the receiver. The loop then makes no lines until the target has
        room (POLLOUT on its socket); it reads the ring buffer every
        CONGESTED_READ_S into the record queue, which absorbs the burst (what
        overflows it is counted). (A target that is down does not stop the
        records: they are still folded, and what does not fit in the syslog
        queue is counted.)"""
        return self.sink.congested(max(1, self.sink.queue_size // 4))

    def batch_limit(self) -> int:
        """Records the next round takes: RECORD_BATCH, none while the target is
        congested, and while it is connected no more than the syslog queue has
        room for (a record makes at most one line), so a burst waits as records
        rather than overflowing the queue a connected target is emptying."""
        if self.congested():
            return 0
        room = self.sink.room()
        return RECORD_BATCH if room is None else min(RECORD_BATCH, room)

    # -- records to lines ------------------------------------------------------------

    def process(self, limit: int | None = None) -> None:
        """Fold up to ``limit`` queued records (all without); a record that opens
        a window, or fits none, becomes a line at once."""
        records, folder = self.records, self.folder
        n = len(records) if limit is None else min(limit, len(records))
        if n == 0:
            return
        enricher = self.enricher
        assert enricher is not None
        self.received += n
        for _ in range(n):
            data = records.popleft()
            if len(data) < EVENT_SIZE:  # not ours; never read past its end
                self.malformed += 1
                self.losses.reader_dropped()
                continue
            if folder.add(record_identity(data), data, record_count(data)):
                self._send_record(data, 0, enricher)

    def send_closed(self, force: bool = False) -> None:
        """The lines of the windows that closed (all of them with ``force``)."""
        closed = self.folder.closed(force)
        if closed:
            assert self.enricher is not None
            for data, count in closed:
                self._send_record(data, count, self.enricher)

    def _send_record(self, data: bytes, count: int, enricher: Enricher) -> None:
        """One record as one line; ``count``: the events the line stands for
        (0: the record's own)."""
        raw = decode(data)
        if count:
            raw = raw._replace(count=count)
        event = enricher.enrich(raw)
        event = self._same_actor(record_identity(data), event, count)
        if event.rule:  # hits as reported in lines: a window's count when it closes
            self.rule_hits[event.rule] = self.rule_hits.get(event.rule, 0) + event.count
        self.send(event)

    def _same_actor(self, key: Hashable, event: AuditEvent, count: int) -> AuditEvent:
        """A window's count=N line, made when the window closes, names the process
        as its first line did: by then the process may have exited, and /proc no
        longer gives its ppid and executable."""
        actors = self._actors
        if not count:
            if event.ppid or event.exe:
                actors.pop(key, None)
                actors[key] = (event.ppid, event.exe)
                if len(actors) > ACTORS_MAX:
                    del actors[next(iter(actors))]
            return event
        known = actors.get(key)
        if known is None or (event.ppid and event.exe):
            return event
        return event._replace(ppid=event.ppid or known[0], exe=event.exe or known[1])

    def send(self, event: AuditEvent) -> None:
        """Queue the line; the loop delivers it before it waits again."""
        self.lines += 1
        key = (event.policy, event.rule, event.action, event.kind)
        self.event_counts[key] = self.event_counts.get(key, 0) + event.count
        self.sink.queue_event(event)
        if self.tap is not None:
            self.tap(event)

    def check_losses(self, kernel_lost: int | None) -> int:
        """Report what was lost since the last check; the kernel's total when
        a new kernel loss was reported, else -1."""
        reported = -1
        if kernel_lost is not None:
            event = self.losses.kernel_reading(kernel_lost)
            if event is not None:
                self.send(event)
                reported = self.losses.kernel_lost
        event = self.losses.reader_report()
        if event is not None:
            self.send(event)
        return reported

    def drain(self, consume: Callable[[], object] | None,
              kernel_lost: Callable[[], int | None]) -> int:
        """At stop: every record still in the ring buffer and the queue (when
        there is a ring buffer), and every folded window, out as lines. As
        ``round``, the kernel's lost total when it was reported, else -1."""
        reported = -1
        if consume is not None:
            # stopping: what cannot be read now is counted below, as the kernel's loss
            with contextlib.suppress(Exception):
                consume()
            self.process()
            reported = self.check_losses(kernel_lost())
        self.send_closed(force=True)
        return reported
