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

The namespaces, the veth pair, addresses and routes are made through netlink
(pyroute2), with the test lab's ``Namespaces`` and ``Netlink`` (support.netns).

Teardown (``close``, also on failure): stop the servers, delete both
namespaces (which removes the veth pair and every netfilter rule in them) and
the cgroups. Everything is named ``guard-bench-*`` so a leftover is recognisable.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from support.cgroup import TestCgroup, setns_net, terminate
from support.netns import Namespaces, Netlink

CLIENT_ADDR = "198.51.100.1"
PEER_ADDR = "198.51.100.2"
ACCEPT_PORT = 5001
SINK_PORT = 5002
SERVER_LIFETIME_S = 3600  # the servers end by themselves even if teardown never runs


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
    namespaces: Namespaces = field(default_factory=Namespaces)
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
            self.namespaces.add(c)
            self.namespaces.add(p)
            with Netlink(c) as client, Netlink(p) as peer:
                client.add_veth("c0", "p0", p)
                for side in (client, peer):
                    side.up("lo")
                client.add_address("c0", f"{CLIENT_ADDR}/24")
                peer.add_address("p0", f"{PEER_ADDR}/24")
                client.up("c0")
                peer.up("p0")
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
        with Netlink(self.peer_ns) as peer:
            peer.add_address("p0", f"{address}/32")
        with Netlink(self.client_ns) as client:
            client.add_route(f"{address}/32", PEER_ADDR)

    def close(self) -> None:
        try:
            for server in self.servers:
                terminate(server)
                for stream in (server.stdout, server.stderr):
                    if stream is not None:
                        stream.close()
        finally:
            self.servers.clear()
            self.namespaces.close()  # after the servers: a process keeps its namespace

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
