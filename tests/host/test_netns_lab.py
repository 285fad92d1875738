"""The network namespace lab of the host tests (support/netns.py), built through netlink.

The enforcement tests trust the lab to be what its docstring draws, and to leave
nothing behind. These tests prove both with the kernel's own answers: the links,
addresses and routes that netlink reports inside each namespace, echoes over
loopback and over the veth pair, and, after teardown, no name left in /run/netns
and no process left in the namespaces (the last holders of a namespace whose name
is gone, so the kernel has freed it with the veth pair).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns
from support import need_root
from support.netns import (
    CLIENT_V4,
    CLIENT_V6,
    PEER_V4,
    PEER_V6,
    PORTS,
    Namespaces,
    NetLab,
    Netlink,
)


@pytest.fixture(autouse=True)
def _root() -> None:
    need_root()


def namespace_inode(name: str) -> tuple[int, int]:
    st = os.stat(f"/run/netns/{name}")
    return st.st_dev, st.st_ino


def processes_in(inodes: set[tuple[int, int]]) -> list[int]:
    """The pids whose network namespace is one of ``inodes``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue  # exited meanwhile
        if (st.st_dev, st.st_ino) in inodes:
            found.append(int(entry.name))
    return found


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[NetLab]:
    with NetLab.create(tmp_path) as made:
        yield made


def test_each_namespace_holds_what_the_lab_draws(lab: NetLab) -> None:
    with Netlink(lab.client_ns) as client:
        assert client.links() == {"lo", "c0"}
        assert {f"{CLIENT_V4}/24", f"{CLIENT_V6}/64"} <= client.addresses("c0")
        assert client.routes(socket.AF_INET) == {("203.0.113.0/24", PEER_V4[0])}
        assert client.routes(socket.AF_INET6) == {("2001:db8:2::/64", PEER_V6[0])}
    with Netlink(lab.peer_ns) as peer:
        assert peer.links() == {"lo", "p0"}
        assert ({f"{a}/24" for a in PEER_V4} | {f"{a}/64" for a in PEER_V6}
                <= peer.addresses("p0"))
        assert peer.routes(socket.AF_INET) == set()
    # the veth pair was made inside the namespaces: the test's own has neither end
    assert not {"c0", "p0"} & {name for _, name in socket.if_nameindex()}


def test_loopback_and_the_veth_pair_carry_traffic(lab: NetLab) -> None:
    # NetLab.create already had an echo from every peer address (warm_up)
    for addr in ("127.0.0.1", "::1"):
        token = f"loopback-{addr}"
        assert lab.run(None, "tcp", addr, PORTS[0], token) == {"result": "ok", "echo": token}
        assert lab.loopback_received(token)
    token = "routed-v6"
    assert lab.run(None, "udp", PEER_V6[2], PORTS[1], token) == {"result": "ok", "echo": token}
    assert lab.peer_received(token)


def test_close_leaves_no_namespace_and_no_process_in_one(tmp_path: Path) -> None:
    lab = NetLab.create(tmp_path)
    names = (lab.client_ns, lab.peer_ns)
    inodes = {namespace_inode(name) for name in names}
    servers = [server.proc for server in lab.servers.values()]
    assert len(processes_in(inodes)) == len(servers) == 2
    lab.close()
    assert not set(names) & set(netns.listnetns())
    assert all(proc.poll() is not None for proc in servers)
    assert processes_in(inodes) == []


@pytest.mark.parametrize("where", ["add_route", "warm_up"])
def test_a_lab_that_fails_halfway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 where: str) -> None:
    made: list[str] = []
    seen: dict[str, Any] = {}
    add = Namespaces.add

    def recording_add(self: Namespaces, name: str) -> str:
        made.append(name)
        return add(self, name)

    def fail_route(self: Netlink, dst: str, gateway: str) -> None:
        seen["names"] = netns.listnetns()
        raise RuntimeError("injected failure")

    def fail_warm_up(self: NetLab) -> None:
        seen["names"] = netns.listnetns()
        seen["servers"] = [server.proc for server in self.servers.values()]
        raise RuntimeError("injected failure")

    monkeypatch.setattr(Namespaces, "add", recording_add)
    if where == "add_route":
        monkeypatch.setattr(Netlink, "add_route", fail_route)
    else:
        monkeypatch.setattr(NetLab, "warm_up", fail_warm_up)
    with pytest.raises(RuntimeError, match="injected failure"):
        NetLab.create(tmp_path)
    assert len(made) == 2 and set(made) <= set(seen["names"])  # both existed when it failed
    assert not set(made) & set(netns.listnetns())
    assert all(proc.poll() is not None for proc in seen.get("servers", []))


def test_a_taken_name_is_refused_and_left_to_its_owner() -> None:
    name = f"guard-test-{os.getpid()}-taken"
    owner, other = Namespaces(), Namespaces()
    try:
        owner.add(name)
        with pytest.raises(RuntimeError, match="exists already"):
            other.add(name)
        other.close()
        assert name in netns.listnetns()
    finally:
        owner.close()
    assert name not in netns.listnetns()
