"""The settings of the host tests on guard's cgroup network programs.

    with syslog_and_cgroup(tmp_path) as (top, syslog):
        inside = top.child("in")
        ...   # the daemon with --host-cgroup top.path --syslog unix:{syslog.unix_path}

    with net_kernel(work) as net:
        ...   # net.kernel's programs attached to net.top; net.lab's peers to talk to

Each skips (fails in CI) unless the test runs as root and the kernel runs the
network programs (``syslog_and_cgroup``: and rsyslogd is installed), and undoes
what it made on the way out, whatever happened.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from support import need, need_root
from support.cgroup import TestCgroup, attached_programs
from support.daemon import NET_ATTACH_TYPES
from support.netns import NetLab
from support.rsyslog import Rsyslog

if TYPE_CHECKING:
    from guard.kernel.loader import Kernel


def need_net_programs() -> None:
    """Skip unless the kernel loads and attaches guard's cgroup network programs."""
    # imported here: loading guard.kernel.loader imports bcc, which a skipped test need not pay
    from guard.kernel.loader import probe_family

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


@dataclass(frozen=True)
class NetKernel:
    """What ``net_kernel`` made; a test module's Env extends it with its own tools."""

    top: TestCgroup  # the programs are attached here
    inside: TestCgroup  # top/in
    outside: TestCgroup  # top/out
    lab: NetLab
    kernel: Kernel
    policy_dir: Path  # empty, for the test's policy files


@contextlib.contextmanager
def net_kernel(work: Path) -> Iterator[NetKernel]:
    """The network family loaded in this process and attached to a fresh test cgroup
    (two children, ``in`` and ``out``), beside a network namespace lab; on the way out,
    proof that no program stays attached."""
    need_root()
    need_net_programs()
    from guard.kernel.loader import Kernel

    policy_dir = work / "policies"
    policy_dir.mkdir()
    with TestCgroup.create() as top, NetLab.create(work) as lab:
        inside, outside = top.child("in"), top.child("out")
        with Kernel(families={"net"}, host_cgroup=top.path) as kernel:
            yield NetKernel(top, inside, outside, lab, kernel, policy_dir)
        # egress, connect4/6, sendmsg4/6: each type on its own, so a failure names it
        attached = [attached_programs(top.directory, t) for t in NET_ATTACH_TYPES]
        assert attached == [0] * len(NET_ATTACH_TYPES)
