"""What one benchmark run measured, as values, and its JSON file.

Every number has a ``status``: "ok" when measured, otherwise why not ("not yet
available: ...", "skipped: ...", "failed: ..."). A missing measurement is
never given a number.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

OK = "ok"

# metric -> (title, unit, higher is better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "connect": ("TCP connect() latency", "us", False),
    "throughput": ("TCP throughput over veth", "Gbit/s", True),
    "exec": ("fork + exec /usr/bin/true", "us", False),
    "exec-spawn": ("posix_spawn /usr/bin/true from Python (bench_exec.py)", "us", False),
    "open": ("open()+close(), path matching no rule", "us", False),
    "open-match": ("open()+close(), path matching an audit rule", "us", False),
    "open-bpf": ("file_open program's own time, path matching no rule", "us", False),
    "open-match-bpf": ("file_open program's own time, path matching an audit rule", "us",
                       False),
}
# engine -> label, in the order tables and plots show them
ENGINES: dict[str, str] = {
    "guard": "guard",
    "iptables": "iptables chain",
    "nft-chain": "nft chain",
    "nft-set": "nft set",
    "landlock": "Landlock",
}


@dataclass(frozen=True)
class Overhead:
    """One engine at one rule count on one metric, against no enforcement."""

    metric: str  # a key of METRICS
    engine: str  # a key of ENGINES
    rules: int
    value: float | None = None  # the engine's median of round medians, in the metric's unit
    baseline: float | None = None  # no enforcement, same rounds
    ratio: float | None = None  # median over rounds of the per-round cost ratio
    rounds: int = 0
    status: str = OK
    note: str = ""
    per_round: list[float] = field(default_factory=list)  # the ratio of each round


@dataclass(frozen=True)
class ApplyTime:
    rules: int
    entries: int  # map entries one slot holds
    initial_ms: float | None  # first apply into empty maps, to enforced
    to_enforced_ms: float | None  # median over reloads: fill the idle slot + flip
    to_enforced_p99_ms: float | None
    total_ms: float | None  # median of the whole apply() call (settle + clearing the old slot)
    repeats: int = 0
    status: str = OK


@dataclass(frozen=True)
class ReloadLatency:
    policy_rules: int
    trigger: str  # "watcher" or "SIGHUP"
    edits: int
    median_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    failures: int = 0  # edits whose verdict was not seen within the timeout
    status: str = OK


@dataclass(frozen=True)
class DaemonStart:
    rules: int
    ready_s: float | None
    vmrss_mb: float | None  # after READY and guard's release after load
    vmhwm_mb: float | None  # the peak: the compile at start
    status: str = OK
    # The daemon's own share: RssAnon (/proc/PID/status), Pss and Private_Clean +
    # Private_Dirty (/proc/PID/smaps_rollup); None in results made before they were kept.
    rssanon_mb: float | None = None
    pss_mb: float | None = None
    private_mb: float | None = None


@dataclass(frozen=True)
class AuditRun:
    workload: str  # "distinct" (every event another port) or "identical"
    offered_rate: int  # datagrams/s asked of the client; 0: as fast as it goes
    sent: int  # datagrams sent = events the kernel made
    send_s: float  # how long sending took
    drain_s: float  # from the first datagram until every event was in a line or counted
    lines: int  # guard event lines rsyslogd wrote
    events_in_lines: int  # sum of the lines' counts
    lost_ringbuf: int
    lost_reader: int
    lost_sink: int
    unaccounted: int  # sent - events_in_lines - lost_*: must be 0
    status: str = OK

    @property
    def lost(self) -> int:
        return self.lost_ringbuf + self.lost_reader + self.lost_sink

    @property
    def events_per_s(self) -> float:
        """Events accounted for (in a line or counted lost) per second, end to end."""
        return (self.events_in_lines + self.lost) / self.drain_s if self.drain_s > 0 else 0.0


@dataclass
class Results:
    meta: dict[str, Any] = field(default_factory=dict)
    overhead: list[Overhead] = field(default_factory=list)
    apply: list[ApplyTime] = field(default_factory=list)
    reload: list[ReloadLatency] = field(default_factory=list)
    daemon: list[DaemonStart] = field(default_factory=list)
    audit: list[AuditRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Results:
        raw = json.loads(text)

        def rows(kind: type[Any], key: str) -> list[Any]:
            names = {f.name for f in fields(kind)}
            return [kind(**{k: v for k, v in item.items() if k in names})
                    for item in raw.get(key, [])]

        return cls(
            meta=dict(raw.get("meta", {})),
            overhead=rows(Overhead, "overhead"),
            apply=rows(ApplyTime, "apply"),
            reload=rows(ReloadLatency, "reload"),
            daemon=rows(DaemonStart, "daemon"),
            audit=rows(AuditRun, "audit"),
            notes=list(raw.get("notes", [])),
        )

    def merge(self, other: Results) -> None:
        """Add another part's rows (the guest's) to this run."""
        self.overhead.extend(other.overhead)
        self.apply.extend(other.apply)
        self.reload.extend(other.reload)
        self.daemon.extend(other.daemon)
        self.audit.extend(other.audit)
        self.notes.extend(other.notes)
        for key, value in other.meta.items():
            self.meta.setdefault(key, value)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)


def _key(row: Any) -> tuple[Any, ...]:
    if isinstance(row, Overhead):
        return ("overhead", row.metric, row.engine, row.rules)
    if isinstance(row, AuditRun):
        return ("audit", row.workload, row.offered_rate)
    if isinstance(row, ReloadLatency):
        return ("reload", row.policy_rules)
    return (type(row).__name__, row.rules)


def combine(runs: list[Results]) -> Results:
    """Several runs on one machine as one report: a later run's row replaces an earlier
    run's row for the same measurement (a part run again after a fix). Every ratio
    still comes from one run's interleaved rounds; meta["runs"] lists the runs."""
    out = Results(meta=dict(runs[0].meta) if runs else {})
    out.meta["runs"] = [r.meta.get("started", "?") for r in runs]
    sections = ("overhead", "apply", "reload", "daemon", "audit")
    for name in sections:
        rows: dict[tuple[Any, ...], Any] = {}
        for run in runs:
            for row in getattr(run, name):
                rows[_key(row)] = row
        setattr(out, name, list(rows.values()))
    for run in runs:
        for key, value in run.meta.items():
            if key not in ("started", "duration_s", "config", "mode", "loadavg_start",
                           "loadavg_end"):
                out.meta.setdefault(key, value)
        out.notes += [f"[run {run.meta.get('started', '?')}] {n}" for n in run.notes]
        out.meta.setdefault("loadavg", []).append(
            {"run": run.meta.get("started"), "start": run.meta.get("loadavg_start"),
             "end": run.meta.get("loadavg_end"), "duration_s": run.meta.get("duration_s"),
             "mode": run.meta.get("mode")})
    return out

