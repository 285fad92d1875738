"""The daemon: ``guard run`` enforces a policy directory and streams its events.

Start-up, in this order, so that READY=1 means "enforcing":

1. parse and compile the policy directory; an invalid set prints every
   positioned error (FILE:LINE:COL) to stderr and exits 1 before anything is
   loaded into the kernel;
2. claim the control socket (a second daemon on the same state directory is
   refused before it attaches anything);
3. probe which program families this kernel can run and load every family it
   can (see ``families_to_load``); a family a policy needs but the kernel
   cannot run is a loud error, on stderr and in syslog, naming each policy
   section left unenforced, and the daemon carries on with the rest;
4. apply the plan to the maps;
5. only then sd_notify READY=1 and the syslog line "guard: enforcing N
   policies, revision R".

Then one thread runs one loop (``Daemon.serve``): wait on the ring buffer's fd,
the syslog target (while it is full) and a wake-up pipe (signals, reload
requests), and run one round of the event reader (guard.events.reader: records
folded, decoded, enriched, formatted and sent, losses counted) and then any
reload asked for. The control socket (guard.service.control) is answered from a
second thread, from counters only; what it may change is authorized there.

Signals: SIGTERM/SIGINT stop cleanly (every program detached, exit 0).

Reloads (docs/reload.md): SIGHUP and the directory watcher (guard.service.watch, on
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
logged with its revision (guard.policy.revision) and the rules added and removed.

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
import logging
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard import layout
from guard.errors import Code, Diagnostic, ExitCode, Location
from guard.events.enrich import Enricher
from guard.events.fold import Aggregator
from guard.events.formats import SEV_ERR, SEV_INFO, SEV_WARNING, ParamValue, log_record
from guard.events.reader import EventReader
from guard.events.records import (
    LOST_KERNEL,
    AuditEvent,
    DecodeError,
    decode,
    lost_event,
    printable_text,
)
from guard.events.transports import Sink, TargetError, parse_target
from guard.kernel.apply import Applier, ApplyError
from guard.kernel.cgroups import CgroupError, CgroupIndex, cgroup_id, systemd_unit_cgroups
from guard.kernel.loader import (
    FAMILIES,
    Kernel,
    LoadError,
    families_to_load,
    family_source,
    probe_features,
    unenforced,
)
from guard.kernel.lsm import LsmReport
from guard.kernel.pin import Manifest, Persistence, PinError, Retired
from guard.kernel.resolve import paths_status
from guard.kernel.tamper import configure as configure_tamper
from guard.policy.evaluate import ruleset_for
from guard.policy.hits import carry_event_counts, carry_hits
from guard.policy.load import PolicyLoad, load_policies
from guard.policy.model import PolicySet
from guard.policy.plan import Plan
from guard.policy.revision import rule_changes
from guard.policy.units import normalize_cgroup
from guard.service import memory, notify, startup
from guard.service.control import Caller, ControlServer
from guard.service.report import daemon_status, iso
from guard.service.tail import EventHub
from guard.service.watch import PolicyWatcher

log = logging.getLogger("guard")

MAX_ERROR_LINES = 100  # errors of one rejected reload sent to syslog and kept for status


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
        self.events = EventReader(sink, aggregate_window=aggregate_window)
        self.kernel: Kernel | None = None
        self.applier: Applier | None = None
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
        self.reload_errors = 0
        self._stop = False
        # reload requests, from the signal handler and the watcher thread: deque
        # appends and pops are atomic, so no lock (a lock in a signal handler can
        # deadlock against the interrupted main thread)
        self._reload_requests: deque[str] = deque()
        self.watch = watch
        self.watcher: PolicyWatcher | None = None
        self.watch_error = ""
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.hub = EventHub(sink.hostname, os.getpid())
        self.events.tap = self.hub.publish
        self.control = ControlServer(self.state_dir, {"status": self._on_status,
                                                      "stop": self._on_stop},
                                     authorize=self._authorize, on_refused=self._refused,
                                     streams={"events": self.hub.serve})
        self._ring: Any = None
        self._stats: Any = None
        self._ringbuf_fd = -1
        self.persistence = Persistence(Path(pin_dir) if pin_dir else None, self.state_dir,
                                       fail_open=fail_open)
        self.tamper_error = ""
        self.paths: dict[str, str] = {}  # where policy paths are resolved (_check_paths)
        self.memory_release: memory.Release | None = None
        self.lsm_report: LsmReport | None = None
        self.progress = startup.Progress(self.stderr)
        self._unload = False

    # -- messages ------------------------------------------------------------------

    def say(self, severity: int, msgid: str, message: str,
            params: tuple[tuple[str, ParamValue], ...] = ()) -> None:
        """A line about the daemon itself: to stderr (the journal) and to syslog."""
        print(startup.stderr_line(severity, message), file=self.stderr, flush=True)
        self.sink.submit(log_record(severity, msgid, f"guard: {message}", params))

    # -- start ---------------------------------------------------------------------

    def start(self) -> int:
        """Load, enforce and signal readiness; an exit code when that fails."""
        # Watch before the first read: a change made while we read and compile
        # is then a reload right after start, never a change we missed.
        self._start_watcher()
        with self.progress.stage("compile") as done:
            loaded = load_policies(self.policies, self.host_cgroup,
                                   unit_lookup=systemd_unit_cgroups)
            done(startup.compiled(loaded))
        if not isinstance(loaded, PolicyLoad):
            for diagnostic in loaded:
                print(diagnostic, file=self.stderr)
            errors = [d for d in loaded if d.severity == "error"]
            print(f"guard: refusing to start: {len(errors)} error(s) in the policies under "
                  f"{self.policies}; nothing was loaded", file=self.stderr, flush=True)
            for diagnostic in errors:
                self.sink.submit(log_record(SEV_ERR, "policy", str(diagnostic)))
            return ExitCode.INVALID
        for warning in loaded.warnings:
            print(warning, file=self.stderr)

        try:
            self.control.claim()
        except RuntimeError as error:
            self.say(SEV_ERR, "start", str(error))
            return ExitCode.RUNTIME

        features = self._probe()
        load, self.unavailable = families_to_load(features)
        self.lsm_report = startup.lsm_report(self.unavailable)
        self.unenforced = unenforced(loaded.policy_set, self.unavailable)
        for message in self.unenforced:
            self.say(SEV_ERR, "unenforced", message)
        if self.lsm_report is not None:
            for line in self.lsm_report.lines():
                self.say(SEV_WARNING, "lsm", line.strip())
        if not load:
            self.say(SEV_ERR, "start", "no program family can run on this kernel: "
                     + "; ".join(f"{f}: {why}" for f, why in sorted(self.unavailable.items())))
            return ExitCode.RUNTIME

        try:
            with self.progress.stage("load", f"compiling and loading the "
                                     f"{', '.join(sorted(load))} programs (bcc)") as done:
                self.kernel = self._make_kernel(load)
                done(f"{', '.join(sorted(self.kernel.families))} loaded and attached")
        except (LoadError, OSError) as error:
            self.say(SEV_ERR, "start", f"loading the programs failed: {error}")
            return ExitCode.RUNTIME
        self._report_dropped(loaded.policy_set)
        self.enforced = sorted(self.kernel.families)
        self._protect()

        self.applier = Applier(self.kernel)
        self._check_paths(loaded.plan)
        try:
            with self.progress.stage("apply") as done:
                result = self.applier.apply(loaded.plan)
                done(f"{result.written} map writes, generation {result.generation}")
        except (ApplyError, OSError) as error:
            self.say(SEV_ERR, "start", f"applying the policies failed: {error}")
            self._close_kernel()
            return ExitCode.RUNTIME
        self.generation, self.active_slot = result.generation, result.slot
        for apply_warning in result.warnings:
            self.say(SEV_WARNING, "apply", apply_warning)
        self.current = loaded

        self._open_events()
        self._persist(loaded)
        unreachable = startup.target_unreachable(self.sink)
        if unreachable:  # before READY=1: who waits for it has read this line
            print(f"guard: warning: {unreachable}", file=self.stderr, flush=True)
        summary = self._summary(loaded)
        notify.ready(summary)
        self.say(SEV_INFO, "start", summary,
                 (("revision", str(loaded.revision)), ("policies", len(loaded.policy_set.policies)),
                  ("generation", self.generation), ("families", ",".join(self.enforced))))
        # Enforcing: the compiler's memory is dead weight now (service/memory.py; never raises)
        self.memory_release = memory.release()
        self.say(SEV_INFO, "memory", self.memory_release.summary())
        if self.watch_error:
            self.say(SEV_WARNING, "watch", f"not watching {self.policies} "
                     f"({self.watch_error}); reload with SIGHUP")
        return ExitCode.OK

    def _check_paths(self, plan: Plan) -> None:
        """Where the plan's paths are about to be resolved (guard.kernel.resolve):
        the host's mount namespace, or an error said now and shown by status."""
        found = paths_status() if plan.exec or plan.files else {}
        with self._lock:
            self.paths = found
        if found.get("error"):
            self.say(SEV_ERR, "paths", found["error"])

    def _start_watcher(self) -> None:
        if not self.watch:
            return
        try:
            watcher = PolicyWatcher(Path(self.policies), lambda: self.request_reload("watch"))
            watcher.start()
        except Exception as error:  # no inotify, limits: SIGHUP still works
            self.watch_error = f"{type(error).__name__}: {error}"  # said once started
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
        present = [f for f in FAMILIES if family_source(f, self.bpf_dir).exists()]
        absent = {f: (False, f"this guard has no {family_source(f).name}")
                  for f in FAMILIES if f not in present}
        found = {f: (feature.available, feature.reason)
                 for f, feature in probe_features(present).items()}
        found.update(absent)
        return found

    def _make_kernel(self, families: set[str]) -> Kernel:
        """The programs of ``families``; one that fails to compile or load is left
        out (``Kernel.dropped``), LoadError only when none loads."""
        return Kernel(families=families, host_cgroup=self.host_cgroup, bpf_dir=self.bpf_dir)

    def _report_dropped(self, policy_set: PolicySet) -> None:
        """Families that passed the probe but failed to compile or load: reported
        like those the probe rejected (unavailable, unenforced, ``guard status``)."""
        assert self.kernel is not None
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
        assert self.kernel is not None and self.applier is not None
        index = CgroupIndex()
        self.events.enricher = Enricher(rules=self.applier.rule_for, cgroups=index.path)
        # Keep the table: bcc keeps the ctypes callback alive only as long as the
        # table object that opened the ring buffer, and Kernel.map() makes a new
        # object per call. A collected callback is a segfault at the next event.
        self._ring = self.kernel.map("guard_events")
        self._ring.open_ring_buffer(self.events.on_record)
        self._ringbuf_fd = self._ring.map_fd
        self._stats = self.kernel.map("guard_stats")

    # -- service: tamper protection and pins (guard/kernel/tamper.py, guard/kernel/pin.py) ---------

    def _protect(self) -> None:
        """Tell tamper.bpf.c who the daemon is, before any scope exists."""
        assert self.kernel is not None
        if "tamper" not in self.kernel.families:
            return
        try:
            configure_tamper(self.kernel, os.getpid(), cgroup_id(self.host_cgroup) or 0)
        except (OSError, KeyError, CgroupError) as error:
            self.tamper_error = str(error)
            self.say(SEV_ERR, "tamper", f"tamper protection is off: {error}")

    def _persist(self, loaded: PolicyLoad) -> None:
        """Pin what is now enforced (fail-closed), then retire earlier daemons' pins."""
        keep = self.persistence
        assert self.kernel is not None
        try:
            pinned = keep.pin(self.kernel, Manifest(
                instance=keep.instance, pid=os.getpid(), started=iso(self.started_ns),
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

    def _report_retired(self, retired: Retired, loaded: PolicyLoad) -> None:
        """The events an earlier daemon's pins produced and nobody delivered."""
        manifest = retired.manifest
        # Rule ids are the compiler's, slot-independent: the same revision names them.
        same = manifest is not None and manifest.revision == str(loaded.revision)
        plan = loaded.plan
        enricher = Enricher(rules=(lambda _rs, rule: plan.rule(rule)) if same
                            else (lambda _rs, _rule: None),
                            cgroups=(self.events.enricher.cgroups if self.events.enricher
                                     else lambda _i: None))
        # folded on their own, with this enricher, and all out now
        reader = self.events
        aggregator = Aggregator(window=reader.folder.window)
        for data in retired.records:
            try:
                event = enricher.enrich(decode(data))
            except DecodeError:
                reader.malformed += 1
                reader.losses.reader_dropped()
                continue
            reader.received += 1
            for line in aggregator.push(event):
                reader.send(line)
        for line in aggregator.flush(force=True):
            reader.send(line)
        if retired.lost_unreported:
            reader.send(lost_event(retired.lost_unreported, LOST_KERNEL))
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

    def request_wake(self) -> None:
        """Thread-safe: run a round of the loop soon (a line was queued from another thread)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"W")

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
        reader = self.events
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if self._ringbuf_fd >= 0:
            poller.register(self._ringbuf_fd, select.POLLIN)
        reader.next_lost_check = time.monotonic()
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
                if self._ringbuf_fd >= 0 and reading == reader.congested():
                    reading = not reading
                    poller.modify(self._ringbuf_fd, select.POLLIN if reading else 0)
                poller.poll(reader.gather(reader.wait_ms()))
                self._drain_wake()
                self.step()
                reasons = self._take_reload_requests()
                if reasons and not self._stop:
                    self.reload(reasons)
        finally:
            self.shutdown()
        return ExitCode.OK

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

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def step(self) -> None:
        """One round of the event reader (guard.events.reader)."""
        with self._lock:
            self._lost_reported(self.events.round(self._consume(), self._kernel_lost))

    def _consume(self) -> Callable[[], object] | None:
        kernel = self.kernel
        return kernel.bpf.ring_buffer_consume if kernel is not None else None

    def _kernel_lost(self) -> int | None:
        return self.kernel_stat(layout.STAT_EVENTS_LOST)

    def _lost_reported(self, total: int) -> None:
        if total >= 0:
            self.persistence.lost_reported(total)

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
            loaded = (Diagnostic(Location(self.policies, 1, 1), Code.INTERNAL_ERROR,
                                 f"reading the policies failed: {type(error).__name__}: "
                                 f"{error}"),)
        if not isinstance(loaded, PolicyLoad):
            errors = [str(d) for d in loaded if d.severity == "error"]
            outcome.errors = _capped(errors)
            self._reload_failed(outcome, f"{len(errors)} error(s) in the policies")
            return False
        outcome.revision = str(loaded.revision)
        assert self.applier is not None
        self._check_paths(loaded.plan)
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
            # counts follow what a rule says: a changed rule starts from zero
            before = self.current.policy_set if self.current else None
            self.events.rule_hits = carry_hits(before, loaded.policy_set,
                                               self.events.rule_hits)
            self.events.event_counts = carry_event_counts(before, loaded.policy_set,
                                                          self.events.event_counts)
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
            return (Diagnostic(Location(self.policies, 1, 1), Code.READ_ERROR,
                               f"the policy directory {what}"),)
        return load_policies(self.policies, self.host_cgroup,
                             unit_lookup=systemd_unit_cgroups)

    def _reload_failed(self, outcome: ReloadOutcome, why: str) -> None:
        kept = str(self.current.revision) if self.current else "none"
        outcome.summary = f"rejected ({why}); still enforcing revision {kept}"
        with self._lock:
            self.last_reload = self.last_reload_error = outcome
            self.reloads += 1
            self.reload_errors += 1
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
            self._lost_reported(self.events.drain(self._consume(), self._kernel_lost))
            kept = self._release_pins()
            self._close_kernel()
        self.say(SEV_INFO, "stop", f"stopped; enforcement stays pinned in {kept} (fail-closed; "
                 "`guard stop --unload` removes it)" if kept else "stopped; every program detached")
        self.sink.close(timeout=2.0)
        self.hub.close()
        self.control.close()
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
        self.control.close()

    # -- status --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything ``guard status`` shows; safe to call from the status thread."""
        with self._lock:
            return daemon_status(self)

    # -- control (guard.service.control) ---------------------------------------------

    def _on_status(self, _body: Mapping[str, Any], _caller: Caller) -> dict[str, Any]:
        return {"ok": True, "status": self.status()}

    def _on_stop(self, body: Mapping[str, Any], _caller: Caller) -> dict[str, Any]:
        """guard stop [--unload]; the caller was authorized by the control server."""
        self._unload = bool(body.get("unload"))
        self.request_stop()
        return {"ok": True, "pid": os.getpid(), "unload": self._unload,
                "pins": self.persistence.status()}

    def _authorize(self, caller: Caller) -> str | None:
        """The scope rule for changing commands (the same as bpf/tamper.bpf.c's):
        a caller covered by a policy's own scope, rather than only by the
        whole-host scope, is confined and may not switch guard off."""
        with self._lock:
            current = self.current
        if current is None or caller.cgroup is None:
            return None if caller.cgroup is not None else "its cgroup is unknown"
        found = ruleset_for(current.plan, caller.cgroup)
        if found is None or found[1].cgroup == normalize_cgroup(self.host_cgroup):
            return None
        return (f"pid {caller.pid} runs in {caller.cgroup}, inside the policy scope "
                f"{found[1].cgroup}")

    def _refused(self, caller: Caller, command: str, reason: str) -> None:
        """A refused control request, reported like the kernel's tamper events."""
        event = AuditEvent(time_ns=time.time_ns(), action="deny", kind="tamper",
                           hook="control", pid=caller.pid, tid=caller.pid, ppid=caller.ppid,
                           uid=caller.uid, comm=printable_text(caller.comm),
                           exe=printable_text(caller.exe),
                           cgroup=printable_text(caller.cgroup or ""),
                           path=f"guard {command} via the control socket")
        with self._lock:
            self.events.send(event)
        self.say(SEV_WARNING, "tamper", f"refused {command!r} from pid {caller.pid} "
                 f"({printable_text(caller.comm)}): {printable_text(reason)}")
        self.request_wake()

def _capped(errors: list[str]) -> list[str]:
    if len(errors) <= MAX_ERROR_LINES:
        return errors
    return [*errors[:MAX_ERROR_LINES], f"... and {len(errors) - MAX_ERROR_LINES} more errors"]


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
        return ExitCode.USAGE
    problem = (startup.policies_dir_problem(args.policies)
               or startup.host_cgroup_problem(args.host_cgroup))
    if problem:
        print(f"guard run: {problem}", file=sys.stderr)
        return ExitCode.USAGE
    logging.basicConfig(level=logging.WARNING, format="guard: %(message)s", stream=sys.stderr)
    startup.quiet_repeated_loggers()
    sink = Sink(target, queue_size=int(_setting(args, "syslog_queue", "GUARD_SYSLOG_QUEUE",
                                                10_000)))
    daemon = Daemon(args.policies, args.host_cgroup, args.state_dir, sink,
                    aggregate_window=_setting(args, "aggregate_window",
                                              "GUARD_AGGREGATE_WINDOW", 1.0),
                    watch=not getattr(args, "no_watch", False),
                    pin_dir=getattr(args, "pin_dir", None),
                    fail_open=getattr(args, "fail_open", False))
    metrics = startup.metrics_server(getattr(args, "metrics", None), daemon, sys.stderr)
    if metrics is False:
        daemon.abort()
        return ExitCode.USAGE
    # Signals first: a SIGTERM during the (slow) compile must still end cleanly.
    daemon.install_signals()
    try:
        code = daemon.start()
        if code != ExitCode.OK:
            daemon.abort()
            return code
        return daemon.serve()  # returns at once, cleanly, if SIGTERM came during the start
    finally:
        if metrics:
            metrics.close()


__all__ = ["Daemon", "ReloadOutcome", "run"]
