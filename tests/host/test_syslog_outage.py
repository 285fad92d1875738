"""The audit stream across a syslog outage, end to end through the daemon.

tests/host/test_syslog_sinks.py drives guard's Sink directly; here the real
rsyslogd is stopped under a running daemon, real denials happen while it is
down, and it is started again. Each denial is a connect to a different denied
port (so no two events are alike and none is folded into another), from one
client process inside the scoped cgroup.

* queue large enough: every one of the denials arrives once rsyslogd is back;
* queue of 40 lines: the lines that arrive plus the count of the kind=lost
  line (source=sink) are exactly the denials, and ``guard status`` says the same.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.cgroup import TestCgroup
from support.daemon import attached_total
from support.lab import syslog_and_cgroup
from support.policies import egress, policy_text, tcp_rule
from support.rsyslog import Rsyslog, guard_messages
from support.service import GuardService, start_guard

FIRST_PORT, COUNT = 21000, 150  # denied: FIRST_PORT .. FIRST_PORT + COUNT - 1

CLIENT = textwrap.dedent("""\
    import json, socket, sys
    first, count = int(sys.argv[1]), int(sys.argv[2])
    results = []
    for port in range(first, first + count):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
            results.append(0)
        except OSError as error:
            results.append(error.errno)
        finally:
            s.close()
    print(json.dumps(results))
    """)


def policy(cgroup: str) -> str:
    ports = f"{FIRST_PORT}-{FIRST_PORT + COUNT - 1}"
    return policy_text("ports", egress(tcp_rule("deny", f'"{ports}"')), scope=cgroup)


@dataclass
class Outage:
    top: TestCgroup
    inside: TestCgroup
    syslog: Rsyslog
    work: Path

    def start(self, queue: int) -> GuardService:
        """The daemon with a syslog queue of ``queue`` lines (GUARD_SYSLOG_QUEUE)."""
        policies = self.work / "policies"
        policies.mkdir(exist_ok=True)
        (policies / "ports.yaml").write_text(policy(self.inside.path))
        state = self.work / "state"
        guard = start_guard(
            ["run", "--policies", str(policies), "--syslog", f"unix:{self.syslog.unix_path}",
             "--host-cgroup", self.top.path, "--state-dir", str(state), "--no-watch"],
            state, self.work / "guard.stderr", env={"GUARD_SYSLOG_QUEUE": str(queue)})
        guard.wait_ready(120)
        return guard

    def deny_all(self) -> int:
        proc = self.inside.spawn([sys.executable, "-c", CLIENT, str(FIRST_PORT), str(COUNT)],
                                 stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=120)
        assert json.loads(out) == [errno.EPERM] * COUNT
        return proc.pid


@pytest.fixture
def outage(tmp_path: Path) -> Iterator[Outage]:
    with syslog_and_cgroup(tmp_path) as (top, syslog):
        yield Outage(top, top.child("in"), syslog, tmp_path)
        assert attached_total(top.directory) == 0


def run_outage(outage: Outage, queue: int) -> tuple[GuardService, int, dict[str, object]]:
    """Start the daemon with a queue of ``queue`` lines, stop rsyslogd, deny COUNT
    connects, start rsyslogd again; (daemon, client pid, status once drained)."""
    guard = outage.start(queue)
    try:
        # the start lines delivered first, so the queue holds denials only
        wait(lambda: guard.status()["sink"]["queued"] == 0, "start lines delivered")
        outage.syslog.stop()  # waits for rsyslogd to exit: every send from now on fails
        pid = outage.deny_all()
        wait(lambda: guard.status()["events"]["received"] >= COUNT, "denials read")
        down = guard.status()
        assert down["events"]["received"] == COUNT and not down["sink"]["connected"]
        assert down["sink"]["queued"] == min(queue, COUNT)
        outage.syslog.start()
        wait(lambda: (lambda s: s["queued"] == 0 and s["overflow_unreported"] == 0
                      and s["connected"])(guard.status()["sink"]), "backlog delivered", 60)
        return guard, pid, guard.status()
    except BaseException:
        guard.stop()
        raise


def wait(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.1)


def test_every_denial_arrives_after_the_outage(outage: Outage) -> None:
    guard, pid, status = run_outage(outage, queue=10_000)
    try:
        lines = outage.syslog.wait_for(lambda ls: len(
            [m for m in guard_messages(ls) if m.fields.get("pid") == str(pid)]) >= COUNT,
            timeout=30)
        denies = [m for m in guard_messages(lines) if m.fields.get("pid") == str(pid)]
        ports = [int(m.fields["port"]) for m in denies]
        assert ports == list(range(FIRST_PORT, FIRST_PORT + COUNT))  # all, once, in order
        assert all(m.fields["count"] == "1" for m in denies)
        assert not [m for m in guard_messages(lines) if m.fields.get("kind") == "lost"]
        events = status["events"]
        assert isinstance(events, dict) and events["lost"]["sink"] == 0
    finally:
        guard.stop()


def test_overflow_during_the_outage_is_counted_exactly(outage: Outage) -> None:
    guard, pid, status = run_outage(outage, queue=40)
    try:
        time.sleep(1.0)  # anything more would arrive now
        lines = outage.syslog.lines()
        messages = guard_messages(lines)
        denies = [m for m in messages if m.fields.get("pid") == str(pid)]
        [lost] = [m for m in messages if m.procid == str(guard.pid)
                  and m.fields.get("kind") == "lost"]
        assert lost.fields["source"] == "sink"
        assert len(denies) + int(lost.fields["count"]) == COUNT
        assert 0 < len(denies) <= 40
        # the oldest lines are the ones kept
        ports = [int(m.fields["port"]) for m in denies]
        assert ports == list(range(FIRST_PORT, FIRST_PORT + len(denies)))
        events = status["events"]
        assert isinstance(events, dict)
        assert events["lost"]["sink"] == int(lost.fields["count"])
        # the lost line came before the backlog it speaks for
        order = [m for m in messages if m.procid == str(guard.pid)]
        assert order.index(lost) < order.index(denies[0])
    finally:
        guard.stop()
