"""File audit lines at a real rsyslogd, from a real ``guard run``, in the BPF-LSM guest.

ONE daemon start for the module (bcc compiles every program family at start:
minutes under TCG). Its programs judge a cgroup this module made
(``--host-cgroup``; the policy has no scope, so it covers that cgroup and the
cgroups below it); the acting process is a ``FileProbe`` in a child cgroup.
The syslog target is a real rsyslogd listening on a unix socket; the tests
read back the raw lines it wrote and parse them strictly (RFC 5424).

What is shown: an audited read succeeds and is exactly one line at rsyslogd,
with its fields; a denied write fails with EPERM and is one deny line; a burst
of reads of one file is one line for the first and one aggregated line for
the rest, whose counts add up to the number of opens.
"""

from __future__ import annotations

import errno
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.cgroup import TestCgroup
from support.daemon import GuardDaemon, running_daemon
from support.rsyslog import Rsyslog, Syslog5424, guard_messages
from test_files_enforce import FileProbe, make

pytestmark = pytest.mark.guest

READY_TIMEOUT = 900.0  # bcc compiles net, exec, files, tamper under TCG
WINDOW_S = 1.0  # guard run's default aggregation window
LINE_TIMEOUT = 30.0


def policy_text(audited: Path, hot: Path, protected: Path) -> str:
    return textwrap.dedent(f"""\
        apiVersion: guard/v1
        kind: Policy
        metadata:
          name: files-audit
        spec:
          mode: enforce
          files:
            rules:
              - {{action: audit, access: [read], paths: ["{audited}", "{hot}"]}}
              - {{action: deny, access: [write], paths: ["{protected}/**"]}}
        """)


@dataclass
class Lab:
    guard: GuardDaemon
    syslog: Rsyslog
    inside: TestCgroup
    policy: Path
    audited: Path
    hot: Path
    protected: Path

    def lines(self, predicate: Callable[[Syslog5424], bool]) -> list[Syslog5424]:
        return [m for m in guard_messages(self.syslog.lines()) if predicate(m)]

    def wait_lines(self, predicate: Callable[[Syslog5424], bool],
                   done: Callable[[list[Syslog5424]], bool]) -> list[Syslog5424]:
        """Lines matching ``predicate`` once ``done`` holds for them, then one more
        aggregation window (and a margin) so that a line too many would show."""
        deadline = time.monotonic() + LINE_TIMEOUT
        while not done(found := self.lines(predicate)):
            assert time.monotonic() < deadline, [m.fields for m in found]
            time.sleep(0.1)
        time.sleep(2 * WINDOW_S + 0.5)
        return self.lines(predicate)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    work = tmp_path_factory.mktemp("files-syslog")
    files = work / "files"
    audited = make(files / "shadow")
    hot = make(files / "hot")
    protected = files / "etc"
    make(protected / "conf")
    policies = work / "policies"
    policies.mkdir()
    policy = policies / "files.yaml"
    policy.write_text(policy_text(audited, hot, protected))
    with Rsyslog(work / "rsyslog", unix=True) as syslog, TestCgroup.create() as top:
        inside = top.child("in")
        with running_daemon(policies, top, f"unix:{syslog.unix_path}", work, "guest-files",
                            ready_timeout=READY_TIMEOUT) as guard:
            print(f"guard run -> READY=1 in {guard.ready_after:.1f} s")
            assert "files" in guard.status()["families"]["enforced"]
            yield Lab(guard, syslog, inside, policy, audited, hot, protected)


@pytest.fixture
def probe(lab: Lab) -> Iterator[FileProbe]:
    p = FileProbe.start(lab.inside)
    try:
        yield p
    finally:
        p.close()


def of(probe: FileProbe, path: Path) -> Callable[[Syslog5424], bool]:
    pid = str(probe.proc.pid)
    return lambda m: m.fields.get("pid") == pid and m.fields.get("path") == str(path)


def test_an_audited_read_is_one_line_at_rsyslogd(lab: Lab, probe: FileProbe) -> None:
    assert probe.read(lab.audited) == 0
    (line,) = lab.wait_lines(of(probe, lab.audited), lambda found: len(found) >= 1)
    fields = line.fields
    assert (fields["action"], fields["kind"], fields["hook"]) == ("audit", "file", "file_open")
    assert (fields["path"], fields["access"]) == (str(lab.audited), "read")
    assert (fields["policy"], fields["rule"]) == ("files-audit", "files-audit/files.rules[0]")
    assert fields["location"] == f"{lab.policy}:9"
    assert fields["cgroup"] == lab.inside.path
    assert fields["ppid"] == str(os.getpid()) and fields["uid"] == "0"
    assert fields["comm"] == Path(sys.executable).name[:15]
    assert fields["exe"] == Path(sys.executable).resolve().name
    assert fields["count"] == "1"
    assert line.msg.startswith(f"audit read of {lab.audited} by pid {probe.proc.pid}")


def test_a_denied_write_fails_and_is_one_deny_line(lab: Lab, probe: FileProbe) -> None:
    conf = lab.protected / "conf"
    assert probe.write(conf) == errno.EPERM
    assert probe.call("rename", lab.hot, lab.protected / "moved-in") == errno.EPERM
    assert probe.read(conf) == 0  # reads there are neither refused nor audited
    (line,) = lab.wait_lines(of(probe, conf), lambda found: len(found) >= 1)
    assert (line.fields["action"], line.fields["access"]) == ("deny", "write")
    assert line.fields["rule"] == "files-audit/files.rules[1]"
    (moved,) = lab.lines(of(probe, lab.protected / "moved-in"))
    assert (moved.fields["action"], moved.fields["hook"]) == ("deny", "path_change")
    assert lab.hot.exists()


def test_a_burst_of_reads_is_one_line_and_one_aggregated_line(
    lab: Lab, probe: FileProbe
) -> None:
    count = 500
    assert probe.burst(lab.hot, os.O_RDONLY, count) == 0
    mine = lab.wait_lines(of(probe, lab.hot),
                          lambda found: sum(int(m.fields["count"]) for m in found) >= count)
    counts = [int(m.fields["count"]) for m in mine]
    assert sum(counts) == count, counts
    assert counts[0] == 1  # the first went out at once
    assert len(counts) <= 3 and max(counts) > 1, counts  # the rest folded per window
    assert all(m.fields["action"] == "audit" and m.fields["access"] == "read" for m in mine)
    # nothing was lost on the way: no kind=lost line
    assert not lab.lines(lambda m: m.fields.get("kind") == "lost")
