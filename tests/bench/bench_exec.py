"""Exec latency under guard's exec programs: none vs 0, 100 and 10,000 exec rules.

Not a test: a measurement, printed as a table of ratios. It needs BPF-LSM, so
it runs in the QEMU guest; from the host it boots one guest and runs itself in
it (as root, after ./scripts/setup)::

    .venv/bin/python tests/bench/bench_exec.py [-n 2000] [--max-s 90]

Inside the guest (or on any machine whose kernel runs BPF-LSM programs)::

    .venv/bin/python tests/bench/bench_exec.py --inside

What one sample is: posix_spawn of /usr/bin/true plus waitpid, from a process
in the policy's scope cgroup, so each sample includes bprm_check_security and
the mmap_file checks of the loader mapping true and libc. Configurations:

    no guard        programs not loaded (measured before loading and after
                    closing; the ratios use the mean of the two medians)
    guard, K rules  programs loaded; one enforcing policy scoped to the cgroup
                    with K - 1 exact deny rules (files that exist, none is true)
                    plus one subtree deny rule, so every exec also walks the
                    parent directories of /usr/bin/true; K = 0 is an exec
                    section with no rules (the default only)

N samples per configuration (default 2000), each configuration bounded by
--max-s seconds; medians and 90th percentiles in microseconds. Under TCG
(software emulation) absolute numbers are slow and noisy; the ratios are
what to read.

A second table is the programs' own cost, independent of how long the rest of
an exec takes: with kernel.bpf_stats_enabled on, each program's fdinfo counts
its runs and the time spent in them (run_cnt, run_time_ns); the deltas over a
configuration give nanoseconds per call of each hook.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script: guard from this checkout

from guard.kernel.cgroups import cgroup2_mount  # noqa: E402
from guard.policy.compile import compile_policies  # noqa: E402
from guard.policy.model import PolicySet  # noqa: E402
from guard.policy.parse import parse_text  # noqa: E402
from guard.policy.plan import Plan  # noqa: E402

TRUE = "/usr/bin/true"
RULE_COUNTS = (0, 100, 10_000)
LSM_APPEND = "lsm=lockdown,capability,landlock,bpf"
KERNEL_FILE = Path(os.environ.get("GUARD_SETUP_STATE", "/var/lib/guard-dev")) / "guest-kernel"


@dataclass(frozen=True)
class Sample:
    label: str
    rules: int | None  # None: no guard
    n: int
    median_us: float
    p90_us: float
    apply_s: float | None = None


def measure(label: str, rules: int | None, n: int, max_s: float) -> Sample:
    """posix_spawn + waitpid of true, n times or until max_s seconds have passed."""
    times: list[float] = []
    deadline = time.monotonic() + max_s
    for _ in range(n):
        start = time.perf_counter_ns()
        pid = os.posix_spawn(TRUE, [TRUE], {})
        _, status = os.waitpid(pid, 0)
        times.append((time.perf_counter_ns() - start) / 1000)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{TRUE} exited with {status} under {label}")
        if time.monotonic() > deadline:
            break
    ordered = sorted(times)
    return Sample(label, rules, len(times), statistics.median(ordered),
                  ordered[int(0.9 * (len(ordered) - 1))])


STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


@dataclass(frozen=True)
class HookCost:
    rules: int
    hook: str
    calls: int
    ns_per_call: float


def program_counters(bpf: Any) -> dict[str, tuple[int, int]]:
    """Per loaded program: (run_cnt, run_time_ns) from its fd's fdinfo."""
    from guard.kernel.resolve import parse_fdinfo

    found: dict[str, tuple[int, int]] = {}
    for name, fn in bpf.funcs.items():
        info = parse_fdinfo(Path(f"/proc/self/fdinfo/{fn.fd}").read_text())
        label = name.decode().removeprefix("lsm__")
        found[label] = (info.get("run_cnt", 0), info.get("run_time_ns", 0))
    return found


def hook_costs(rules: int, before: dict[str, tuple[int, int]],
               after: dict[str, tuple[int, int]]) -> list[HookCost]:
    costs: list[HookCost] = []
    for hook in sorted(after):
        calls = after[hook][0] - before.get(hook, (0, 0))[0]
        spent = after[hook][1] - before.get(hook, (0, 0))[1]
        costs.append(HookCost(rules, hook, calls, spent / calls if calls else 0.0))
    return costs


def cost_table(costs: list[HookCost]) -> str:
    rows = [("rules", "hook", "calls", "ns/call")]
    rows += [(f"{c.rules:,}", c.hook, str(c.calls), f"{c.ns_per_call:.0f}") for c in costs]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.rjust(w) if i != 1 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in rows)


def policy_text(scope: str, exact: list[str], subtree: str | None) -> str:
    paths = [*exact, *([f"{subtree}/**"] if subtree else [])]
    lines = ["apiVersion: guard/v1", "kind: Policy", "metadata:", "  name: bench-exec",
             "spec:", "  mode: enforce", "  scope:", f"    cgroups: [{scope}]", "  exec:",
             "    default: allow"]
    if paths:
        lines += ["    rules:", "      - action: deny", "        paths:"]
        lines += [f'          - "{p}"' for p in paths]
    else:
        lines.append("    rules: []")
    return "\n".join(lines) + "\n"


def plan_for(scope: str, k: int, base: Path) -> Plan:
    exact = []
    rule_dir = base / "rules"
    rule_dir.mkdir(parents=True, exist_ok=True)
    for i in range(max(k - 1, 0)):
        path = rule_dir / f"f{i:05d}"
        path.touch()
        exact.append(str(path))
    subtree = None
    if k:
        (base / "denied").mkdir(exist_ok=True)
        subtree = str(base / "denied")
    policies, diagnostics = parse_text(policy_text(scope, exact, subtree), "bench.yaml")
    if diagnostics:
        raise RuntimeError("\n".join(str(d) for d in diagnostics))
    return compile_policies(PolicySet(tuple(policies)))


@contextmanager
def own_cgroup() -> Iterator[str]:
    """Move this process into a fresh cgroup (children inherit it); back out at the end."""
    mount = cgroup2_mount()
    name = f"guard-bench-exec-{uuid.uuid4().hex[:8]}"
    directory = mount / name
    directory.mkdir()
    original = Path(f"/proc/{os.getpid()}/cgroup").read_text().split("::", 1)[1].strip()
    try:
        (directory / "cgroup.procs").write_text(str(os.getpid()))
        yield f"/{name}"
    finally:
        (mount / original.lstrip("/") / "cgroup.procs").write_text(str(os.getpid()))
        directory.rmdir()


def inside(n: int, max_s: float, log: Callable[[str], None],
           costs: list[HookCost] | None = None) -> list[Sample]:
    """The samples; with ``costs``, also each hook's own run time per rule count."""
    from guard.kernel.apply import Applier
    from guard.kernel.loader import Kernel

    samples: list[Sample] = []
    base = Path(tempfile.mkdtemp(prefix="guard-bench-exec-"))
    try:
        with own_cgroup() as scope:
            measure("warm-up", None, min(n, 100), max_s)
            samples.append(measure("no guard (before)", None, n, max_s))
            log(f"no guard: median {samples[-1].median_us:.0f} us; loading the programs")
            started = time.monotonic()
            kernel: Any = Kernel(families={"exec"})
            log(f"compiled and loaded in {time.monotonic() - started:.1f} s")
            try:
                applier = Applier(kernel, settle_s=0.0)
                for k in RULE_COUNTS:
                    plan = plan_for(scope, k, base)
                    started = time.monotonic()
                    result = applier.apply(plan)
                    apply_s = time.monotonic() - started
                    if result.warnings:
                        raise RuntimeError(f"apply warned: {result.warnings[:3]}")
                    if k:  # proof that it enforces: the subtree denies a copy of true
                        denied = base / "denied" / "true"
                        shutil.copy2(TRUE, denied)
                        try:
                            os.posix_spawn(str(denied), [str(denied)], {})
                            raise RuntimeError("guard did not deny exec under its subtree")
                        except PermissionError:
                            pass
                    before = program_counters(kernel.bpf)
                    sample = measure(f"guard, {k:,} rules", k, n, max_s)
                    if costs is not None:
                        costs += hook_costs(k, before, program_counters(kernel.bpf))
                    samples.append(Sample(sample.label, k, sample.n, sample.median_us,
                                          sample.p90_us, apply_s))
                    log(f"{k:,} rules: apply {apply_s:.2f} s, median {sample.median_us:.0f} us")
                applier.apply(plan_for(scope, 0, base))
            finally:
                kernel.close()
            samples.append(measure("no guard (after)", None, n, max_s))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return samples


def table(samples: list[Sample]) -> str:
    baselines = [s.median_us for s in samples if s.rules is None]
    base = statistics.mean(baselines)
    rows = [("configuration", "n", "median us", "p90 us", "ratio", "apply s")]
    for s in samples:
        ratio = s.median_us / base
        rows.append((s.label, str(s.n), f"{s.median_us:.0f}", f"{s.p90_us:.0f}",
                     f"{ratio:.3f}", "" if s.apply_s is None else f"{s.apply_s:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.append(f"ratio: median over the mean of the no-guard medians ({base:.0f} us); "
                 f"fork+exec of {TRUE} by posix_spawn, in the policy's scope cgroup")
    return "\n".join(lines)


def boot_guest(args: argparse.Namespace) -> int:
    """From the host: one guest boot running this file with --inside."""
    release = os.environ.get("GUARD_GUEST_KERNEL", "").strip() or KERNEL_FILE.read_text().strip()
    vng = Path(sys.executable).parent / "vng"
    inner = " ".join([
        "mount -t securityfs securityfs /sys/kernel/security 2>/dev/null;",
        "cd", shlex.quote(str(ROOT)), "&&", "PYTHONDONTWRITEBYTECODE=1", "exec",
        shlex.quote(sys.executable), shlex.quote(str(Path(__file__).resolve())), "--inside",
        "-n", str(args.n), "--max-s", str(args.max_s),
    ])
    cmd = [str(vng), "--run", f"/boot/vmlinuz-{release}", "--disable-kvm", "--memory", "2G",
           "--cpus", "2", "--append", LSM_APPEND, "--", inner]
    env = {**os.environ, "PATH": f"{vng.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    limit = 900 + 6 * args.max_s  # compiling alone took 220 s on a busy machine
    try:
        return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, timeout=limit,
                              start_new_session=True).returncode
    except subprocess.TimeoutExpired:
        print(f"bench_exec: the guest overran {limit:.0f} s", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inside", action="store_true",
                        help="measure here (a kernel with BPF-LSM); default: boot the guest")
    parser.add_argument("-n", type=int, default=2000, help="samples per configuration")
    parser.add_argument("--max-s", type=float, default=90.0,
                        help="time bound per configuration, seconds")
    args = parser.parse_args(argv)
    if not args.inside:
        return boot_guest(args)

    def log(text: str) -> None:
        print(f"bench_exec: {text}", file=sys.stderr, flush=True)

    costs: list[HookCost] = []
    stats_were = STATS_SYSCTL.read_text().strip() if STATS_SYSCTL.exists() else None
    if stats_were is not None:
        STATS_SYSCTL.write_text("1")
    try:
        samples = inside(args.n, args.max_s, log, costs)
    finally:
        if stats_were is not None:
            STATS_SYSCTL.write_text(stats_were)
    print(table(samples), flush=True)
    if costs:
        print("\nthe programs' own run time (kernel.bpf_stats_enabled), per call of each hook "
              "while the scoped process spawned true:\n" + cost_table(costs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
