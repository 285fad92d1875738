"""The setting of a host test that runs the daemon on the network programs: a real
rsyslogd and a cgroup the test made.

    with syslog_and_cgroup(tmp_path) as (top, syslog):
        inside = top.child("in")
        ...   # the daemon with --host-cgroup top.path --syslog unix:{syslog.unix_path}

Skips (fails in CI) unless the test runs as root, rsyslogd is installed and the
kernel runs guard's cgroup network programs; removes the cgroup and stops
rsyslogd on the way out, whatever happened.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from support import need, need_root
from support.cgroup import TestCgroup
from support.rsyslog import Rsyslog


def need_net_programs() -> None:
    """Skip unless the kernel loads and attaches guard's cgroup network programs."""
    # imported here: loading guard.loader imports bcc, which a skipped test need not pay
    from guard.loader import probe_family

    feature = probe_family("net")
    need(feature.available, f"cgroup network programs: {feature.reason}")


@contextlib.contextmanager
def syslog_and_cgroup(work: Path) -> Iterator[tuple[TestCgroup, Rsyslog]]:
    """A fresh test cgroup and a started rsyslogd listening on a unix socket below
    ``work``/rsyslog, after the checks above."""
    need_root()
    need(shutil.which("rsyslogd") is not None, "rsyslogd is not installed (scripts/setup)")
    need_net_programs()
    syslog = Rsyslog(work / "rsyslog", unix=True)
    syslog.start()
    try:
        with TestCgroup.create() as top:
            yield top, syslog
    finally:
        syslog.stop()
