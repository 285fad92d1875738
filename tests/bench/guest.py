"""The guest half of the bench: exec and open() overhead, in ONE BPF-LSM guest boot.

Host side (``run_guest``): boot the guest kernel once with virtme-ng (as
tests/guestharness.py does, TCG, ``lsm=...,bpf``), run ``python -m bench
guest-part RWDIR`` in it, stream its progress, and read ``RWDIR/results.json``
(written after each step, so a guest that overruns its time still reports what
it measured). The guest is killed at ``guest_timeout_s``.

Guest side (``guest_main``): compile guard's LSM programs once (the expensive
part under emulation), then per rule count apply the rules and measure, in
rounds of shuffled order:

    none      guard's LSM programs detached (bcc re-attaches the loaded programs
              in a syscall, no recompile), the process in a plain cgroup
    guard     programs attached, the process in the policy's scope cgroup
    landlock  programs detached, the process restricted by a Landlock ruleset

The rule sets: guard denies exec of k paths (k - 1 files that exist, plus one
subtree), none of which the measured binary is; Landlock, an allowlist only,
allows exec of the same k - 1 files plus /usr and the probe's directory. For
open(): guard audits reads of the same k - 1 files plus a subtree; the measured
file is outside them (non-matching) or inside the subtree (matching).
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from bench import landlock, plans, probe
from bench.config import Config
from bench.host import overhead_rows, quiet_stderr
from bench.lab import enter
from bench.results import OK, Overhead, Results

ROOT = Path(__file__).resolve().parents[2]
BASE = Path("/tmp/guard-bench")  # in the guest: a writable overlay that vanishes with it
Log = Callable[[str], None]
NOT_YET = "not yet available: bpf/files.bpf.c does not exist in this checkout"


# --- host side ----------------------------------------------------------------------------


def vng_command(rwdir: Path, kernel: str) -> list[str]:
    from guestharness import LSM_APPEND

    vng = Path(sys.executable).parent / "vng"
    if not vng.exists():
        found = shutil.which("vng")
        if found is None:
            raise RuntimeError("vng (virtme-ng) is not installed: run ./scripts/setup")
        vng = Path(found)
    inner = " ".join([
        "cd", shlex.quote(str(ROOT / "tests")), "&&", "GUARD_IN_GUEST=1",
        "PYTHONDONTWRITEBYTECODE=1", "exec", shlex.quote(sys.executable), "-m", "bench",
        "guest-part", shlex.quote(str(rwdir)),
    ])
    return [str(vng), "--run", f"/boot/vmlinuz-{kernel}", "--disable-kvm",
            "--memory", os.environ.get("GUARD_GUEST_MEMORY", "2G"),
            "--cpus", os.environ.get("GUARD_GUEST_CPUS", "2"),
            "--append", LSM_APPEND, "--rwdir", str(rwdir), "--", inner]


def guest_kernel() -> str:
    from guestharness import KERNEL_FILE

    release = os.environ.get("GUARD_GUEST_KERNEL", "").strip()
    if not release:
        release = KERNEL_FILE.read_text().strip()
    if not Path(f"/boot/vmlinuz-{release}").is_file():
        raise RuntimeError(f"/boot/vmlinuz-{release} is missing: run ./scripts/setup")
    return release


def run_guest(cfg: Config, binary: Path, log: Log) -> Results:
    """One guest boot; its results (rows marked failed when the guest did not finish)."""
    rwdir = Path(tempfile.mkdtemp(prefix="guard-bench-guest-"))
    (rwdir / "config.json").write_text(cfg.to_json())
    (rwdir / "probe").write_text(str(binary))
    cmd = vng_command(rwdir, guest_kernel())
    env = dict(os.environ)
    env["PATH"] = f"{Path(cmd[0]).parent}{os.pathsep}{env.get('PATH', '')}"
    started = time.monotonic()
    failure = None
    with open(rwdir / "console.log", "wb") as console:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=str(ROOT), env=env,
                                start_new_session=True)
        assert proc.stdout is not None
        stdout = proc.stdout

        def pump() -> None:
            for line in iter(stdout.readline, b""):
                console.write(line)
                console.flush()
                text = line.decode(errors="replace").rstrip()
                if text.startswith("bench guest: "):
                    log(text[len("bench guest: "):])

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=cfg.guest_timeout_s)
        except subprocess.TimeoutExpired:
            failure = f"the guest overran {cfg.guest_timeout_s:.0f} s and was killed"
        finally:
            if proc.poll() is None:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=10)
                        break
            reader.join(timeout=10)
    log(f"guest: ran {time.monotonic() - started:.0f} s")
    path = rwdir / "results.json"
    results = Results.from_json(path.read_text()) if path.exists() else Results()
    if failure is None and not results.meta.get("guest_finished"):
        failure = f"the guest stopped before it finished (vng exit {proc.returncode})"
    if failure is not None:
        results.notes.append(f"guest: {failure}; console: {rwdir / 'console.log'}")
        log(f"guest: {failure}; its output is kept in {rwdir}")
    else:
        shutil.rmtree(rwdir, ignore_errors=True)
    return results


# --- guest side -----------------------------------------------------------------------------


class Lsm:
    """Attach or detach every LSM program of loaded Kernels, without recompiling."""

    def __init__(self, kernels: list[Any]) -> None:
        self.programs: list[tuple[Any, bytes]] = []
        for kernel in kernels:
            self.add(kernel)

    def add(self, kernel: Any) -> None:
        self.programs += [(kernel.bpf, name) for name in list(kernel.bpf.lsm_fds)]

    def set(self, on: bool) -> None:
        for bpf, name in self.programs:
            if getattr(bpf, "module", None) is None:
                continue  # that Kernel is closed already (teardown order)
            attached = name in bpf.lsm_fds
            if on and not attached:
                bpf.attach_lsm(name)
            elif not on and attached:
                bpf.detach_lsm(name)


class EventDrain:
    """Consumes guard's ring buffer while the open() rounds run: events cost what they
    cost when a daemon reads them, rather than failing a full buffer."""

    def __init__(self, kernel: Any) -> None:
        self.count = 0
        self._stop = threading.Event()
        self._kernel = kernel
        self._ring = kernel.map("guard_events")  # kept: bcc ties the callback to it
        self._ring.open_ring_buffer(self._on_event)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _on_event(self, _ctx: Any, _data: Any, _size: int) -> int:
        self.count += 1
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._kernel.bpf.ring_buffer_poll(100)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


_DRAINS: dict[int, EventDrain] = {}


def _drain(kernel: Any) -> EventDrain:
    """One reader per loaded Kernel for the whole guest run (a ring buffer is opened once)."""
    if id(kernel) not in _DRAINS:
        _DRAINS[id(kernel)] = EventDrain(kernel)
    return _DRAINS[id(kernel)]


def _exact(k: int) -> list[str]:
    return [f"{BASE}/rules/f{i}" for i in range(max(0, k - 1))]


def guest_main(rwdir: Path) -> int:
    from guestharness import _guest_prepare

    def log(text: str) -> None:
        print(f"bench guest: {text}", flush=True)

    results = Results()
    path = rwdir / "results.json"
    try:
        extra_env, info = _guest_prepare()
        os.environ.update(extra_env)
        cfg = Config.from_json((rwdir / "config.json").read_text())
        binary = Path((rwdir / "probe").read_text().strip())
        results.meta.update({"guest_kernel": info["release"], "guest_lsm": info["lsm"],
                             "landlock_abi_guest": landlock.abi_version()})
        results.write(path)
        measure(cfg, binary, results, log, lambda: results.write(path))
    except Exception as error:
        traceback.print_exc()
        results.notes.append(f"guest part failed: {type(error).__name__}: {error}")
    results.meta["guest_finished"] = True
    results.write(path)
    return 0


def measure(cfg: Config, binary: Path, results: Results, log: Log,
            save: Callable[[], None]) -> None:
    # start no new step later than this: the host kills the guest at guest_timeout_s,
    # of which booting took part (a generous share is assumed for it)
    deadline = time.monotonic() + 0.75 * cfg.guest_timeout_s - 240
    from support.cgroup import TestCgroup

    from guard.kernel.apply import Applier
    from guard.kernel.loader import lsm_has_bpf

    ok, why = lsm_has_bpf()  # no trial compile: under emulation each one costs minutes
    if not ok:
        raise RuntimeError(f"BPF-LSM programs cannot run in the guest: {why}")
    for sub in ("rules", "denied", "plain", "audited"):
        (BASE / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/usr/bin/true", BASE / "denied" / "true")
    for sub in ("plain", "audited"):
        (BASE / sub / "target").write_text("guard bench\n")
    # the probe runs from the guest's own /tmp: Landlock rules need inodes that stay
    # the same, and the host's files reach the guest over 9p, where they do not (a
    # rule on the host's bench-results/ did not let the probe run)
    local = Path("/tmp/guard-bench-probe/probe")  # not under BASE: rules there allow BASE
    local.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, local)
    binary = local
    kmax = max(cfg.guest_rules)
    t0 = time.monotonic()
    if kmax > 1:
        probe.run(binary, ["mkfiles", str(BASE / "rules"), str(kmax - 1)], 1200)
    log(f"created {max(0, kmax - 1):,} rule target files in {time.monotonic() - t0:.1f} s")
    with contextlib.ExitStack() as stack:
        root = TestCgroup.create("guard-bench")
        stack.callback(root.remove)
        cgroups = {"none": root.child("none"), "guard": root.child("guard")}
        rng = random.Random(cfg.seed)
        # exec first, with its own programs; the file programs after, as a unit of
        # their own: a file program that does not load costs its own compile only
        lsm = Lsm([])
        stack.callback(lambda: lsm.set(True))  # Kernel.close detaches what is attached
        exec_kernel: Any = None
        applier: Any = None
        if "exec" in cfg.guest_metrics:
            exec_kernel, problem = load("exec", results, log)
            if exec_kernel is None:
                raise RuntimeError(f"guard's exec programs do not load: {problem}")
            stack.enter_context(exec_kernel)
            lsm.add(exec_kernel)
            applier = Applier(exec_kernel)
            steps(cfg, "exec", deadline, results, log, save, lsm,
                  partial(exec_bench, binary=binary, cgroups=cgroups, applier=applier,
                          lsm=lsm, rng=rng, results=results, log=log, save=save))
            if cfg.exec_spawn_samples and time.monotonic() < deadline:
                exec_spawn(cfg, applier, lsm, results, log)
                save()
        if "open" not in cfg.guest_metrics:
            return
        files_kernel, files_problem = load("files", results, log)
        if files_kernel is None and exec_kernel is None:
            raise RuntimeError(f"guard's file programs do not load: {files_problem}")
        if files_kernel is not None:
            stack.enter_context(files_kernel)
            lsm.add(files_kernel)
        steps(cfg, "open", deadline, results, log, save, lsm,
              partial(open_bench, binary=binary, cgroups=cgroups,
                      kernel=files_kernel or exec_kernel,
                      applier=Applier(files_kernel) if files_kernel is not None else applier,
                      lsm=lsm, rng=rng, results=results, log=log, save=save,
                      files_problem=files_problem))


def steps(cfg: Config, name: str, deadline: float, results: Results, log: Log,
          save: Callable[[], None], lsm: Lsm, run: Callable[..., None]) -> None:
    """``run`` once per rule count, smallest first, while the guest has time."""
    for k in sorted(cfg.guest_rules):
        if time.monotonic() > deadline:
            results.overhead.append(Overhead(
                name, "guard", k, status="skipped: the guest's time budget ran out"))
            log(f"{name}: {k:,} rules skipped: out of time")
            continue
        try:
            run(replace(cfg, guest_rules=(k,)))
        except Exception as error:  # record it; the other part still runs
            traceback.print_exc()
            results.notes.append(f"guest: the {name} part failed at {k:,} rules: "
                                 f"{type(error).__name__}: {error}")
            lsm.set(True)
            save()
            return
        save()


def load(family: str, results: Results, log: Log) -> tuple[Any, str]:
    """One program family loaded, or None and why not (never hidden: noted)."""
    from guard.kernel.loader import Kernel, LoadError, family_source

    if not family_source(family).exists():
        return None, NOT_YET if family == "files" else f"no {family_source(family).name}"
    t0 = time.monotonic()
    try:
        with quiet_stderr(Path("/tmp/guard-bench-bcc.log")):
            kernel = Kernel(families={family}, host_cgroup="/")
    except LoadError as error:
        problem = " ".join(str(error).split())[-300:]
        results.notes.append(f"guest: guard's {family} programs did not load: {problem}")
        log(f"{family} programs did not load: {problem}")
        return None, f"failed: the {family} programs do not load: {problem}"
    took = time.monotonic() - t0
    results.notes.append(f"guest: bcc compiled and loaded the {family} programs in "
                         f"{took:.0f} s (once per boot)")
    log(f"{family} programs loaded in {took:.0f} s")
    return kernel, ""


def exec_spawn(cfg: Config, applier: Any, lsm: Lsm, results: Results, log: Log) -> None:
    """tests/bench/bench_exec.py's measurement (the exec engineer's), in this boot.

    Its method is kept as it is, built from its own pieces: posix_spawn of true
    from Python in its own scope cgroup, no guard (programs detached) before
    and after, then guard at its rule counts with plans from its ``plan_for``
    (through the compiler) and its proof that the subtree denies. Only the
    programs are not compiled again: its ``inside()`` loads its own copy, one
    more compile of minutes under emulation; here the loaded ones are
    attached and detached instead. Reported as the metric "exec-spawn".
    """
    from bench import bench_exec

    n, max_s = cfg.exec_spawn_samples, cfg.exec_spawn_max_s
    samples: list[Any] = []
    base = Path(tempfile.mkdtemp(prefix="guard-bench-exec-"))
    try:
        with bench_exec.own_cgroup() as scope:
            lsm.set(False)
            bench_exec.measure("warm-up", None, min(n, 100), max_s)
            samples.append(bench_exec.measure("no guard (before)", None, n, max_s))
            lsm.set(True)
            for k in bench_exec.RULE_COUNTS:
                plan = bench_exec.plan_for(scope, k, base)
                started = time.monotonic()
                applier.apply(plan)
                apply_s = time.monotonic() - started
                if k:  # its proof that guard enforces: the subtree denies a copy of true
                    denied = base / "denied" / "true"
                    shutil.copy2(bench_exec.TRUE, denied)
                    try:
                        os.posix_spawn(str(denied), [str(denied)], {})
                        raise RuntimeError("guard did not deny exec under its subtree")
                    except PermissionError:
                        pass
                sample = bench_exec.measure(f"guard, {k:,} rules", k, n, max_s)
                samples.append(bench_exec.Sample(sample.label, k, sample.n, sample.median_us,
                                                 sample.p90_us, apply_s))
            lsm.set(False)
            samples.append(bench_exec.measure("no guard (after)", None, n, max_s))
            lsm.set(True)
    except Exception as error:
        lsm.set(True)
        results.overhead.append(Overhead("exec-spawn", "guard", 0,
                                         status=f"failed: {str(error)[-200:]}"))
        return
    finally:
        shutil.rmtree(base, ignore_errors=True)
    log("exec-spawn (bench_exec.py):\n" + bench_exec.table(samples))
    baselines = [s.median_us for s in samples if s.rules is None]
    none = sum(baselines) / len(baselines)
    for sample in samples:
        if sample.rules is not None:
            results.overhead.append(Overhead(
                "exec-spawn", "guard", sample.rules, sample.median_us, none,
                sample.median_us / none, 1,
                note=f"bench_exec.py's method: {sample.n} spawns; none = mean of the medians "
                     "before and after"))


def _run(binary: Path, args: list[str], cgroup: Any, timeout: float,
         then: Callable[[], None] | None = None) -> dict[str, Any]:
    return probe.run(binary, args, timeout, preexec=enter(cgroup, None, then))


def _landlock(access: int, k: int, base_dirs: list[str]) -> landlock.Ruleset:
    ruleset = landlock.Ruleset(fs=access)
    for directory in base_dirs:
        ruleset.allow_path(directory, access)
    ruleset.allow_paths(_exact(k), access)
    return ruleset


def _rounds(cfg: Config, engines: list[str], lsm: Lsm, rng: random.Random,
            one: Callable[[str], float]) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Per engine, the per-round medians; engine -> error for those that failed."""
    samples: dict[str, list[float]] = {e: [] for e in engines}
    errors: dict[str, str] = {}
    for r in range(cfg.guest_rounds + 1):  # round 0 warms up and is not kept
        order = list(engines)
        rng.shuffle(order)
        for engine in order:
            if engine in errors:
                continue
            lsm.set(engine == "guard")
            try:
                value = one(engine)
            except Exception as error:
                errors[engine] = f"failed: {str(error).strip()[-200:]}"
                continue
            if r:
                samples[engine].append(value)
    lsm.set(True)
    return samples, errors


def exec_bench(cfg: Config, binary: Path, cgroups: dict[str, Any], applier: Any, lsm: Lsm,
               rng: random.Random, results: Results, log: Log, save: Callable[[], None]
               ) -> None:
    base_dirs = ["/usr", str(binary.parent)]
    for k in cfg.guest_rules:
        exact = _exact(k)
        subtrees = [str(BASE / "denied")] if k else []
        t0 = time.monotonic()
        skipped: dict[str, str] = {}
        try:
            applier.apply(plans.exec_plan(cgroups["guard"].path, exact, subtrees))
        except Exception as error:
            skipped["guard"] = f"failed: apply: {str(error)[-200:]}"
        t1 = time.monotonic()
        ruleset = _landlock(landlock.ACCESS_FS_EXECUTE, k, base_dirs)
        log(f"exec: {k:,} rules: guard apply {t1 - t0:.1f} s, Landlock ruleset "
            f"{time.monotonic() - t1:.1f} s")
        try:
            # proof both enforce: the denied copy of true is refused (exit 127 from the
            # probe's child means execve failed with EPERM or EACCES)
            if k and "guard" not in skipped:
                lsm.set(True)
                got = _run(binary, ["exec", "1", "30", str(BASE / "denied" / "true")],
                           cgroups["guard"], 120)
                if got.get("errors") != 1 or got.get("errno") != 127:
                    skipped["guard"] = ("failed: not enforcing: exec of a denied file ran "
                                        f"(errors {got.get('errors')})")
            lsm.set(False)
            got = _run(binary, ["exec", "1", "30", str(BASE / "denied" / "true")],
                       cgroups["none"], 120, ruleset.restrictor())
            if got.get("errors") != 1 or got.get("errno") != 127:
                skipped["landlock"] = ("failed: not enforcing: exec outside the rules ran "
                                       f"(errors {got.get('errors')})")

            def one(engine: str, rs: landlock.Ruleset = ruleset) -> float:
                cg = cgroups["guard" if engine == "guard" else "none"]
                then = rs.restrictor() if engine == "landlock" else None
                res = _run(binary, ["exec", str(cfg.exec_count), str(cfg.exec_max_s),
                                    "/usr/bin/true"], cg, cfg.exec_max_s + 120, then)
                if not res.get("n") or res.get("errors"):
                    raise RuntimeError(f"exec of /usr/bin/true failed: {res}")
                return float(res["median_ns"]) / 1000.0

            engines = ["none", *(e for e in ("guard", "landlock") if e not in skipped)]
            samples, errors = _rounds(cfg, engines, lsm, rng, one)
        finally:
            ruleset.close()
        if "none" in errors:
            raise RuntimeError(f"exec baseline failed: {errors['none']}")
        for engine in ("guard", "landlock"):
            status = skipped.get(engine) or errors.get(engine) or OK
            note = (f"allowlist of {ruleset.rules:,} rules (k - 1 files, /usr, the probe's "
                    "directory)" if engine == "landlock" else "")
            vals = samples.get(engine, [])
            results.overhead.append(overhead_rows("exec", engine, k, vals,
                                                  samples["none"][: len(vals)], status, note))
        log("exec: " + _summary(results.overhead, "exec", k))
        save()


def _summary(rows: list[Overhead], metric: str, k: int) -> str:
    return f"{k:,} rules: " + ", ".join(
        f"{r.engine} {r.value:.1f} us vs {r.baseline:.1f} ({r.ratio:.3f})"
        if r.ratio is not None and r.value is not None and r.baseline is not None
        else f"{r.engine} [{r.status}]"
        for r in rows if r.metric == metric and r.rules == k)


def open_program_cost(cfg: Config, binary: Path, cgroup: Any, kernel: Any, metric: str,
                      k: int, path: str, baseline_us: list[float]) -> Overhead:
    """The file_open program's own time per call (kernel.bpf_stats_enabled: run_time_ns
    over run_cnt) while the scoped probe opens ``path``, next to an open()+close()
    without guard: a cost the rounds' wall-clock noise under emulation cannot hide.
    Measured in a run of its own, because the stats themselves cost two clock reads
    per program run."""
    from bench import bench_exec

    was = bench_exec.STATS_SYSCTL.read_text().strip()
    bench_exec.STATS_SYSCTL.write_text("1")
    try:
        before = bench_exec.program_counters(kernel.bpf)
        res = _run(binary, ["open", str(cfg.open_count), str(cfg.open_max_s),
                            str(cfg.open_batch), path], cgroup, cfg.open_max_s + 120)
        after = bench_exec.program_counters(kernel.bpf)
    finally:
        bench_exec.STATS_SYSCTL.write_text(was)
    (cost,) = [c for c in bench_exec.hook_costs(k, before, after) if c.hook == "file_open"]
    if not res.get("n") or res.get("errors") or not cost.calls or not baseline_us:
        return Overhead(metric, "guard", k, status=f"failed: {res} {cost}")
    base = sorted(baseline_us)[len(baseline_us) // 2]
    value = cost.ns_per_call / 1000.0
    return Overhead(metric, "guard", k, value=value, baseline=base,
                    ratio=(base + value) / base, rounds=1,
                    note=f"{cost.calls:,} calls of file_open, {cost.ns_per_call:.0f} ns each")


def open_bench(cfg: Config, binary: Path, cgroups: dict[str, Any], kernel: Any, applier: Any,
               lsm: Lsm, rng: random.Random, results: Results, log: Log,
               save: Callable[[], None], files_problem: str = "") -> None:
    have_files = "files" in kernel.families
    not_there = files_problem or NOT_YET
    plain = str(BASE / "plain" / "target")
    audited = str(BASE / "audited" / "target")
    base_dirs = ["/usr", "/etc", str(binary.parent), str(BASE / "plain")]
    drain = _drain(kernel) if have_files else None
    try:
        for k in cfg.guest_rules:
            exact = _exact(k)
            skipped: dict[str, str] = {} if have_files else {"guard": not_there}
            if have_files:
                try:
                    applier.apply(plans.files_plan(cgroups["guard"].path, exact,
                                                   [str(BASE / "audited")] if k else []))
                except Exception as error:
                    skipped["guard"] = f"failed: apply: {str(error)[-200:]}"
            ruleset = _landlock(landlock.ACCESS_FS_READ_FILE, k, base_dirs)
            try:
                if have_files and k and "guard" not in skipped and drain is not None:
                    lsm.set(True)
                    before = drain.count
                    _run(binary, ["open", "64", "30", "64", audited], cgroups["guard"], 120)
                    time.sleep(0.5)
                    if drain.count <= before:
                        skipped["guard"] = "failed: not enforcing: a matching open made no event"
                lsm.set(False)
                got = _run(binary, ["open", "1", "30", "1", audited], cgroups["none"], 120,
                           ruleset.restrictor())
                if got.get("errors") != 1:
                    skipped["landlock"] = ("failed: not enforcing: open outside the rules "
                                           "succeeded")

                def one(engine: str, path: str, rs: landlock.Ruleset = ruleset) -> float:
                    cg = cgroups["guard" if engine == "guard" else "none"]
                    then = rs.restrictor() if engine == "landlock" else None
                    res = _run(binary, ["open", str(cfg.open_count), str(cfg.open_max_s),
                                        str(cfg.open_batch), path], cg, cfg.open_max_s + 120,
                               then)
                    if not res.get("n") or res.get("errors"):
                        raise RuntimeError(f"open of {path} failed: {res}")
                    return float(res["median_ns"]) / 1000.0

                engines = ["none", *(e for e in ("guard", "landlock") if e not in skipped)]
                samples, errors = _rounds(cfg, engines, lsm, rng, lambda e: one(e, plain))
                match_engines = ["none", *(["guard"] if "guard" not in skipped and k else [])]
                msamples, merrors = _rounds(cfg, match_engines, lsm, rng,
                                            lambda e: one(e, audited))
            finally:
                ruleset.close()
            if "none" in errors or "none" in merrors:
                raise RuntimeError(f"open baseline failed: {errors} {merrors}")
            for engine in ("guard", "landlock"):
                status = skipped.get(engine) or errors.get(engine) or OK
                note = (f"allowlist of {ruleset.rules:,} rules (k - 1 files and 4 directories "
                        "a process needs); the opened file is under one of them"
                        if engine == "landlock" else "")
                vals = samples.get(engine, [])
                results.overhead.append(overhead_rows("open", engine, k, vals,
                                                      samples["none"][: len(vals)], status,
                                                      note))
            if k:
                status = skipped.get("guard") or merrors.get("guard") or OK
                vals = msamples.get("guard", [])
                results.overhead.append(overhead_rows(
                    "open-match", "guard", k, vals, msamples["none"][: len(vals)], status,
                    "every open is an audit event, read from the ring buffer"))
            if have_files and "guard" not in skipped:
                paths = {"open-bpf": plain, **({"open-match-bpf": audited} if k else {})}
                for metric, path in paths.items():
                    base = (samples if metric == "open-bpf" else msamples)["none"]
                    results.overhead.append(open_program_cost(
                        cfg, binary, cgroups["guard"], kernel, metric, k, path, base))
            log("open: " + _summary(results.overhead, "open", k))
            save()
    finally:
        if drain is not None:
            log(f"open: {drain.count:,} file events read from the ring buffer so far")
