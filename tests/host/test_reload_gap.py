"""No gap during a reload: every connect() is judged by the old set or the new one, whole.

A client process in the test cgroup runs a tight, bounded loop of real
connect() calls (non-blocking TCP, so each call's result is exactly the verdict
of the connect4 program: EPERM or not) to four loopback ports it listens on,
while the policy flips between two sets hundreds (daemon) or thousands
(in-process) of times:

    port    set A    set B    what a wrong outcome would mean
    X       allow    deny     -
    Y       deny     allow    -
    W       allow    allow    denied: the ruleset's default was in force without
                              its allow rules (an empty or half-filled table)
    Z       deny     deny     allowed: no ruleset at all (an empty slot, a scope
                              missing) or a ruleset without its default

Both sets are default-deny with allow rules, so the "half-applied" states a
non-atomic reload passes through (the old slot's scope with the new slot's
tables, a slot flipped to before it is filled, a slot cleared while still read)
each make W or Z come out in a way neither set gives. X and Y may come out
either way (each is one set's outcome); the test also counts how often X's
outcome changed, to show the flips were really seen by the client.

Two controls run the same checker against deliberately non-atomic appliers
(clear-then-fill the active slot; flip-then-fill the idle slot) and require it
to find gaps: the checker is able to see the failure it guards against.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from support import need, need_root
from support.cgroup import TestCgroup
from support.daemon import running_daemon
from support.policies import egress, policy_text, tcp_rule

from guard import layout
from guard.kernel import apply
from guard.policy.plan import Plan

pytestmark = pytest.mark.host

NAMES = ("X", "Y", "W", "Z")
# the outcomes each set gives, per port: True = allowed
SET_A = {"X": True, "Y": False, "W": True, "Z": False}
SET_B = {"X": False, "Y": True, "W": True, "Z": False}
CLIENT_MAX_S = 600.0  # the client's own bound, whatever happens to the test

CLIENT = textwrap.dedent("""\
    import errno, json, select, socket, struct, sys, time
    max_s = float(sys.argv[1])
    names = ("X", "Y", "W", "Z")
    listeners = {}
    for name in names:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        listener.setblocking(False)
        listeners[name] = listener
    ports = {n: l.getsockname()[1] for n, l in listeners.items()}
    print(json.dumps(ports), flush=True)
    sys.stdin.readline()  # "go"
    linger = struct.pack("ii", 1, 0)  # close = RST: no TIME_WAIT, no port exhaustion
    counts = {n: {} for n in names}
    last_x = None
    x_changes = 0
    start = time.monotonic()
    calls = 0
    done = False
    while not done:
        for name in names:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            r = s.connect_ex(("127.0.0.1", ports[name]))
            s.close()
            if r in (0, errno.EINPROGRESS):
                outcome = "allow"
            elif r == errno.EPERM:
                outcome = "deny"
            else:
                outcome = errno.errorcode.get(r, str(r))
            c = counts[name]
            c[outcome] = c.get(outcome, 0) + 1
            if name == "X":
                if last_x is not None and outcome != last_x:
                    x_changes += 1
                last_x = outcome
        calls += 4
        if calls % 1024 == 0:
            for listener in listeners.values():
                try:
                    while True:
                        listener.accept()[0].close()
                except OSError:
                    pass
            if select.select([sys.stdin], [], [], 0)[0] or time.monotonic() - start > max_s:
                done = True
    print(json.dumps({"counts": counts, "calls": calls, "x_changes": x_changes,
                      "seconds": time.monotonic() - start}), flush=True)
    """)


def egress_set(name: str, allowed: list[int]) -> str:
    """A whole-host (that is, --host-cgroup) default-deny egress policy allowing TCP to
    127.0.0.1 on ``allowed``."""
    ports = ", ".join(str(p) for p in allowed)
    return policy_text(name, egress(tcp_rule("allow", ports), default="deny"))


@dataclass
class Client:
    proc: subprocess.Popen[str]
    ports: dict[str, int]

    @classmethod
    def start(cls, cgroup: TestCgroup) -> Client:
        proc = cgroup.spawn([sys.executable, "-c", CLIENT, str(CLIENT_MAX_S)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        stdout: IO[str] | None = proc.stdout
        assert stdout is not None
        return cls(proc, json.loads(stdout.readline()))

    def texts(self) -> tuple[str, str]:
        """(set A, set B) as policy files."""
        p = self.ports
        return (egress_set("flip", [p["X"], p["W"]]), egress_set("flip", [p["Y"], p["W"]]))

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        assert ready, "the client did not answer"
        result: dict[str, Any] = json.loads(self.proc.stdout.readline())
        self.proc.wait(timeout=30)
        return result


def gaps(result: dict[str, Any]) -> dict[str, int]:
    """Outcomes neither set gives, per port, with their counts."""
    found: dict[str, int] = {}
    for name in NAMES:
        legal = {("allow" if s[name] else "deny") for s in (SET_A, SET_B)}
        for outcome, count in result["counts"][name].items():
            if outcome not in legal:
                found[f"{name}:{outcome}"] = count
    return found


def report(what: str, result: dict[str, Any], flips: int, seconds: float) -> None:
    print(f"{what}: {flips} flips in {seconds:.1f} s; {result['calls']} connect() calls checked "
          f"in {result['seconds']:.1f} s ({result['calls'] / result['seconds']:.0f}/s); "
          f"outcomes {json.dumps(result['counts'], sort_keys=True)}; "
          f"X changed outcome {result['x_changes']} times; gaps {gaps(result) or 'none'}")


def check(result: dict[str, Any], flips: int) -> None:
    assert gaps(result) == {}, result
    counts = result["counts"]
    # both sets were seen in force, many times: the flips happened under the client
    for name in ("X", "Y"):
        assert counts[name].get("allow", 0) > 0 and counts[name].get("deny", 0) > 0, counts
    assert result["x_changes"] >= min(flips, 100) // 2, result


@pytest.fixture
def cgroups() -> Iterator[tuple[TestCgroup, TestCgroup]]:
    need_root()
    from guard.kernel.loader import probe_family

    feature = probe_family("net")
    need(feature.available, f"cgroup network programs: {feature.reason}")
    with TestCgroup.create() as top:
        yield top, top.child("in")


# --- through the daemon ------------------------------------------------------------------


def save_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def syslog_sink(tmp_path: Path) -> str:
    """A syslog target nobody reads: the daemon queues and counts, the test needs no lines."""
    return f"unix:{tmp_path / 'nobody.sock'}"


def test_no_gap_while_sighup_flips_the_daemon(cgroups: tuple[TestCgroup, TestCgroup],
                                              tmp_path: Path) -> None:
    top, inside = cgroups
    flips = int(os.environ.get("GUARD_GAP_FLIPS_SIGHUP", "300"))
    client = Client.start(inside)
    set_a, set_b = client.texts()
    policies = tmp_path / "policies"
    policies.mkdir()
    policy = policies / "flip.yaml"
    policy.write_text(set_a)
    with running_daemon(policies, top, syslog_sink(tmp_path), tmp_path, "gap-sighup",
                        extra=("--no-watch",)) as guard:
        generation = guard.status()["generation"]
        client.go()
        start = time.monotonic()
        for i in range(flips):
            save_atomically(policy, set_b if i % 2 == 0 else set_a)
            guard.wait_reloaded(guard.sighup())
        seconds = time.monotonic() - start
        time.sleep(0.2)
        result = client.finish()
        status = guard.status()
    assert status["generation"] == generation + flips  # each SIGHUP really flipped
    assert status["last_reload_error"] is None
    report("daemon, SIGHUP", result, flips, seconds)
    check(result, flips)


def test_no_gap_while_file_edits_flip_the_daemon(cgroups: tuple[TestCgroup, TestCgroup],
                                                 tmp_path: Path) -> None:
    top, inside = cgroups
    flips = int(os.environ.get("GUARD_GAP_FLIPS_WATCH", "200"))
    client = Client.start(inside)
    set_a, set_b = client.texts()
    policies = tmp_path / "policies"
    policies.mkdir()
    policy = policies / "flip.yaml"
    policy.write_text(set_a)
    with running_daemon(policies, top, syslog_sink(tmp_path), tmp_path, "gap-watch") as guard:
        generation = guard.status()["generation"]
        client.go()
        start = time.monotonic()
        for i in range(flips):
            save_atomically(policy, set_b if i % 2 == 0 else set_a)
            guard.wait_status(lambda s, n=i: s["generation"] >= generation + n + 1)  # type: ignore[misc]
        seconds = time.monotonic() - start
        time.sleep(0.2)
        result = client.finish()
        status = guard.status()
    assert status["generation"] == generation + flips
    assert status["last_reload"]["reason"] == "watch"
    report("daemon, file edits", result, flips, seconds)
    check(result, flips)


# --- in-process: apply driven directly, thousands of flips -----------------------------


def compile_sets(top: TestCgroup, texts: tuple[str, str], work: Path) -> tuple[Plan, Plan]:
    from guard.policy.load import PolicyLoad, load_policies

    plans = []
    for name, text in zip(("a", "b"), texts, strict=True):
        directory = work / name
        directory.mkdir()
        (directory / "flip.yaml").write_text(text)
        loaded = load_policies(str(directory), top.path, unit_lookup=lambda units: {})
        assert isinstance(loaded, PolicyLoad), loaded
        plans.append(loaded.plan)
    return plans[0], plans[1]


Flipper = Callable[[Plan], None]


def run_flips(cgroups: tuple[TestCgroup, TestCgroup], tmp_path: Path, flips: int,
              make: Callable[[Any], Flipper]) -> tuple[dict[str, Any], float]:
    """The client runs while ``make(kernel)`` flips between the two plans ``flips`` times."""
    from guard.kernel.loader import Kernel

    top, inside = cgroups
    client = Client.start(inside)
    plan_a, plan_b = compile_sets(top, client.texts(), tmp_path)
    with Kernel(families={"net"}, host_cgroup=top.path) as kernel:
        flip = make(kernel)
        flip(plan_a)
        client.go()
        start = time.monotonic()
        try:
            for i in range(flips):
                flip(plan_b if i % 2 == 0 else plan_a)
            seconds = time.monotonic() - start
            time.sleep(0.05)
        finally:
            result = client.finish()
    return result, seconds


def test_no_gap_in_thousands_of_direct_applies(cgroups: tuple[TestCgroup, TestCgroup],
                                               tmp_path: Path) -> None:
    """guard.kernel.apply.Applier as the daemon uses it, with a shorter settle time than the
    daemon's 50 ms so that thousands of flips fit in a test (still thousands of
    times longer than one decision)."""
    flips = int(os.environ.get("GUARD_GAP_FLIPS_DIRECT", "3000"))
    results: list[apply.ApplyResult] = []

    def make(kernel: Any) -> Flipper:
        applier = apply.Applier(kernel, settle_s=0.002)
        return lambda plan: results.append(applier.apply(plan))

    result, seconds = run_flips(cgroups, tmp_path, flips, make)
    assert all(r.changed for r in results)  # every apply flipped
    assert results[-1].generation == flips + 1
    report("in-process Applier", result, flips, seconds)
    check(result, flips)


# --- controls: the checker finds the gaps of non-atomic appliers ------------------------


def naive_flipper(kernel: Any, strategy: str) -> Flipper:
    """Deliberately wrong appliers. "in-place": clear the active slot, then fill it
    with the new set. "flip-first": flip to the idle slot, then fill it (and clear the
    old one). Each pauses 1 ms between its two halves: the time writing a large set
    takes."""
    writer = apply.MapWriter(kernel)
    live: list[apply.SlotEntries] = [{name: {} for name in apply.MAP_NAMES} for _ in range(2)]
    from guard.kernel.cgroups import cgroup_id

    def fill(slot: int, new: apply.SlotEntries) -> None:
        for name in apply.MAP_NAMES:
            before, after = live[slot][name], new[name]
            writer.delete(name, [k for k in before if k not in after])
            writer.update(name, [(k, v) for k, v in after.items() if before.get(k) != v])
        live[slot] = new

    def flip(plan: Plan) -> None:
        ids, _warnings = apply.scope_ids(plan, cgroup_id)
        active = writer.read_config().active_slot & 1
        if strategy == "in-place":
            fill(active, {name: {} for name in apply.MAP_NAMES})
            time.sleep(0.001)
            fill(active, apply.slot_entries(plan, active, ids))
        else:
            idle = 1 - active
            writer.write_config(layout.Config(active_slot=idle, generation=0))
            time.sleep(0.001)
            fill(idle, apply.slot_entries(plan, idle, ids))
            fill(active, {name: {} for name in apply.MAP_NAMES})

    return flip


@pytest.mark.parametrize("strategy", ["in-place", "flip-first"])
def test_the_checker_finds_the_gaps_of_a_non_atomic_apply(
        cgroups: tuple[TestCgroup, TestCgroup], tmp_path: Path, strategy: str) -> None:
    flips = 300
    result, seconds = run_flips(cgroups, tmp_path, flips,
                                lambda kernel: naive_flipper(kernel, strategy))
    report(f"control, {strategy} (must show gaps)", result, flips, seconds)
    found = gaps(result)
    assert found, f"the checker saw no gap in a {strategy} apply: {result}"
    assert set(found) <= {"W:deny", "Z:allow"}, found
