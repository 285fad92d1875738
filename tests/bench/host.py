"""The host half of the bench: network overhead, apply, the daemon, reload, audit.

Layout of what it makes (all removed at the end, also on failure):

    /guard-bench-XXXX/{none,guard,iptables,nft-chain,nft-set,landlock}
                                   one cgroup per engine for the network clients;
                                   guard's programs are attached to .../guard only
    /guard-bench-XXXX/daemon       --host-cgroup of each ``guard run`` started here
    guard-bench-XXXX-c / -p        the network namespaces (lab.py)

Ratios are taken round by round: in each round every engine and the
no-enforcement baseline run once, in a shuffled order, and the round's ratio is
engine / baseline; the reported ratio is the median over rounds.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.cgroup import TestCgroup, terminate
from support.rsyslog import Rsyslog

from bench import landlock, peers, plans, probe
from bench.config import Config
from bench.lab import ACCEPT_PORT, PEER_ADDR, SINK_PORT, NetLab, enter
from bench.results import (
    METRICS,
    OK,
    ApplyTime,
    AuditRun,
    DaemonStart,
    Overhead,
    ReloadLatency,
    Results,
)
from bench.stats import median, percentile, round_ratios
from guard.kernel.cgroups import cgroup2_mount

NET_ENGINES = ("guard", "iptables", "nft-chain", "nft-set", "landlock")
Log = Callable[[str], None]


def _short(error: BaseException) -> str:
    """One line of an error: its first line that says something (not a ^^^ marker)."""
    lines = [line.strip() for line in str(error).strip().splitlines()
             if line.strip() and set(line.strip()) - set("^~ ")]
    return (lines[0] if lines else type(error).__name__)[:300]


@contextlib.contextmanager
def quiet_stderr(path: Path) -> Iterator[None]:
    """Send fd 2 to ``path`` meanwhile: bcc's compiler prints header warnings there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


# --- network overhead ---------------------------------------------------------------------


@dataclass
class NetEnv:
    cfg: Config
    binary: Path
    lab: NetLab
    cgroups: dict[str, TestCgroup]
    log: Log
    landlock_abi: int
    kernel: Any = None
    applier: Any = None
    unavailable: dict[str, str] = field(default_factory=dict)  # engine -> why, for every k
    rulesets: dict[str, landlock.Ruleset] = field(default_factory=dict)

    def preexec(self, engine: str) -> Callable[[], None]:
        cg = self.cgroups["none" if engine == "landlock" else engine]
        then = self.rulesets["landlock"].restrictor() if engine == "landlock" else None
        return enter(cg, self.lab.client_ns, then)

    def run(self, engine: str, args: list[str], timeout: float) -> dict[str, Any]:
        return probe.run(self.binary, args, timeout, preexec=self.preexec(engine))


def _configure(env: NetEnv, k: int) -> dict[str, str]:
    """Load k rules into every engine; engine -> why it is not measured at this k."""
    skipped: dict[str, str] = dict(env.unavailable)
    mount = cgroup2_mount()
    started = time.monotonic()
    if "guard" not in skipped:
        try:
            env.applier.apply(plans.net_plan(env.cgroups["guard"].path, k))
        except Exception as error:
            skipped["guard"] = f"failed: apply: {_short(error)}"
    if "iptables" not in skipped:
        try:
            peers.install_iptables(env.lab.client_ns,
                                   peers.iptables_rules(env.cgroups["iptables"].path, k))
        except Exception as error:
            skipped["iptables"] = f"failed: {_short(error)}"
    for engine, text_of in (("nft-chain", peers.nft_chain_rules),
                            ("nft-set", peers.nft_set_rules)):
        if engine in skipped:
            continue
        try:
            name, level = peers.nft_cgroup(env.cgroups[engine].directory, mount)
            peers.install_nft(env.lab.client_ns, text_of(name, level, k))
        except Exception as error:
            skipped[engine] = f"failed: {_short(error)}"
    if "landlock" not in skipped:
        old = env.rulesets.pop("landlock", None)
        if old is not None:
            old.close()
        # Landlock rules are TCP ports, not addresses: the servers' two ports plus
        # k others; there are only 65,535 ports.
        if k + 2 > landlock.MAX_PORT:
            skipped["landlock"] = (f"not expressible: Landlock has one rule per TCP port "
                                   f"(at most {landlock.MAX_PORT:,})")
        else:
            ruleset = landlock.Ruleset(net=landlock.ACCESS_NET_CONNECT_TCP)
            ruleset.allow_port(ACCEPT_PORT)
            ruleset.allow_port(SINK_PORT)
            others = (p for p in range(1, landlock.MAX_PORT + 1)
                      if p not in (ACCEPT_PORT, SINK_PORT))
            for _, port in zip(range(k), others, strict=False):
                ruleset.allow_port(port)
            env.rulesets["landlock"] = ruleset
    env.log(f"net: {k:,} rules loaded into every engine in {time.monotonic() - started:.1f} s")
    return skipped


def _verify(env: NetEnv, k: int, engines: list[str]) -> dict[str, str]:
    """Prove each engine enforces its rules right now: engine -> problem."""
    problems: dict[str, str] = {}
    for engine in ["none", *engines]:
        try:
            ok = env.run(engine, ["try-connect", PEER_ADDR, str(ACCEPT_PORT), "2000"], 30)
            if ok["result"] != "connected":
                problems[engine] = f"the tested destination is not reachable: {ok}"
                continue
            if k == 0 or engine == "none":
                continue
            if engine == "landlock":
                # a port no rule allows (the lowest k ports are allowed): EACCES
                blocked = env.run(engine, ["try-connect", PEER_ADDR, str(landlock.MAX_PORT),
                                           "500"], 30)
                if blocked != {"result": "error", "errno": errno.EACCES}:
                    problems[engine] = f"a port without a rule gave {blocked}"
                continue
            # the first and last blocked destinations are the peer's addresses too, so
            # they would connect if the engine did not stop them
            for i in sorted({0, k - 1}):
                blocked = env.run(engine, ["try-connect", plans.blocked_address(i),
                                           str(ACCEPT_PORT), "500"], 30)
                if blocked["result"] == "connected":
                    problems[engine] = f"blocked destination {plans.blocked_address(i)} connected"
        except Exception as error:
            problems[engine] = f"failed: {_short(error)}"
    return problems


def _measure_round(env: NetEnv, order: list[str], out: dict[str, dict[str, list[float]]],
                   errors: dict[str, str]) -> None:
    cfg = env.cfg
    for engine in order:  # connect latency
        if engine in errors:
            continue
        try:
            res = env.run(engine, ["connect", PEER_ADDR, str(ACCEPT_PORT), str(cfg.connect_count),
                                   str(cfg.connect_max_s)], cfg.connect_max_s + 60)
            if not res.get("n"):
                errors[engine] = f"failed: no connect succeeded (errno {res.get('errno')})"
                continue
            out[engine]["connect"].append(res["median_ns"] / 1000.0)
        except probe.ProbeError as error:
            errors[engine] = f"failed: {_short(error)}"
    for engine in order:  # throughput
        if engine in errors:
            continue
        try:
            res = env.run(engine, ["stream", PEER_ADDR, str(SINK_PORT), str(cfg.stream_s)],
                          cfg.stream_s + 60)
            if "gbit_s" not in res:
                errors[engine] = f"failed: {res.get('error')}"
                continue
            out[engine]["throughput"].append(res["gbit_s"])
        except probe.ProbeError as error:
            errors[engine] = f"failed: {_short(error)}"


def overhead_rows(metric: str, engine: str, k: int, values: list[float],
                  baselines: list[float], status: str, note: str = "") -> Overhead:
    """One table cell from the per-round medians of an engine and of the baseline."""
    if status != OK:
        return Overhead(metric, engine, k, status=status, note=note)
    pairs = list(zip(values, baselines, strict=False))
    if not pairs:
        return Overhead(metric, engine, k, status="failed: no measurement", note=note)
    higher = METRICS[metric][2]
    ratios = round_ratios(pairs, higher)
    return Overhead(metric, engine, k, value=median(values), baseline=median(baselines),
                    ratio=median(ratios), rounds=len(pairs), note=note,
                    per_round=[round(r, 4) for r in ratios])


def net_overhead(env: NetEnv, results: Results) -> None:
    cfg = env.cfg
    rng = random.Random(cfg.seed)
    for k in cfg.net_rules:
        skipped = _configure(env, k)
        engines = [e for e in NET_ENGINES if e not in skipped]
        problems = _verify(env, k, engines)
        if "none" in problems:
            raise RuntimeError(f"the bench network does not work: {problems['none']}")
        for engine, problem in problems.items():
            skipped[engine] = f"failed: not enforcing as configured: {problem}"
        engines = [e for e in engines if e not in skipped]
        samples: dict[str, dict[str, list[float]]] = {
            e: {"connect": [], "throughput": []} for e in ["none", *engines]}
        errors: dict[str, str] = {}
        warm: dict[str, dict[str, list[float]]] = {
            e: {"connect": [], "throughput": []} for e in ["none", *engines]}
        _measure_round(env, ["none", *engines], warm, errors)  # warm-up, not recorded
        for _ in range(cfg.rounds):
            order = ["none", *engines]
            rng.shuffle(order)
            _measure_round(env, order, samples, errors)
        if "none" in errors:
            raise RuntimeError(f"the baseline failed: {errors['none']}")
        for metric in ("connect", "throughput"):
            base = samples["none"][metric]
            for engine in NET_ENGINES:
                status = skipped.get(engine) or errors.get(engine) or OK
                note = ""
                if engine == "landlock" and status == OK:
                    note = f"{k + 2:,} TCP port rules (Landlock has no address rules)"
                vals = samples.get(engine, {}).get(metric, [])
                results.overhead.append(overhead_rows(metric, engine, k, vals,
                                                      base[: len(vals)], status, note))
        for metric in ("connect", "throughput"):
            rows = [r for r in results.overhead if r.metric == metric and r.rules == k]
            env.log(f"net: {k:,} rules, {metric} cost ratios: " + ", ".join(
                f"{r.engine} {r.ratio:.3f}" if r.ratio else f"{r.engine} [{r.status}]"
                for r in rows))


def probe_unavailable(env: NetEnv) -> None:
    if shutil.which("iptables-restore") is None:
        env.unavailable["iptables"] = "not available: iptables-restore is not installed"
    if shutil.which("nft") is None:
        env.unavailable["nft-chain"] = env.unavailable["nft-set"] = \
            "not available: nft is not installed"
    if env.landlock_abi < 4:
        env.unavailable["landlock"] = (f"not available: Landlock ABI {env.landlock_abi} "
                                       "has no TCP rules (needs >= 4)")


# --- apply time ---------------------------------------------------------------------------


def apply_times(env: NetEnv, results: Results) -> None:
    """guard.kernel.apply on the loaded programs: a first load, then reloads alternating between
    two rule sets of the same size that share no entry (each reload rewrites a slot)."""
    from guard.kernel.apply import MapWriter

    flips: list[float] = []

    class TimingWriter(MapWriter):
        def write_config(self, config: Any) -> None:
            super().write_config(config)
            flips.append(time.monotonic())  # the moment the new set is enforced

    # the same Applier as the overhead runs (it knows what the maps hold), timed
    applier = env.applier
    applier._writer = TimingWriter(env.kernel)
    scope = env.cgroups["guard"].path
    for k in env.cfg.apply_rules:
        try:
            applier.apply(plans.net_plan(scope, 0))
            # the second set: other destinations where the range allows (every reload
            # rewrites a whole slot anyway: the slot is part of each key)
            a = plans.net_plan(scope, k)
            b = plans.net_plan(scope, k, first=min(k, plans.MAX_BLOCKED - k))
            t0 = time.monotonic()
            applier.apply(a)
            initial = (flips[-1] - t0) * 1000
            to_enforced: list[float] = []
            totals: list[float] = []
            for i in range(env.cfg.apply_repeats):
                t0 = time.monotonic()
                result = applier.apply(b if i % 2 == 0 else a)
                end = time.monotonic()
                if not result.changed:
                    raise RuntimeError("a reload that should change the maps changed nothing")
                to_enforced.append((flips[-1] - t0) * 1000)
                totals.append((end - t0) * 1000)
            entries = len(a.net) + len(a.port_tables) + len(a.scopes) + len(a.rulesets)
            results.apply.append(ApplyTime(k, entries, initial, median(to_enforced),
                                           percentile(to_enforced, 99), median(totals),
                                           len(to_enforced)))
            env.log(f"apply: {k:,} rules: {median(to_enforced):.1f} ms to enforced, "
                    f"{median(totals):.1f} ms per call")
        except Exception as error:
            results.apply.append(ApplyTime(k, 0, None, None, None, None,
                                           status=f"failed: {_short(error)}"))
    applier.apply(plans.net_plan(scope, 0))


# --- the daemon ---------------------------------------------------------------------------


class Notify:
    """An abstract NOTIFY_SOCKET, heard the way systemd hears it.

    After READY it keeps reading (RELOADING=1, READY=1 at every reload), as a
    service manager does: the daemon's sd_notify is a blocking send, and a full
    socket queue would stall its main loop.
    """

    def __init__(self) -> None:
        self.name = f"@guard-bench-{secrets.token_hex(6)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.sock.settimeout(0.2)
        self._closed = threading.Event()
        self._reader: threading.Thread | None = None

    def keep_reading(self) -> None:
        def drain() -> None:
            while not self._closed.is_set():
                with contextlib.suppress(OSError):
                    self.sock.recv(4096)

        self._reader = threading.Thread(target=drain, daemon=True)
        self._reader.start()

    def wait_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> float | None:
        """monotonic time of READY=1; None when the daemon exits or the time is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return None
            self.sock.settimeout(0.2)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in data.split(b"\n"):
                return time.monotonic()
        return None

    def close(self) -> None:
        self._closed.set()
        if self._reader is not None:
            self._reader.join(timeout=2)  # recv times out every 0.2 s
        self.sock.close()


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    state_dir: Path
    ready_s: float | None
    stderr_path: Path

    def memory_mb(self) -> dict[str, float | None]:
        """VmRSS, VmHWM, RssAnon (/proc/PID/status), Pss and Private (smaps_rollup), in
        MB: guard.service.memory.Usage.as_mb() keys; {} when the process cannot be read.

        VmRSS counts shared library pages and the ring buffer's mapped pages too; PSS
        (shared pages divided among their users) and Private are the daemon's own.
        """
        from guard.service.memory import read_usage

        try:
            return read_usage(self.proc.pid).as_mb()
        except OSError:
            return {}

    def wait_released(self, timeout: float = 10.0) -> None:
        """Until ``guard status`` shows the release after load done (guard/service/memory.py; it
        runs right after READY), or ``timeout``: what is measured is the steady state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if (self.status().get("memory") or {}).get("release") is not None:
                    return
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        from guard.service.control import query

        reply = query(str(self.state_dir))
        body: dict[str, Any] = reply.get("status", {})
        return body

    def stop(self) -> None:
        terminate(self.proc, timeout=30)


@contextlib.contextmanager
def daemon(policies: Path, host_cgroup: str, syslog: str, work: Path,
           timeout: float) -> Iterator[Daemon]:
    """``guard run`` until the block ends; ready_s None when READY never came."""
    notify = Notify()
    state = work / f"state-{secrets.token_hex(3)}"
    state.mkdir(parents=True)
    stderr_path = work / f"daemon-{secrets.token_hex(3)}.log"
    env = {**os.environ, "NOTIFY_SOCKET": notify.name}
    with open(stderr_path, "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "guard", "run", "--policies", str(policies), "--syslog",
             syslog, "--host-cgroup", host_cgroup, "--state-dir", str(state)],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env)
    try:
        ready = notify.wait_ready(proc, timeout)
        notify.keep_reading()
        yield Daemon(proc, state, None if ready is None else ready - t0, stderr_path)
    finally:
        terminate(proc, timeout=30)
        notify.close()


def write_policies(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def daemon_start(cfg: Config, root: TestCgroup, syslog: str, work: Path, log: Log,
                 results: Results) -> None:
    cg = root.child("daemon-start")
    fixed: float | None = None  # start time of the smallest set: what does not grow
    previous: tuple[int, float] | None = None
    for k in sorted(cfg.daemon_rules):
        if previous is not None and fixed is not None and previous[0] > 0:
            # the part above the fixed cost, grown only linearly: a lower bound
            bound = fixed + (previous[1] - fixed) * k / previous[0]
            if bound > cfg.daemon_timeout_s:
                results.daemon.append(DaemonStart(
                    k, None, None, None,
                    status=f"skipped: {previous[0]:,} rules took {previous[1]:.0f} s to READY;"
                           f" even linear growth puts {k:,} past this run's "
                           f"{cfg.daemon_timeout_s:.0f} s limit"))
                log(f"daemon: {k:,} rules skipped ({results.daemon[-1].status})")
                continue
        policies = work / f"start-{k}"
        write_policies(policies, plans.policy_files(k))
        log(f"daemon: starting guard run with {k:,} rules (limit {cfg.daemon_timeout_s:.0f} s)")
        with daemon(policies, cg.path, syslog, work, cfg.daemon_timeout_s) as d:
            if d.ready_s is None:
                code = d.proc.poll()
                why = (f"exited {code}: {d.stderr_path.read_text()[-300:]}" if code is not None
                       else f"not READY within {cfg.daemon_timeout_s:.0f} s")
                results.daemon.append(DaemonStart(k, None, None, None, status=f"failed: {why}"))
                previous = (k, cfg.daemon_timeout_s)
            else:
                d.wait_released()
                time.sleep(0.5)  # the event loop's first rounds
                mem = d.memory_mb()
                results.daemon.append(DaemonStart(k, d.ready_s, mem.get("rss"), mem.get("hwm"),
                                                  rssanon_mb=mem.get("anon"),
                                                  pss_mb=mem.get("pss"),
                                                  private_mb=mem.get("private")))
                previous = (k, d.ready_s)
                fixed = d.ready_s if fixed is None else fixed
            log(f"daemon: {k:,} rules: {results.daemon[-1]}")
        shutil.rmtree(policies, ignore_errors=True)


# --- save-to-enforced ---------------------------------------------------------------------

TOGGLE = "toggle.yaml"


def toggle_text(deny: bool) -> str:
    rule = (f"        - {{action: deny, to: [{PEER_ADDR}/32], ports: [{ACCEPT_PORT}], "
            "protocol: tcp}" if deny else
            f"        - {{action: deny, to: [{plans.blocked_address(plans.MAX_BLOCKED - 1)}/32], "
            "protocol: tcp}")
    return plans.egress_policy("toggle", [], extra_rules=[rule])


def save(directory: Path, name: str, text: str) -> int:
    """An editor's atomic save (temp file, rename over); monotonic ns of the rename."""
    tmp = directory / f".{name}.tmp"
    tmp.write_text(text)
    t0 = time.monotonic_ns()
    os.replace(tmp, directory / name)
    return t0


def reload_latency(cfg: Config, root: TestCgroup, lab: NetLab, binary: Path, syslog: str,
                   work: Path, log: Log, results: Results) -> None:
    cg = root.child("daemon-reload")
    for k in cfg.reload_rules:
        policies = work / f"reload-{k}"
        write_policies(policies, plans.policy_files(k))
        (policies / TOGGLE).write_text(toggle_text(False))
        row: ReloadLatency
        with daemon(policies, cg.path, syslog, work, cfg.daemon_timeout_s) as d:
            if d.ready_s is None:
                results.reload.append(ReloadLatency(k, "-", 0, None, None, None,
                                                    status="failed: the daemon did not start"))
                continue
            poller = probe.start(binary, ["poll-verdict", PEER_ADDR, str(ACCEPT_PORT),
                                          str(cfg.reload_timeout_s)],
                                 preexec=enter(cg, lab.client_ns), stdin=subprocess.PIPE)
            try:
                row = _edits(cfg, k, policies, d, poller, log)
            finally:
                if poller.stdin is not None:
                    poller.stdin.close()
                terminate(poller)
                for stream in (poller.stdout, poller.stderr):
                    if stream is not None:
                        stream.close()
        results.reload.append(row)
        log(f"reload: {k:,} rules: {row}")
        shutil.rmtree(policies, ignore_errors=True)


def _send(poller: subprocess.Popen[str], want: str) -> None:
    assert poller.stdin is not None
    poller.stdin.write(want + "\n")
    poller.stdin.flush()


def _read(poller: subprocess.Popen[str], timeout: float) -> dict[str, Any] | None:
    """The poller's answer to the last request; None when none came within ``timeout``."""
    import select

    assert poller.stdout is not None
    ready, _, _ = select.select([poller.stdout], [], [], timeout)
    if not ready:
        return None
    line = poller.stdout.readline()
    if not line:
        raise RuntimeError("the verdict poller stopped")
    value: dict[str, Any] = json.loads(line)
    return value


def _ask(poller: subprocess.Popen[str], want: str, timeout: float) -> dict[str, Any]:
    _send(poller, want)
    answer = _read(poller, timeout)
    if answer is None:
        raise RuntimeError("the verdict poller did not answer")
    return answer


def _edits(cfg: Config, k: int, policies: Path, d: Daemon, poller: subprocess.Popen[str],
           log: Log) -> ReloadLatency:
    limit = cfg.reload_timeout_s + 5  # the poller gives up by itself after reload_timeout_s
    if _ask(poller, "allow", limit).get("ok") is not True:
        return ReloadLatency(k, "-", 0, None, None, None,
                             status="failed: the tested connect is not allowed at start")
    # First edit: does the daemon watch the directory? Wait 3 s without SIGHUP.
    save(policies, TOGGLE, toggle_text(True))
    _send(poller, "deny")
    # a reload parses and compiles the whole directory, as the start did
    first = _read(poller, max(3.0, 2 * (d.ready_s or 0.0)))
    trigger = "watcher"
    if first is None:  # the poller is still polling for "deny"
        trigger = "SIGHUP"
        log("reload: a save was not enforced without a signal: the daemon does not watch "
            "the directory yet; sending SIGHUP after each save")
        d.proc.send_signal(signal.SIGHUP)
        first = _read(poller, limit)
    if first is None or first.get("ok") is not True:
        return ReloadLatency(k, trigger, 0, None, None, None,
                             status="failed: the first edit was never enforced")
    deny = False
    state = "deny"  # the verdict last seen
    latencies: list[float] = []
    failures = 0
    for _ in range(cfg.reload_edits):
        time.sleep(random.uniform(0.2, 0.4))  # edits apart, as a person or a git pull makes
        want = "deny" if deny else "allow"
        t0 = save(policies, TOGGLE, toggle_text(deny))
        if trigger == "SIGHUP":
            d.proc.send_signal(signal.SIGHUP)
        seen = _ask(poller, want, limit)
        if not seen.get("ok"):
            failures += 1
        elif want != state:  # after a failed edit the verdict did not change: no time
            latencies.append((seen["seen_ns"] - t0) / 1e6)
        if seen.get("ok"):
            state = want
        deny = not deny
    if not latencies:
        return ReloadLatency(k, trigger, cfg.reload_edits, None, None, None, failures,
                             status="failed: no edit was seen enforced")
    return ReloadLatency(k, trigger, cfg.reload_edits, median(latencies),
                         percentile(latencies, 99), max(latencies), failures)


# --- audit throughput ---------------------------------------------------------------------

AUDIT_POLICY = "bench-audit"
AUDIT_PORTS = (20_000, 59_999)
_KIND = re.compile(r' kind="(\w+)"')
_COUNT = re.compile(r' count="(\d+)"')
_SOURCE = re.compile(r' source="(\w+)"')


def audit_policy() -> str:
    return plans.egress_policy(
        AUDIT_POLICY, [], mode="audit",
        extra_rules=[f'        - {{action: deny, to: [127.0.0.1/32], '
                     f'ports: ["{AUDIT_PORTS[0]}-{AUDIT_PORTS[1]}"], protocol: udp}}'])


@dataclass
class Tally:
    lines: int = 0
    events: int = 0
    lost: dict[str, int] = field(default_factory=lambda: {"ringbuf": 0, "reader": 0, "sink": 0})

    @property
    def accounted(self) -> int:
        return self.events + sum(self.lost.values())


def tally(text: str, into: Tally) -> None:
    """Add guard's connect and lost lines of a piece of rsyslogd's output."""
    for line in text.splitlines():
        if " guard " not in line:
            continue
        kind = _KIND.search(line)
        count = _COUNT.search(line)
        if kind is None or count is None:
            continue
        if kind.group(1) == "connect" and f'policy="{AUDIT_POLICY}"' in line:
            into.lines += 1
            into.events += int(count.group(1))
        elif kind.group(1) == "lost":
            source = _SOURCE.search(line)
            name = source.group(1) if source else "?"
            into.lost[name] = into.lost.get(name, 0) + int(count.group(1))


def audit_throughput(cfg: Config, root: TestCgroup, binary: Path, rsyslog: Rsyslog,
                     work: Path, log: Log, results: Results) -> None:
    cg = root.child("daemon-audit")
    policies = work / "audit"
    write_policies(policies, {"audit.yaml": audit_policy()})
    runs = [("distinct", rate) for rate in cfg.audit_rates] + [("identical", 0)]
    with daemon(policies, cg.path, f"unix:{rsyslog.unix_path}", work,
                cfg.daemon_timeout_s) as d:
        if d.ready_s is None:
            results.audit.append(AuditRun("distinct", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                          status="failed: the daemon did not start"))
            return
        for workload, rate in runs:
            nports = AUDIT_PORTS[1] - AUDIT_PORTS[0] + 1 if workload == "distinct" else 1
            count = int((rate or 2_000_000) * cfg.audit_seconds)
            offset = rsyslog.messages.stat().st_size if rsyslog.messages.exists() else 0
            t0 = time.monotonic()
            res = probe.run(binary, ["udpflood", "127.0.0.1", str(AUDIT_PORTS[0]), str(nports),
                                     str(count), str(rate), str(cfg.audit_seconds)],
                            cfg.audit_seconds + 60, preexec=enter(cg, None))
            sent = int(res["sent"])
            seen = Tally()
            last_change = time.monotonic()
            deadline = t0 + cfg.audit_drain_s
            while time.monotonic() < deadline:
                with open(rsyslog.messages, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                cut = chunk.rfind(b"\n") + 1
                offset += cut
                before = seen.accounted
                tally(chunk[:cut].decode("utf-8", "replace"), seen)
                if seen.accounted != before:
                    last_change = time.monotonic()
                if seen.accounted >= sent or time.monotonic() - last_change > 5.0:
                    break
                time.sleep(0.05)
            run = AuditRun(workload, rate, sent, res["elapsed_ns"] / 1e9, last_change - t0,
                           seen.lines, seen.events, seen.lost.get("ringbuf", 0),
                           seen.lost.get("reader", 0), seen.lost.get("sink", 0),
                           sent - seen.accounted)
            results.audit.append(run)
            log(f"audit: {workload} at {rate or 'max'}/s: sent {sent:,} in {run.send_s:.2f} s, "
                f"{seen.events:,} events in {seen.lines:,} lines, lost {seen.lost}, "
                f"unaccounted {run.unaccounted} (drained after {run.drain_s:.1f} s)")
            time.sleep(1.5)  # aggregation windows close; the next run starts clean
    shutil.rmtree(policies, ignore_errors=True)


# --- the host part as a whole -------------------------------------------------------------


def run_host(cfg: Config, binary: Path, out: Path, log: Log, results: Results) -> None:
    from guard.kernel.loader import Kernel, probe_family

    results.meta["landlock_abi_host"] = landlock.abi_version()
    results.meta.update(peers.tool_versions())
    problems = plans.check_shape()
    if problems:
        raise RuntimeError("bench plans differ from the compiler's: " + "; ".join(problems))
    work = Path(tempfile.mkdtemp(prefix="guard-bench-", dir=out))
    with contextlib.ExitStack() as stack:
        root = TestCgroup.create("guard-bench")
        stack.callback(root.remove)
        lab = stack.enter_context(NetLab(binary).build())
        # the first and last blocked destination of each size are the peer's too, so an
        # engine that did not stop them would connect: _verify tells
        for index in sorted({i for k in cfg.net_rules if k for i in (0, k - 1)}):
            lab.add_peer_address(plans.blocked_address(index))
        def remove_peers() -> None:
            for problem in peers.remove_all(lab.client_ns):
                log(f"cleanup: {problem}")

        stack.callback(remove_peers)
        if {"net", "apply"} & set(cfg.parts):
            with quiet_stderr(work / "bcc.log"):
                feature = probe_family("net")
            if not feature.available:
                raise RuntimeError(f"guard's network programs cannot run here: {feature.reason}")
            cgroups = {name: root.child(name) for name in ("none", *NET_ENGINES)}
            guard_cg = cgroups["guard"]
            with quiet_stderr(work / "bcc.log"):
                kernel = stack.enter_context(Kernel(families={"net"},
                                                    host_cgroup=guard_cg.path))
            from guard.kernel.apply import Applier

            env = NetEnv(cfg, binary, lab, cgroups, log, landlock.abi_version(), kernel,
                         Applier(kernel))
            probe_unavailable(env)
            def close_rulesets() -> None:
                for ruleset in env.rulesets.values():
                    ruleset.close()

            stack.callback(close_rulesets)
            if "net" in cfg.parts:
                net_overhead(env, results)
            if "apply" in cfg.parts:
                apply_times(env, results)
        if {"daemon", "reload", "audit"} & set(cfg.parts):
            rsyslog = Rsyslog(work / "rsyslog", unix=True)
            rsyslog.start()
            stack.callback(rsyslog.stop)
            syslog = f"unix:{rsyslog.unix_path}"
            if "daemon" in cfg.parts:
                daemon_start(cfg, root, syslog, work, log, results)
            if "reload" in cfg.parts:
                reload_latency(cfg, root, lab, binary, syslog, work, log, results)
            if "audit" in cfg.parts:
                audit_throughput(cfg, root, binary, rsyslog, work, log, results)
    shutil.rmtree(work, ignore_errors=True)
