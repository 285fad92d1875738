"""What guard's network programs cost per run, by the kernel's own accounting.

    sudo .venv/bin/python tests/host/netcost.py [--connects N] [--rounds R] [--rules K,K]

For each rule count it loads the net programs on a cgroup of its own, applies
the bench's plan (tests/bench/plans.py: egress ``default: allow`` and one TCP
deny rule listing K /32 destinations no traffic goes to) scoped to one child
cgroup, and runs the bench's probe (``connect ADDR PORT N``: socket, connect,
close with RST) from three cgroups, in a shuffled order per round:

    none      outside the programs' cgroup: no guard program runs (the baseline)
    scoped    under the programs and in the plan's scope: judged
    unscoped  under the programs, in no scope: every program runs and finds nothing

Per program it reports run_time_ns / run_cnt over the scoped and the unscoped
runs (BPF_ENABLE_STATS: the kernel times every run while the returned fd is
open, nothing global is left switched on), and the median connect() wall time
of each cgroup with the per-round ratio to ``none``. The wall times come from a
shared, busy machine; the run times are the programs' own and hardly move with
load: trust those.

Everything it makes (cgroups, two network namespaces, the servers, the
programs' links) is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: support, bench

from bench import plans, probe
from bench.lab import ACCEPT_PORT, PEER_ADDR, NetLab, enter
from support.cgroup import TestCgroup

from guard.kernel.apply import Applier
from guard.kernel.loader import NET_PROGRAMS, Kernel
from guard.layout import BPF_DIR

BPF_SYSCALL_X86_64 = 321
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
GROUPS = ("none", "scoped", "unscoped")


@contextmanager
def run_time_stats() -> Iterator[None]:
    """Kernel run-time accounting of every BPF program while the block runs."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 4)(BPF_STATS_RUN_TIME)
    fd = int(libc.syscall(BPF_SYSCALL_X86_64, BPF_ENABLE_STATS, attr, ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_ENABLE_STATS: {os.strerror(err)}")
    try:
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Counters:
    run_time_ns: int
    run_cnt: int


def counters(fd: int) -> Counters:
    """run_time_ns and run_cnt of a program, from its fd's fdinfo."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("run_time_ns", "run_cnt"):
            fields[key] = int(value.strip())
    return Counters(fields.get("run_time_ns", 0), fields.get("run_cnt", 0))


def program_fds(kernel: Kernel) -> dict[str, int]:
    return {p.function: int(kernel.bpf.funcs[p.function.encode()].fd) for p in NET_PROGRAMS}


@dataclass
class Tally:
    ns: int = 0
    runs: int = 0

    def add(self, before: Counters, after: Counters) -> None:
        self.ns += after.run_time_ns - before.run_time_ns
        self.runs += after.run_cnt - before.run_cnt

    def per_run(self) -> float | None:
        return self.ns / self.runs if self.runs else None


def measure(kernel: Kernel, lab: NetLab, binary: Path, groups: dict[str, TestCgroup],
            connects: int, rounds: int) -> dict[str, Any]:
    fds = program_fds(kernel)
    tallies = {g: {name: Tally() for name in fds} for g in GROUPS}
    medians: dict[str, list[float]] = {g: [] for g in GROUPS}
    ratios: dict[str, list[float]] = {g: [] for g in GROUPS}
    connects_done = dict.fromkeys(GROUPS, 0)
    for _ in range(rounds):
        order = list(GROUPS)
        random.shuffle(order)
        this_round: dict[str, float] = {}
        for group in order:
            before = {name: counters(fd) for name, fd in fds.items()}
            res = probe.run(binary, ["connect", PEER_ADDR, str(ACCEPT_PORT), str(connects), "30"],
                            90, preexec=enter(groups[group], lab.client_ns))
            after = {name: counters(fd) for name, fd in fds.items()}
            for name in fds:
                tallies[group][name].add(before[name], after[name])
            if not res.get("n"):
                raise RuntimeError(f"{group}: no connect succeeded: {res}")
            connects_done[group] += int(res["n"])
            this_round[group] = float(res["median_ns"])
            medians[group].append(float(res["median_ns"]))
        for group in GROUPS:
            ratios[group].append(this_round[group] / this_round["none"])
    return {
        "connects": connects_done,
        "ns_per_run": {g: {n: t.per_run() for n, t in tallies[g].items()} for g in GROUPS},
        "runs_per_connect": {g: {n: t.runs / connects_done[g] for n, t in tallies[g].items()}
                             for g in GROUPS},
        "connect_median_us": {g: statistics.median(medians[g]) / 1000 for g in GROUPS},
        "overhead_pct": {g: (statistics.median(ratios[g]) - 1) * 100 for g in GROUPS},
    }


def report(k: int, result: dict[str, Any]) -> str:
    lines = [f"rules {k:,}:"]
    for group in ("scoped", "unscoped"):
        per_run = result["ns_per_run"][group]
        runs = result["runs_per_connect"][group]
        parts = [f"{name.removeprefix('guard_')} {per_run[name]:.0f} ns x {runs[name]:.2f}"
                 for name in per_run if per_run[name] is not None]
        lines.append(f"  {group:9s} per run: " + ", ".join(parts))
    for group in GROUPS:
        lines.append(f"  {group:9s} connect median {result['connect_median_us'][group]:.2f} us, "
                     f"overhead {result['overhead_pct'][group]:+.1f}% (median of round ratios)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--connects", type=int, default=2000, help="connects per cgroup per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rules", default="0,10000", help="rule counts, comma-separated")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--bpf-dir", type=Path, default=BPF_DIR,
                        help="the program sources (to measure a variant)")
    args = parser.parse_args(argv)
    counts = [int(k) for k in args.rules.split(",")]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="guard-netcost-") as work:
        binary = probe.build(Path(work))
        with TestCgroup.create("guard-netcost") as top, NetLab(binary).build() as lab:
            groups = {"none": top.child("none")}
            attached = top.child("guard")
            groups["scoped"] = attached.child("scoped")
            groups["unscoped"] = attached.child("unscoped")
            with Kernel(families={"net"}, host_cgroup=attached.path,
                        bpf_dir=args.bpf_dir) as kernel, run_time_stats():
                applier = Applier(kernel)
                lab.add_peer_address(plans.blocked_address(0))
                for k in counts:
                    applier.apply(plans.net_plan(groups["scoped"].path, k))
                    # prove the plan is in force: the first blocked address is refused
                    if k:
                        tried = probe.run(binary, ["try-connect", plans.blocked_address(0),
                                                   str(ACCEPT_PORT), "500"], 30,
                                          preexec=enter(groups["scoped"], lab.client_ns))
                        if tried.get("result") == "connected":
                            raise RuntimeError(f"rules {k}: a blocked destination connected")
                    result = measure(kernel, lab, binary, groups, args.connects, args.rounds)
                    out[str(k)] = result
                    print(report(k, result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
