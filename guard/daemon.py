"""The daemon: ``guard run`` enforces a policy directory and streams its events.

Start-up, in this order, so that READY=1 means "enforcing":

1. parse and compile the policy directory; an invalid set prints every
   positioned error (FILE:LINE:COL) to stderr and exits 1 before anything is
   loaded into the kernel;
2. claim the status socket (a second daemon on the same state directory is
   refused before it attaches anything);
3. probe which program families this kernel can run and load every family it
   can (see ``families_to_load``); a family a policy needs but the kernel
   cannot run is a loud error, on stderr and in syslog, naming each policy
   section left unenforced, and the daemon carries on with the rest;
4. apply the plan to the maps;
5. only then sd_notify READY=1 and the syslog line "guard: enforcing N
   policies, revision R".

Then one thread runs one loop (``Daemon.serve``): wait on the ring buffer's fd
and a wake-up pipe (signals, reload requests), consume records, fold identical
ones (guard.audit.Folder, on the records' bytes), decode, enrich and format only
those that become lines, send; check the kernel's lost-event counter once a
second. A round takes at most RECORD_BATCH records and drains the ring buffer
before each, so a flood neither overflows the ring while a backlog is worked off
nor keeps signals, reloads and status waiting; a round that follows a busy one
waits GATHER_S first, so a stream of events costs one round per millisecond,
not one per event; while the syslog target is full it makes no more lines (the
records wait in the reader's queue, counted if it overflows). The status socket
is answered from a second thread, from counters only.

Signals: SIGTERM/SIGINT stop cleanly (every program detached, exit 0).

Reloads (docs/reload.md): SIGHUP and the directory watcher (guard.watch, on
unless ``--no-watch``; it is started before the first read, so no change
after that read is missed) only *ask* for a reload (``request_reload``: a
note in a queue and a byte in the wake-up pipe). The main loop runs it
(``Daemon.reload``), so reloads never overlap and requests that arrive during
one become one more reload after it. A reload reads and validates the whole
directory, compiles and resolves it, and only then applies it; any error
anywhere rejects all of it: the set in force stays, each positioned error
(FILE:LINE:COL) goes to syslog and ``guard status`` shows it until the next
good reload. A set that compiles to the entries already in force writes
nothing to the kernel and is logged as "unchanged". Every applied set is
logged with its revision (guard.revision) and the rules added and removed.

Why every supported family is loaded, not only those the current policies
use: a reload never recompiles (policies are map data), so the programs must
already be in place when an edit adds the first egress rule or the first exec
rule. A loaded family with no scope entries costs one cgroup-ancestor lookup
per hook call and decides nothing.

Why a family the kernel cannot run does not stop the daemon: the other
families' policies still protect the host, and refusing to start would leave
nothing enforced. The loss is never silent: it is logged at start and at every
reload as an error naming the policy sections affected, and ``guard status``
lists it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from guard import layout, memory, notify
from guard.audit import (
    EVENT_SIZE,
    Aggregator,
    AuditEvent,
    DecodeError,
    Enricher,
    Folder,
    LossTracker,
    decode,
    record_count,
    record_identity,
)
from guard.errors import Diagnostic, Location, PolicyError
from guard.model import PolicySet
from guard.plan import Plan
from guard.revision import Revision, revision_of, rule_changes
from guard.sinks import (
    SEV_ERR,
    SEV_INFO,
    SEV_WARNING,
    ParamValue,
    Sink,
    TargetError,
    log_record,
    parse_target,
)

log = logging.getLogger("guard")

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_RUNTIME = 0, 1, 2, 3

STATUS_SOCKET = "status.sock"
RECORD_QUEUE_MAX = 65_536  # records taken from the ring buffer and not yet processed
RECORD_BATCH = 512  # records one round of the loop takes (a few ms of work at most)
GATHER_S = 0.001  # a busy ring buffer is read at most this often (``Daemon._gather``)
CONGESTED_READ_S = 0.005  # ... and at least this often while the syslog target is full
MAX_ERROR_LINES = 100  # errors of one rejected reload sent to syslog and kept for status
LOST_CHECK_S = 1.0
MAX_WAIT_S = 1.0

# policy section -> the program family that enforces it (guard.loader.FAMILIES)
SECTION_FAMILY = {"exec": "exec", "files": "files", "egress": "net"}


# --- loading a policy directory (no kernel) ---------------------------------------------


@dataclass(frozen=True)
class PolicyLoad:
    """A compiled policy directory, ready to apply."""

    policy_set: PolicySet
    plan: Plan
    files: tuple[str, ...]
    revision: Revision
    warnings: tuple[Diagnostic, ...]


def load_policies(directory: str, host_cgroup: str,
                  unit_lookup: Callable[[list[str]], Mapping[str, str]] | None = None,
                  ) -> PolicyLoad | tuple[Diagnostic, ...]:
    """Parse and compile ``directory``; the diagnostics when it cannot be used."""
    from guard.compile import compile_policies
    from guard.parse import load_policy_paths

    result = load_policy_paths([directory])
    if result.errors or result.policy_set is None:
        return result.diagnostics or ()
    units = sorted({u for p in result.policy_set.policies for u in p.scope.units})
    if unit_lookup is None:
        from guard.cgroups import systemd_unit_cgroups

        unit_lookup = systemd_unit_cgroups
    try:
        plan = compile_policies(result.policy_set, host_cgroup=host_cgroup,
                                unit_cgroups=dict(unit_lookup(units)) if units else {})
    except PolicyError as error:
        return error.diagnostics
    warnings = tuple(d for d in result.diagnostics if d.severity != "error")
    return PolicyLoad(result.policy_set, plan, tuple(result.files),
                      revision_of(Path(directory), result.files), warnings)


def needed_sections(policy_set: PolicySet) -> list[tuple[str, str, str]]:
    """(family, policy, "SECTION at FILE:LINE:COL") for every section of every policy."""
    found: list[tuple[str, str, str]] = []
    for policy in policy_set.policies:
        for section in ("exec", "files", "egress"):
            value = getattr(policy, section)
            if value is not None:
                found.append((SECTION_FAMILY[section], policy.name,
                              f"{section} at {value.location}"))
    return found


def unenforced(policy_set: PolicySet, unavailable: Mapping[str, str]) -> list[str]:
    """One message per family a policy needs and the kernel cannot run."""
    by_family: dict[str, list[str]] = {}
    for family, policy, where in needed_sections(policy_set):
        if family in unavailable:
            by_family.setdefault(family, []).append(f"policy {policy} section {where}")
    return [
        f"the kernel cannot run the {family} programs ({unavailable[family]}); "
        f"NOT ENFORCED: {'; '.join(items)}"
        for family, items in sorted(by_family.items())
    ]


def families_to_load(features: Mapping[str, tuple[bool, str]]) -> tuple[set[str], dict[str, str]]:
    """(families to load, unavailable family -> reason) from probe results."""
    load = {f for f, (ok, _why) in features.items() if ok}
    unavailable = {f: why for f, (ok, why) in features.items() if not ok}
    return load, unavailable


# --- the daemon ------------------------------------------------------------------------


@dataclass
class ReloadOutcome:
    """One reload, as ``guard status`` shows it."""

    time_ns: int
    ok: bool
    reason: str  # what asked for it: "SIGHUP", "watch", or both
    revision: str = ""  # the revision read (applied when ok)
    previous: str = ""  # the revision in force before
    changed: bool = False  # False: nothing was written to the kernel ("unchanged")
    generation: int = 0  # the generation in force afterwards
    written: int = 0  # map writes
    apply_ms: float = 0.0
    rules_added: int = 0
    rules_removed: int = 0
    added: list[str] = field(default_factory=list)  # a few labels of each
    removed: list[str] = field(default_factory=list)
    summary: str = ""
    errors: list[str] = field(default_factory=list)


class Daemon:
    """One running guard: its kernel programs, policy, event stream and status."""

    def __init__(
        self,
        policies: str,
        host_cgroup: str,
        state_dir: str,
        sink: Sink,
        *,
        aggregate_window: float = 1.0,
        stderr: Any = None,
        watch: bool = True,
        pin_dir: str | None = None,
        fail_open: bool = False,
    ) -> None:
        self.policies = policies
        self.host_cgroup = host_cgroup
        self.state_dir = Path(state_dir)
        self.sink = sink
        self.stderr = stderr if stderr is not None else sys.stderr
        # folds records on their bytes before anything else is done with them
        self.aggregator: Folder[bytes] = Folder(window=aggregate_window)
        self.losses = LossTracker()
        self.kernel: Any = None
        self.applier: Any = None
        self.current: PolicyLoad | None = None
        self.generation = 0
        self.active_slot = 0
        self.enforced: list[str] = []
        self.unavailable: dict[str, str] = {}
        self.unenforced: list[str] = []
        self.started = time.monotonic()
        self.started_ns = time.time_ns()
        self.reloads = 0
        self.last_reload: ReloadOutcome | None = None
        self.last_reload_error: ReloadOutcome | None = None
        self.records_received = 0
        self.records_malformed = 0
        self.records_dropped = 0
        self.event_lines = 0
        self._records: deque[bytes] = deque()
        self._stop = False
        # reload requests, from the signal handler and the watcher thread: deque
        # appends and pops are atomic, so no lock (a lock in a signal handler can
        # deadlock against the interrupted main thread)
        self._reload_requests: deque[str] = deque()
        self.watch = watch
        self.watcher: Any = None
        self.watch_error = ""
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._status_sock: socket.socket | None = None
        self._status_thread: threading.Thread | None = None
        self._next_lost_check = 0.0
        self._last_busy = 0.0  # monotonic time of the last round that read or sent
        self._enricher: Enricher | None = None
        self._ring: Any = None
        self._stats: Any = None
        self._ringbuf_fd = -1
        # Service: pins (guard.pin), tamper protection (guard.tamper), rule hits.
        from guard.pin import Persistence

        self.persistence = Persistence(Path(pin_dir) if pin_dir else None, self.state_dir,
                                       fail_open=fail_open)
        self.tamper_error = ""
        self.rule_hits: dict[str, int] = {}  # rule label -> reported decisions
        self.memory_release: memory.Release | None = None
        self._unload = False

    # -- messages ------------------------------------------------------------------

    def say(self, severity: int, msgid: str, message: str,
            params: tuple[tuple[str, ParamValue], ...] = ()) -> None:
        """A line about the daemon itself: to stderr (the journal) and to syslog."""
        label = {SEV_ERR: "error: ", SEV_WARNING: "warning: "}.get(severity, "")
        print(f"guard: {label}{message}", file=self.stderr, flush=True)
        self.sink.submit(log_record(severity, msgid, f"guard: {message}", params))

    # -- start ---------------------------------------------------------------------

    def start(self) -> int:
        """Load, enforce and signal readiness; an exit code when that fails."""
        # Watch before the first read: a change made while we read and compile
        # is then a reload right after start, never a change we missed.
        self._start_watcher()
        loaded = load_policies(self.policies, self.host_cgroup)
        if not isinstance(loaded, PolicyLoad):
            for diagnostic in loaded:
                print(diagnostic, file=self.stderr)
            errors = [d for d in loaded if d.severity == "error"]
            print(f"guard: refusing to start: {len(errors)} error(s) in the policies under "
                  f"{self.policies}; nothing was loaded", file=self.stderr, flush=True)
            for diagnostic in errors:
                self.sink.submit(log_record(SEV_ERR, "policy", str(diagnostic)))
            return EXIT_INVALID
        for warning in loaded.warnings:
            print(warning, file=self.stderr)

        try:
            self._claim_status_socket()
        except RuntimeError as error:
            self.say(SEV_ERR, "start", str(error))
            return EXIT_RUNTIME

        features = self._probe()
        load, self.unavailable = families_to_load(features)
        self.unenforced = unenforced(loaded.policy_set, self.unavailable)
        for message in self.unenforced:
            self.say(SEV_ERR, "unenforced", message)
        if not load:
            self.say(SEV_ERR, "start", "no program family can run on this kernel: "
                     + "; ".join(f"{f}: {why}" for f, why in sorted(self.unavailable.items())))
            return EXIT_RUNTIME

        from guard.loader import LoadError

        try:
            self.kernel = self._make_kernel(load)
        except (LoadError, OSError) as error:
            self.say(SEV_ERR, "start", f"loading the programs failed: {error}")
            return EXIT_RUNTIME
        self._report_dropped(loaded.policy_set)
        self.enforced = sorted(self.kernel.families)
        self._protect()

        from guard.apply import Applier, ApplyError

        self.applier = Applier(self.kernel)
        try:
            result = self.applier.apply(loaded.plan)
        except (ApplyError, OSError) as error:
            self.say(SEV_ERR, "start", f"applying the policies failed: {error}")
            self._close_kernel()
            return EXIT_RUNTIME
        self.generation, self.active_slot = result.generation, result.slot
        for warning in result.warnings:
            self.say(SEV_WARNING, "apply", warning)
        self.current = loaded

        self._open_events()
        self._persist(loaded)
        summary = self._summary(loaded)
        notify.ready(summary)
        self.say(SEV_INFO, "start", summary,
                 (("revision", str(loaded.revision)), ("policies", len(loaded.policy_set.policies)),
                  ("generation", self.generation), ("families", ",".join(self.enforced))))
        # Enforcing: the compiler's memory is dead weight now (guard/memory.py; never raises)
        self.memory_release = memory.release()
        self.say(SEV_INFO, "memory", self.memory_release.summary())
        if self.watch_error:
            self.say(SEV_WARNING, "watch", f"not watching {self.policies} "
                     f"({self.watch_error}); reload with SIGHUP")
        return EXIT_OK

    def _start_watcher(self) -> None:
        if not self.watch:
            return
        from guard.watch import PolicyWatcher

        try:
            watcher = PolicyWatcher(Path(self.policies), lambda: self.request_reload("watch"))
            watcher.start()
        except Exception as error:  # no inotify, limits: SIGHUP still works
            self.watch_error = f"{type(error).__name__}: {error}"
            print(f"guard: warning: cannot watch {self.policies} ({self.watch_error}); "
                  "reload with SIGHUP", file=self.stderr, flush=True)
            return
        self.watcher = watcher

    def _stop_watcher(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            with contextlib.suppress(Exception):
                watcher.stop()

    def _summary(self, loaded: PolicyLoad) -> str:
        count = len(loaded.policy_set.policies)
        return (f"enforcing {count} polic{'y' if count == 1 else 'ies'}, revision "
                f"{loaded.revision} ({', '.join(self.enforced)})")

    # Where the programs' C sources are read from (a test points it at a copy).
    bpf_dir: Path = layout.BPF_DIR

    def _probe(self) -> dict[str, tuple[bool, str]]:
        from guard.loader import FAMILIES, family_source, probe_features

        present = [f for f in FAMILIES if family_source(f, self.bpf_dir).exists()]
        absent = {f: (False, f"this guard has no {family_source(f).name}")
                  for f in FAMILIES if f not in present}
        found = {f: (feature.available, feature.reason)
                 for f, feature in probe_features(present).items()}
        found.update(absent)
        return found

    def _make_kernel(self, families: set[str]) -> Any:
        """The programs of ``families``; one that fails to compile or load is left
        out (``Kernel.dropped``), LoadError only when none loads."""
        from guard.loader import Kernel

        return Kernel(families=families, host_cgroup=self.host_cgroup, bpf_dir=self.bpf_dir)

    def _report_dropped(self, policy_set: PolicySet) -> None:
        """Families that passed the probe but failed to compile or load: reported
        like those the probe rejected (unavailable, unenforced, ``guard status``)."""
        dropped: dict[str, str] = dict(self.kernel.dropped)
        for family, why in sorted(dropped.items()):
            self.say(SEV_ERR, "start", f"the {family} programs failed to load and are left "
                     f"out: {why}")
        if dropped:
            self.unavailable.update(dropped)
            self.unenforced = unenforced(policy_set, self.unavailable)
            for message in unenforced(policy_set, dropped):
                self.say(SEV_ERR, "unenforced", message)

    def _open_events(self) -> None:
        from guard.cgroups import CgroupIndex

        index = CgroupIndex()
        self._enricher = Enricher(rules=self.applier.rule_for, cgroups=index.path)
        # Keep the table: bcc keeps the ctypes callback alive only as long as the
        # table object that opened the ring buffer, and Kernel.map() makes a new
        # object per call. A collected callback is a segfault at the next event.
        self._ring = self.kernel.map("guard_events")
        self._ring.open_ring_buffer(self._on_record)
        self._ringbuf_fd = self._ring.map_fd
        self._stats = self.kernel.map("guard_stats")

    def _on_record(self, _ctx: Any, data: Any, size: int) -> int:
        """Called by bcc from inside ring_buffer_consume: copy and return, never raise."""
        if len(self._records) >= RECORD_QUEUE_MAX:
            self.records_dropped += 1
            self.losses.reader_dropped()
            return 0
        self._records.append(ctypes.string_at(data, size))
        return 0

    # -- service: tamper protection and pins (guard/tamper.py, guard/pin.py) ---------

    def _protect(self) -> None:
        """Tell tamper.bpf.c who the daemon is, before any scope exists."""
        if "tamper" not in self.kernel.families:
            return
        from guard.cgroups import CgroupError, cgroup_id
        from guard.tamper import configure

        try:
            configure(self.kernel, os.getpid(), cgroup_id(self.host_cgroup) or 0)
        except (OSError, KeyError, CgroupError) as error:
            self.tamper_error = str(error)
            self.say(SEV_ERR, "tamper", f"tamper protection is off: {error}")

    def _persist(self, loaded: PolicyLoad) -> None:
        """Pin what is now enforced (fail-closed), then retire earlier daemons' pins."""
        from guard.pin import Manifest, PinError

        keep = self.persistence
        try:
            pinned = keep.pin(self.kernel, Manifest(
                instance=keep.instance, pid=os.getpid(), started=_iso(self.started_ns),
                revision=str(loaded.revision), policies_dir=self.policies,
                host_cgroup=self.host_cgroup, families=tuple(self.enforced),
                pin_dir=str(keep.pin_dir)))
        except (PinError, OSError) as error:
            keep.error = str(error)
            self.say(SEV_ERR, "pin", f"{error}; enforcement ends with this process, and "
                     "earlier daemons' pins stay in force")
            return
        if pinned is not None:
            self.say(SEV_INFO, "pin", f"pinned {len(pinned.pins)} objects in {pinned.path} "
                     "(fail-closed)", (("instance", pinned.name),))
        try:
            for retired in keep.take_over():
                self._report_retired(retired, loaded)
        except (PinError, OSError) as error:
            keep.error = f"taking over: {error}"
            self.say(SEV_ERR, "pin", f"taking over from an earlier daemon failed: {error}")

    def _report_retired(self, retired: Any, loaded: PolicyLoad) -> None:
        """The events an earlier daemon's pins produced and nobody delivered."""
        from guard.audit import LOST_KERNEL, lost_event

        manifest = retired.manifest
        # Rule ids are the compiler's, slot-independent: the same revision names them.
        same = manifest is not None and manifest.revision == str(loaded.revision)
        plan = loaded.plan
        enricher = Enricher(rules=(lambda _rs, rule: plan.rule(rule)) if same
                            else (lambda _rs, _rule: None),
                            cgroups=self._enricher.cgroups if self._enricher else lambda _i: None)
        # folded on their own, with this enricher, and all out now
        aggregator = Aggregator(window=self.aggregator.window)
        for data in retired.records:
            try:
                event = enricher.enrich(decode(data))
            except DecodeError:
                self.records_malformed += 1
                self.losses.reader_dropped()
                continue
            self.records_received += 1
            for line in aggregator.push(event):
                self._send(line)
        for line in aggregator.flush(force=True):
            self._send(line)
        if retired.lost_unreported:
            self._send(lost_event(retired.lost_unreported, LOST_KERNEL))
        who = f"pid {manifest.pid}, revision {manifest.revision}" if manifest else "no manifest"
        self.say(SEV_INFO, "takeover",
                 f"took over from {retired.instance} ({who}): {len(retired.pins)} pins removed, "
                 f"{len(retired.records)} undelivered events, {retired.lost_unreported} lost",
                 (("instance", retired.instance), ("events", len(retired.records)),
                  ("lost", retired.lost_unreported)))

    def _release_pins(self) -> str:
        """At stop: remove our pins if asked to unload; where they stay otherwise."""
        keep = self.persistence
        if keep.pinned is None:
            return ""
        if self._unload:
            try:
                keep.release()
            except OSError as error:
                self.say(SEV_ERR, "stop", f"removing the pins failed: {error}")
            return ""
        return str(keep.pinned.path)

    # -- the loop ------------------------------------------------------------------

    def request_reload(self, reason: str = "SIGHUP") -> None:
        """Thread- and signal-safe: ask the main loop to reload (SIGHUP, the watcher)."""
        self._reload_requests.append(reason)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"R")

    def request_stop(self) -> None:
        self._stop = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"S")

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload("SIGHUP"))

    def serve(self) -> int:
        """Run until asked to stop; then detach everything. The exit code."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if self._ringbuf_fd >= 0:
            poller.register(self._ringbuf_fd, select.POLLIN)
        self._next_lost_check = time.monotonic()
        sink_fd: int | None = None  # polled for room while the syslog target is full
        reading = True  # the ring buffer's fd is polled (not while congested)
        try:
            while not self._stop:
                wanted = self.sink.wait_fd()
                if wanted != sink_fd:
                    if sink_fd is not None:
                        with contextlib.suppress(KeyError, ValueError):
                            poller.unregister(sink_fd)
                    if wanted is not None:
                        poller.register(wanted, select.POLLOUT)
                    sink_fd = wanted
                if self._ringbuf_fd >= 0 and reading == self._congested():
                    reading = not reading
                    poller.modify(self._ringbuf_fd, select.POLLIN if reading else 0)
                poller.poll(self._gather(self._wait_ms()))
                self._drain_wake()
                self.step()
                reasons = self._take_reload_requests()
                if reasons and not self._stop:
                    self.reload(reasons)
        finally:
            self.shutdown()
        return EXIT_OK

    def _gather(self, timeout_ms: int) -> int:
        """The poll timeout after sleeping out the rest of GATHER_S since the
        last busy round, if there was one: a stream of events then gathers in
        the ring buffer (and room in a syslog socket that was full), so a
        round's fixed cost (waking up, the ring buffer's library call, a send
        and the receiver's wake-up) is paid per few dozen records or lines, not
        per one. The first record after a quiet spell wakes the loop at once; a
        backlog of records, or a congested target (it gets every free slot as
        soon as there is one), is never waited for."""
        if timeout_ms == 0 or self._congested():
            return timeout_ms
        wait = self._last_busy + GATHER_S - time.monotonic()
        if wait <= 0:
            return timeout_ms
        time.sleep(wait)
        return 0

    def _take_reload_requests(self) -> str:
        """Every pending request, as one reason ("SIGHUP", "watch", "SIGHUP+watch").

        A request that arrives after this returns stays queued (and has written
        the wake-up pipe), so it is one more reload after this one, never lost.
        """
        reasons: set[str] = set()
        while True:
            try:
                reasons.add(self._reload_requests.popleft())
            except IndexError:
                return "+".join(sorted(reasons))

    def _wait_ms(self) -> int:
        if self._records and self._batch_limit() > 0:
            return 0  # a backlog to work off: no waiting
        now = time.monotonic()
        # congested, the ring buffer's fd is not polled; it is read this often
        deadlines = [now + (CONGESTED_READ_S if self._congested() else MAX_WAIT_S),
                     self._next_lost_check]
        flush_at = self.aggregator.next_deadline()
        if flush_at is not None:
            deadlines.append(flush_at)
        retry = self.sink.retry_in()
        if retry is not None:
            deadlines.append(now + retry)
        return max(0, int((min(deadlines) - now) * 1000) + 1)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def step(self) -> None:
        """One round: take records, send lines, report losses, deliver."""
        with self._lock:
            delivered, taken = self.sink.delivered, self.records_received
            if self._congested():
                self.sink.pump()  # woken because the target has room again, or by a timer
            if self.kernel is not None:
                # also while congested: the record queue absorbs a burst the
                # target cannot take yet, where the ring buffer would overflow
                self.kernel.bpf.ring_buffer_consume()
            self._send_closed()
            self._process_records(self._batch_limit())
            now = time.monotonic()
            if now >= self._next_lost_check:
                self._next_lost_check = now + LOST_CHECK_S
                self._check_losses()
            self.sink.pump()
            if self.records_received != taken or self.sink.delivered != delivered:
                self._last_busy = now

    def _congested(self) -> bool:
        """The syslog target is connected but full with a quarter of the queue
        waiting: making more lines now would only fill the queue, and take CPU
        from the receiver. The loop then makes no lines until the target has
        room (POLLOUT on its socket); it reads the ring buffer every
        CONGESTED_READ_S into the record queue, which absorbs the burst (what
        overflows it is counted). (A target that is down does not stop the
        records: they are still folded, and what does not fit in the syslog
        queue is counted.)"""
        return self.sink.congested(max(1, self.sink.queue_size // 4))

    def _batch_limit(self) -> int:
        """Records the next round takes: RECORD_BATCH, none while the target is
        congested, and while it is connected no more than the syslog queue has
        room for (a record makes at most one line), so a burst waits as records
        rather than overflowing the queue a connected target is emptying."""
        if self._congested():
            return 0
        room = self.sink.room()
        return RECORD_BATCH if room is None else min(RECORD_BATCH, room)

    def _process_records(self, limit: int | None = None) -> None:
        """Fold up to ``limit`` queued records (all without); a record that opens
        a window, or fits none, becomes a line at once."""
        records, folder = self._records, self.aggregator
        n = len(records) if limit is None else min(limit, len(records))
        if n == 0:
            return
        enricher = self._enricher
        assert enricher is not None
        self.records_received += n
        for _ in range(n):
            data = records.popleft()
            if len(data) < EVENT_SIZE:  # not ours; never read past its end
                self.records_malformed += 1
                self.losses.reader_dropped()
                continue
            if folder.add(record_identity(data), data, record_count(data)):
                self._send_record(data, 0, enricher)

    def _send_closed(self, force: bool = False) -> None:
        """The lines of the windows that closed (all of them with ``force``)."""
        closed = self.aggregator.closed(force)
        if closed:
            assert self._enricher is not None
            for data, count in closed:
                self._send_record(data, count, self._enricher)

    def _send_record(self, data: bytes, count: int, enricher: Enricher) -> None:
        """One record as one line; ``count``: the events the line stands for
        (0: the record's own)."""
        raw = decode(data)
        if count:
            raw = raw._replace(count=count)
        self._send_line(enricher.enrich(raw))

    def _send_line(self, event: AuditEvent) -> None:
        if event.rule:  # hits as reported in lines: a window's count when it closes
            self.rule_hits[event.rule] = self.rule_hits.get(event.rule, 0) + event.count
        self._send(event)

    def _send(self, event: AuditEvent) -> None:
        """Queue the line; the loop delivers it before it waits again."""
        self.event_lines += 1
        self.sink.queue_event(event)

    def _check_losses(self) -> None:
        lost_kernel = self.kernel_stat(layout.STAT_EVENTS_LOST)
        if lost_kernel is not None:
            event = self.losses.kernel_reading(lost_kernel)
            if event is not None:
                self._send(event)
                self.persistence.lost_reported(self.losses.kernel_lost)
        event = self.losses.reader_report()
        if event is not None:
            self._send(event)

    def kernel_stat(self, index: int) -> int | None:
        """A guard_stats counter summed over CPUs, or None without a kernel."""
        if self.kernel is None or self._stats is None:
            return None
        try:
            table = self._stats
            return int(sum(int(v) for v in table.getvalue(table.Key(index))))
        except (KeyError, OSError, ValueError):
            return None

    # -- reload --------------------------------------------------------------------

    def reload(self, reason: str) -> bool:
        """Re-read, compile and apply; on any error keep what is in force. Thread: main.

        Never raises for anything a policy directory can hold: whatever goes
        wrong is a rejected reload, reported, with the previous set in force.
        """
        notify.reloading()
        previous = str(self.current.revision) if self.current else ""
        outcome = ReloadOutcome(time.time_ns(), False, reason, previous=previous,
                                generation=self.generation)
        try:
            loaded = self._load_for_reload()
        except Exception as error:  # a parser bug must not take enforcement down
            log.exception("reading the policies failed")
            loaded = (Diagnostic(Location(self.policies, 1, 1), "internal-error",
                                 f"reading the policies failed: {type(error).__name__}: "
                                 f"{error}"),)
        if not isinstance(loaded, PolicyLoad):
            errors = [str(d) for d in loaded if d.severity == "error"]
            outcome.errors = _capped(errors)
            self._reload_failed(outcome, f"{len(errors)} error(s) in the policies")
            return False
        outcome.revision = str(loaded.revision)
        from guard.apply import ApplyError

        try:
            result = self.applier.apply(loaded.plan)
        except (ApplyError, OSError) as error:
            outcome.errors = [str(error)]
            self._reload_failed(outcome, "applying the new policies failed")
            return False
        except Exception as error:
            log.exception("applying the policies failed")
            outcome.errors = [f"{type(error).__name__}: {error}"]
            self._reload_failed(outcome, "applying the new policies failed")
            return False
        for warning in result.warnings:
            self.say(SEV_WARNING, "apply", warning)
        changes = rule_changes(self.current.policy_set if self.current else None,
                               loaded.policy_set)
        outcome.ok, outcome.changed = True, result.changed
        outcome.generation, outcome.written = result.generation, result.written
        outcome.apply_ms = round(result.seconds * 1000, 3)
        outcome.rules_added, outcome.rules_removed = len(changes.added), len(changes.removed)
        outcome.added, outcome.removed = list(changes.added[:10]), list(changes.removed[:10])
        revision = str(loaded.revision)
        moved = f"revision {revision}" + (f" (was {previous})" if previous != revision else "")
        if result.changed:
            outcome.summary = (f"applied {moved}, generation {result.generation}: "
                               f"{changes.summary()}; {result.written} map writes in "
                               f"{outcome.apply_ms:.1f} ms")
        else:
            outcome.summary = (f"unchanged: {moved} compiles to the entries in force, "
                               f"nothing written (generation {result.generation})"
                               + (f"; {changes.summary()}" if changes else ""))
        with self._lock:  # the status thread sees the old state or the new, not a mix
            self.generation, self.active_slot = result.generation, result.slot
            self.current = loaded
            self.unenforced = unenforced(loaded.policy_set, self.unavailable)
            self.last_reload = outcome
            self.last_reload_error = None  # the set in force is good again
            self.reloads += 1  # counted with its outcome: status never shows one without the other
        for message in self.unenforced:
            self.say(SEV_ERR, "unenforced", message)
        if not loaded.policy_set.policies:
            self.say(SEV_WARNING, "reload", f"{self.policies} holds no policies: "
                     "nothing is enforced")
        self.say(SEV_INFO, "reload", f"reload ({reason}): {outcome.summary}",
                 (("revision", revision), ("previous", previous),
                  ("generation", self.generation), ("changed", int(result.changed)),
                  ("added", len(changes.added)), ("removed", len(changes.removed)),
                  ("reason", reason)))
        notify.ready(self._summary(loaded))
        return True

    def _load_for_reload(self) -> PolicyLoad | tuple[Diagnostic, ...]:
        """The directory's policies, or why there are none to apply."""
        directory = Path(self.policies)
        if not directory.is_dir():
            # A file where the directory was would otherwise be read as a policy file.
            what = "is not a directory" if directory.exists() else "does not exist"
            return (Diagnostic(Location(self.policies, 1, 1), "read-error",
                               f"the policy directory {what}"),)
        return load_policies(self.policies, self.host_cgroup)

    def _reload_failed(self, outcome: ReloadOutcome, why: str) -> None:
        kept = str(self.current.revision) if self.current else "none"
        outcome.summary = f"rejected ({why}); still enforcing revision {kept}"
        with self._lock:
            self.last_reload = self.last_reload_error = outcome
            self.reloads += 1
        self.say(SEV_ERR, "reload", f"reload ({outcome.reason}) {outcome.summary}",
                 (("revision", kept), ("errors", len(outcome.errors)),
                  ("reason", outcome.reason)))
        for error in outcome.errors:
            self.say(SEV_ERR, "reload", error)
        notify.ready(f"reload rejected; {self._summary(self.current)}" if self.current else "")

    # -- stop ----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Report what is pending, detach everything, deliver the last lines."""
        notify.stopping()
        self._stop_watcher()
        with self._lock:
            if self.kernel is not None:
                with contextlib.suppress(Exception):
                    self.kernel.bpf.ring_buffer_consume()
                self._process_records()
                self._check_losses()
            self._send_closed(force=True)
            kept = self._release_pins()
            self._close_kernel()
        self.say(SEV_INFO, "stop", f"stopped; enforcement stays pinned in {kept} (fail-closed; "
                 "`guard stop --unload` removes it)" if kept else "stopped; every program detached")
        self.sink.close(timeout=2.0)
        self._close_status_socket()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _close_kernel(self) -> None:
        kernel, self.kernel = self.kernel, None
        self._ringbuf_fd = -1
        self._stats = None
        if kernel is not None:
            try:
                kernel.close()
            except Exception as error:
                self.say(SEV_ERR, "stop", f"detaching failed: {error}")
        self._ring = None  # only now: the ring buffer's callback is gone with the kernel

    def abort(self) -> None:
        """After a failed start: detach whatever was attached, say what is queued."""
        self._stop_watcher()
        self._close_kernel()
        self.sink.close(timeout=0.5)
        self._close_status_socket()

    # -- status --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything ``guard status`` shows; safe to call from the status thread."""
        with self._lock:
            current = self.current
            policies = []
            rules: dict[str, int] = {}
            if current is not None:
                for rule in current.plan.rules:
                    rules[rule.policy] = rules.get(rule.policy, 0) + 1
                for policy in current.policy_set.policies:
                    policies.append({
                        "name": policy.name,
                        "mode": str(policy.mode),
                        "file": policy.location.file,
                        "sections": [s for s in ("exec", "files", "egress")
                                     if getattr(policy, s) is not None],
                        "scope": (list(policy.scope.cgroups) + list(policy.scope.units))
                        or ["(host)"],
                        "rules": rules.get(policy.name, 0),
                    })
            agg = self.aggregator.stats()
            sink = self.sink.stats()
            kernel = {name: self.kernel_stat(index) for name, index in (
                ("events", layout.STAT_EVENTS), ("lost", layout.STAT_EVENTS_LOST),
                ("undecided", layout.STAT_UNDECIDED), ("denied", layout.STAT_DENIED),
                ("audited", layout.STAT_AUDITED), ("suppressed", layout.STAT_SUPPRESSED),
                ("tamper", layout.STAT_TAMPER), ("scope_lost", layout.STAT_SCOPE_LOST))}
            return {
                "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self.started, 3),
                "started": _iso(self.started_ns),
                "policies_dir": self.policies,
                "host_cgroup": self.host_cgroup,
                "revision": str(current.revision) if current else None,
                "revision_detail": current.revision.as_dict() if current else None,
                "generation": self.generation,
                "active_slot": self.active_slot,
                "policies": policies,
                "rules": len(current.plan.rules) if current else 0,
                "families": {"enforced": self.enforced, "unavailable": self.unavailable,
                             "unenforced": self.unenforced},
                "events": {
                    "received": self.records_received,
                    "lines": self.event_lines,
                    "aggregated": agg.aggregated,
                    "pending": agg.pending,
                    "delivered": sink.delivered,
                    "lost": {"ringbuf": self.losses.kernel_lost,
                             "reader": self.losses.reader_lost,
                             "malformed": self.records_malformed,
                             "sink": sink.overflow},
                },
                "kernel": kernel,
                "sink": asdict(sink),
                "reloads": self.reloads,
                "last_reload": _outcome(self.last_reload),
                "last_reload_error": _outcome(self.last_reload_error),
                "watch": self._watch_status(),
                "pins": self.persistence.status(),
                "tamper": {"enabled": "tamper" in self.enforced, "error": self.tamper_error,
                           "denied": kernel["tamper"]},
                "rule_hits": dict(sorted(self.rule_hits.items())),
                "memory": memory.status_body(self.memory_release),
            }

    def _watch_status(self) -> dict[str, Any]:
        watcher = self.watcher
        return {
            "enabled": watcher is not None,
            "error": self.watch_error,
            "bursts": watcher.bursts if watcher is not None else 0,
            "rearms": watcher.rearms if watcher is not None else 0,
        }

    def _claim_status_socket(self) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.state_dir / STATUS_SOCKET
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale: left by a daemon that died
            else:
                raise RuntimeError(f"another guard daemon answers on {path}; not starting")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the socket is born 0600: no window with wider rights
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(8)
        self._status_sock = sock
        self._status_thread = threading.Thread(target=self._serve_status, name="guard-status",
                                               daemon=True)
        self._status_thread.start()

    def _serve_status(self) -> None:
        sock = self._status_sock
        assert sock is not None
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed at shutdown
            with conn:
                conn.settimeout(2.0)
                try:
                    reply = self._answer(_read_line(conn))
                except (OSError, ValueError) as error:
                    reply = {"ok": False, "error": str(error)}
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply, sort_keys=True).encode() + b"\n")

    def _answer(self, request: bytes) -> dict[str, Any]:
        """Requests are one JSON line: {"command": "status"} (more commands later)."""
        body = json.loads(request or b"{}")
        command = body.get("command", "status") if isinstance(body, dict) else None
        if command == "status":
            return {"ok": True, "status": self.status()}
        if command == "stop":  # guard stop [--unload]
            self._unload = bool(body.get("unload"))
            self.request_stop()
            return {"ok": True, "pid": os.getpid(), "unload": self._unload,
                    "pins": self.persistence.status()}
        return {"ok": False, "error": f"unknown command {command!r}"}

    def _close_status_socket(self) -> None:
        sock, self._status_sock = self._status_sock, None
        if sock is None:
            return
        path = self.state_dir / STATUS_SOCKET
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()


def _read_line(conn: socket.socket, limit: int = 65536) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < limit:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def _capped(errors: list[str]) -> list[str]:
    if len(errors) <= MAX_ERROR_LINES:
        return errors
    return [*errors[:MAX_ERROR_LINES], f"... and {len(errors) - MAX_ERROR_LINES} more errors"]


def _iso(time_ns: int) -> str:
    return datetime.datetime.fromtimestamp(time_ns / 1e9, datetime.UTC).isoformat(
        timespec="seconds").replace("+00:00", "Z")


def _outcome(outcome: ReloadOutcome | None) -> dict[str, Any] | None:
    if outcome is None:
        return None
    body = asdict(outcome)
    body["time"] = _iso(body.pop("time_ns"))
    return body


# --- entry points ------------------------------------------------------------------------


def _setting(args: argparse.Namespace, name: str, env: str, default: float) -> float:
    value = getattr(args, name, None)
    if value is None:
        value = os.environ.get(env)
    return float(value) if value is not None else default


def run(args: argparse.Namespace) -> int:
    """``guard run``: enforce until SIGTERM; the exit code."""
    try:
        target = parse_target(args.syslog)
    except TargetError as error:
        print(f"guard run: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not Path(args.policies).is_dir():
        print(f"guard run: --policies {args.policies}: not a directory", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="guard: %(message)s", stream=sys.stderr)
    sink = Sink(target, queue_size=int(_setting(args, "syslog_queue", "GUARD_SYSLOG_QUEUE",
                                                10_000)))
    daemon = Daemon(args.policies, args.host_cgroup, args.state_dir, sink,
                    aggregate_window=_setting(args, "aggregate_window",
                                              "GUARD_AGGREGATE_WINDOW", 1.0),
                    watch=not getattr(args, "no_watch", False),
                    pin_dir=getattr(args, "pin_dir", None),
                    fail_open=getattr(args, "fail_open", False))
    # Signals first: a SIGTERM during the (slow) compile must still end cleanly.
    daemon.install_signals()
    code = daemon.start()
    if code != EXIT_OK:
        daemon.abort()
        return code
    return daemon.serve()  # returns at once, cleanly, if SIGTERM came during the start


def query(state_dir: str, command: str = "status", timeout: float = 5.0,
          extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Ask the running daemon; OSError when none answers."""
    path = Path(state_dir) / STATUS_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({**(extra or {}), "command": command}).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise ValueError("malformed reply")
    return reply


def status(args: argparse.Namespace) -> int:
    """``guard status [--json]``."""
    try:
        reply = query(args.state_dir)
    except (OSError, ValueError) as error:
        reason = "no daemon is running" if isinstance(error, FileNotFoundError | \
            ConnectionRefusedError) else str(error)
        print(f"guard status: {reason} (state dir {args.state_dir})", file=sys.stderr)
        from guard.pin import describe_pinned

        for line in describe_pinned(Path(getattr(args, "pin_dir", "/sys/fs/bpf/guard")),
                                    Path(args.state_dir)):
            print(f"guard status: {line}", file=sys.stderr)
        return EXIT_RUNTIME
    if not reply.get("ok"):
        print(f"guard status: {reply.get('error')}", file=sys.stderr)
        return EXIT_RUNTIME
    body = reply["status"]
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_status(body))
    return EXIT_OK


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    text = f"{hours}h{minutes:02d}m{s:02d}s" if hours or days else f"{minutes}m{s:02d}s"
    return f"{days}d{text}" if days else text


def format_status(body: Mapping[str, Any]) -> str:
    """The human-readable ``guard status``."""
    lines = [
        f"guard: running, pid {body['pid']}, up {_duration(body['uptime_s'])}",
        f"revision: {body['revision']}  generation {body['generation']}  "
        f"({len(body['policies'])} policies, {body['rules']} rules) from {body['policies_dir']}",
    ]
    fam = body["families"]
    lines.append(f"enforced: {', '.join(fam['enforced']) or 'nothing'}")
    for name, why in sorted(fam["unavailable"].items()):
        lines.append(f"unavailable: {name}: {why}")
    for message in fam["unenforced"]:
        lines.append(f"ERROR: {message}")
    if body["policies"]:
        lines.append("policies:")
        width = max(len(p["name"]) for p in body["policies"])
        for p in body["policies"]:
            lines.append(f"  {p['name']:<{width}}  {p['mode']:<7}  rules {p['rules']:<4} "
                         f"{','.join(p['sections']) or '-':<18} scope {','.join(p['scope'])}"
                         f"  ({p['file']})")
    ev = body["events"]
    lost = ev["lost"]
    lines.append(f"events: received {ev['received']}, lines {ev['lines']}, "
                 f"aggregated {ev['aggregated']}, pending {ev['pending']}")
    lines.append(f"lost: ring buffer {lost['ringbuf']}, reader {lost['reader']} "
                 f"(malformed {lost['malformed']}), syslog queue {lost['sink']}")
    sink = body["sink"]
    state = "connected" if sink["connected"] else "NOT connected"
    lines.append(f"syslog: {sink['target']} {state}, delivered {sink['delivered']}, "
                 f"queued {sink['queued']}" + (f", last error: {sink['last_error']}"
                                               if sink["last_error"] else ""))
    kernel = body.get("kernel") or {}
    if any(v is not None for v in kernel.values()):
        lines.append("kernel: " + ", ".join(f"{k} {v}" for k, v in kernel.items()
                                            if v is not None))
    watch = body.get("watch")
    if watch is not None:
        lines.append(f"watch: {'on' if watch['enabled'] else 'OFF'}"
                     + (f" ({watch['error']})" if watch.get("error") else "")
                     + ("" if not watch["enabled"] else f", {watch['bursts']} bursts"))
    pins = body.get("pins")
    if pins is not None:
        where = (f" in {pins['dir']}/{pins['instance']}" if pins.get("instance") else "")
        lines.append(f"pins: {pins['mode']}{where}"
                     + (f" (ERROR: {pins['error']})" if pins.get("error") else ""))
        for old in pins.get("taken_over", []):
            lines.append(f"  took over from {old['instance']} (pid {old['pid']}): "
                         f"{old['events_drained']} undelivered events, {old['lost']} lost")
    memory_line = memory.status_line(body.get("memory") or {})
    if memory_line:
        lines.append(memory_line)
    tamper = body.get("tamper")
    if tamper is not None:
        lines.append(f"tamper protection: {'on' if tamper['enabled'] else 'off'}"
                     + (f", {tamper['denied']} attempts refused" if tamper["enabled"] else "")
                     + (f" (ERROR: {tamper['error']})" if tamper.get("error") else ""))
    hits = body.get("rule_hits") or {}
    if hits:
        lines.append("rule hits (reported decisions): "
                     + ", ".join(f"{rule} {count}" for rule, count in hits.items()))
    last = body.get("last_reload")
    if last:
        verdict = "ok" if last["ok"] else "REJECTED"
        line = f"last reload: {verdict} at {last['time']} ({body['reloads']} reloads)"
        if last.get("summary"):
            line += f": {last['summary']}"
        lines.append(line)
    error = body.get("last_reload_error")
    if error:
        lines.append(f"last reload error at {error['time']} (the set above stays in force):")
        lines.extend(f"  {e}" for e in error["errors"])
    return "\n".join(lines) + "\n"


__all__ = ["Daemon", "format_status", "load_policies", "query", "run", "status",
           "unenforced"]
