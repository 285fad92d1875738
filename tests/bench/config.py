"""How much the bench measures: the full run (~20 minutes) and ``--quick`` (~3 minutes).

Every loop is bounded by a count and a time; the sizes here are what keeps the
whole run inside its budget on a 2-core machine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

PARTS = ("net", "apply", "daemon", "reload", "audit", "guest")


@dataclass(frozen=True)
class Config:
    quick: bool = False
    parts: tuple[str, ...] = PARTS
    seed: int = 1  # the order of engines within a round is shuffled with this seed
    # network overhead (host)
    net_rules: tuple[int, ...] = (0, 100, 1_000, 10_000, 100_000)
    rounds: int = 7
    connect_count: int = 1_500  # connects per engine per round ...
    connect_max_s: float = 0.6  # ... or this long, whichever ends first
    stream_s: float = 0.5  # TCP throughput: seconds per engine per round
    # guard.kernel.apply
    apply_rules: tuple[int, ...] = (10, 1_000, 10_000, 100_000)
    apply_repeats: int = 10
    # the daemon: start to READY and memory
    daemon_rules: tuple[int, ...] = (10, 10_000, 100_000)
    daemon_timeout_s: float = 300.0
    # save-to-enforced
    reload_rules: tuple[int, ...] = (10, 1_000)
    reload_edits: int = 30
    reload_timeout_s: float = 10.0  # one edit's verdict not seen after this: a failure
    # audit throughput
    audit_rates: tuple[int, ...] = (10_000, 25_000, 50_000, 100_000, 0)  # 0: flat out
    audit_seconds: float = 2.0
    audit_drain_s: float = 60.0
    # the guest (exec, open)
    guest_rules: tuple[int, ...] = (0, 100, 10_000, 100_000)
    guest_metrics: tuple[str, ...] = ("exec", "open")  # which halves of the guest part run
    guest_rounds: int = 5
    exec_count: int = 400
    exec_max_s: float = 2.5
    open_count: int = 40_000
    open_batch: int = 64
    open_max_s: float = 0.6
    exec_spawn_samples: int = 300  # bench_exec.py's measurement in the same boot; 0: skip it
    exec_spawn_max_s: float = 15.0
    guest_timeout_s: float = 1_500.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        raw: dict[str, Any] = json.loads(text)
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in raw.items()}
        return cls(**values)


FULL = Config()
QUICK = replace(
    FULL, quick=True, net_rules=(0, 100, 10_000), rounds=3, connect_count=400,
    connect_max_s=0.25, stream_s=0.2, apply_rules=(10, 1_000, 10_000), apply_repeats=4,
    daemon_rules=(10, 1_000), daemon_timeout_s=90.0, reload_rules=(10,), reload_edits=8,
    audit_rates=(10_000, 0), audit_seconds=1.0, audit_drain_s=30.0,
    guest_rules=(0, 100), guest_rounds=3, exec_count=100, exec_max_s=0.8, open_count=10_000,
    open_max_s=0.3, exec_spawn_samples=0, guest_timeout_s=900.0,
)
