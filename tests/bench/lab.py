"""The bench's own cgroups and network namespaces, and the servers in them.

    client ns  c0  198.51.100.1/24 ---- veth ---- p0  198.51.100.2/24  peer ns
                                                   serve-accept :5001, serve-sink :5002
                                                   (on every address of the peer ns)

The clients run in the client namespace, each in a cgroup of the bench's own
(``/guard-bench-XXXX/<engine>``), so that:

- guard's programs are attached to one of those cgroups only;
- the iptables / nftables peers live in the client namespace's own netfilter
  tables (the host's tables are never touched), and each is scoped to its
  engine's cgroup there, so a client of another engine does not walk its rules;
- all traffic stays between two namespaces the bench made (documentation
  addresses that exist nowhere else).

Teardown (``close``, also on failure): stop the servers, delete both
namespaces (which removes the veth pair and every netfilter rule in them) and
the cgroups. Everything is named ``guard-bench-*`` so a leftover is recognisable.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from support.cgroup import TestCgroup, setns_net, terminate

CLIENT_ADDR = "198.51.100.1"
PEER_ADDR = "198.51.100.2"
ACCEPT_PORT = 5001
SINK_PORT = 5002
SERVER_LIFETIME_S = 3600  # the servers end by themselves even if teardown never runs


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def in_netns(ns: str, argv: list[str], stdin: str | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a command in a network namespace.

    Through setns, not ``ip netns exec``: that remounts /sys for the namespace, and
    nft then cannot find the cgroup2 paths its ``socket cgroupv2`` rules name.
    """
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout,
                          check=False, preexec_fn=lambda: setns_net(ns))


def enter(cgroup: TestCgroup | None, netns: str | None,
          then: Callable[[], None] | None = None) -> Callable[[], None]:
    """A preexec function: join ``cgroup`` and ``netns``, then run ``then`` (Landlock)."""
    procs = str(cgroup.directory / "cgroup.procs") if cgroup is not None else None

    def preexec() -> None:
        if procs is not None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        if netns is not None:
            setns_net(netns)
        if then is not None:
            then()

    return preexec


@dataclass
class NetLab:
    probe: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    made: list[str] = field(default_factory=list)
    servers: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def client_ns(self) -> str:
        return f"guard-bench-{self.tag}-c"

    @property
    def peer_ns(self) -> str:
        return f"guard-bench-{self.tag}-p"

    def build(self) -> NetLab:
        try:
            c, p = self.client_ns, self.peer_ns
            for ns in (c, p):
                ip("netns", "add", ns)
                self.made.append(ns)
                ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", c, "link", "add", "c0", "type", "veth", "peer", "name", "p0", "netns", p)
            ip("-n", c, "addr", "add", f"{CLIENT_ADDR}/24", "dev", "c0")
            ip("-n", p, "addr", "add", f"{PEER_ADDR}/24", "dev", "p0")
            ip("-n", c, "link", "set", "c0", "up")
            ip("-n", p, "link", "set", "p0", "up")
            from bench import probe

            for mode, port in (("serve-accept", ACCEPT_PORT), ("serve-sink", SINK_PORT)):
                self.servers.append(probe.start(
                    self.probe, [mode, "0.0.0.0", str(port), str(SERVER_LIFETIME_S)],
                    preexec=enter(None, p)))
        except BaseException:
            self.close()
            raise
        return self

    def add_peer_address(self, address: str) -> None:
        """Give the peer one more address, routed to from the client namespace."""
        ip("-n", self.peer_ns, "addr", "add", f"{address}/32", "dev", "p0")
        ip("-n", self.client_ns, "route", "add", f"{address}/32", "via", PEER_ADDR)

    def close(self) -> None:
        for server in self.servers:
            terminate(server)
            for stream in (server.stdout, server.stderr):
                if stream is not None:
                    stream.close()
        self.servers.clear()
        for ns in reversed(self.made):
            with contextlib.suppress(RuntimeError):
                ip("netns", "del", ns)
        self.made.clear()

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
