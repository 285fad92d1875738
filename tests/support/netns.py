"""Two network namespaces joined by a veth pair, with echo servers: real peers.

    client ns  c0  198.51.100.1/24, 2001:db8:1::1/64    routes to 203.0.113.0/24
                                                         and 2001:db8:2::/64 via the peer
    peer ns    p0  198.51.100.2/24, 198.51.100.3/24, 203.0.113.2/24,
                   2001:db8:1::2/64, 2001:db8:1::3/64, 2001:db8:2::2/64

Addresses come from the documentation ranges and exist only inside the two
namespaces (the veth pair is made inside them and never appears in the host's
namespace), so test traffic cannot leave the machine and cannot collide with
the host's own addresses or with another test run. IPv6 addresses are added
with IFA_F_NODAD so they are usable at once.

The lab is built through netlink with pyroute2, no ``ip`` command: the
namespaces with ``pyroute2.netns`` (``Namespaces``), and every link, address
and route with an ``IPRoute`` socket opened inside the namespace it changes
(``Netlink``). The benchmark's lab (tests/bench/lab.py) uses the same two.
Programs run inside a namespace by joining it between fork and exec
(``support.cgroup.setns_net``).

A TCP + UDP echo server runs in each namespace on ``PORTS`` (IPv4 and IPv6; in
the client namespace it answers on loopback). Every payload a server receives
is appended to its log, so a test can prove that a datagram was *not*
delivered. Clients run ``CLIENT`` (``python -c CLIENT OP ...``) and print one
JSON result.

Teardown (``close``, also when building failed halfway) kills only the servers
this object started and removes only the namespaces it made. Removing a
namespace's name lets the kernel free it, with the veth pair, its addresses
and routes, as soon as no process or socket is left in it: the lab's netlink
sockets are closed as soon as the lab is built, the servers are stopped first,
and clients are the test's own processes (its cgroup's teardown kills them).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute, NetlinkError, netns
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from support.cgroup import TestCgroup, setns_net, terminate

PORTS = (7000, 7001, 7002, 7009, 7010, 7019, 7020)
SERVER_LIFETIME_S = 900  # servers exit by themselves even if teardown never runs

CLIENT_V4, CLIENT_V6 = "198.51.100.1", "2001:db8:1::1"
PEER_V4 = ("198.51.100.2", "198.51.100.3", "203.0.113.2")
PEER_V6 = ("2001:db8:1::2", "2001:db8:1::3", "2001:db8:2::2")

SERVER = r"""
import os, select, socket, sys, time
ports = [int(p) for p in sys.argv[2].split(",")]
log = open(sys.argv[1], "a", buffering=1)
deadline = time.monotonic() + float(sys.argv[3])
listeners, udp, conns = {}, {}, {}
for port in ports:
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        t = socket.socket(family, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        t.bind((host, port)); t.listen(64); t.setblocking(False)
        listeners[t.fileno()] = (t, port)
        u = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        u.bind((host, port)); u.setblocking(False)
        udp[u.fileno()] = (u, port)
print("ready", flush=True)
poller = select.poll()
for fd in list(listeners) + list(udp):
    poller.register(fd, select.POLLIN)
poller.register(0, select.POLLIN)
while time.monotonic() < deadline:
    for fd, ev in poller.poll(500):
        if fd == 0:
            if not os.read(0, 4096):
                sys.exit(0)
        elif fd in listeners:
            sock, port = listeners[fd]
            try:
                c, _ = sock.accept()
            except OSError:
                continue
            c.setblocking(False)
            conns[c.fileno()] = (c, port)
            poller.register(c.fileno(), select.POLLIN)
        elif fd in udp:
            sock, port = udp[fd]
            try:
                data, peer = sock.recvfrom(65535)
            except OSError:
                continue
            log.write(f"udp {port} {data.decode(errors='replace')}\n")
            try:
                sock.sendto(data, peer)
            except OSError:
                pass
        elif fd in conns:
            c, port = conns[fd]
            try:
                data = c.recv(65535)
            except OSError:
                data = b""
            if not data:
                poller.unregister(fd); c.close(); del conns[fd]
                continue
            log.write(f"tcp {port} {data.decode(errors='replace')}\n")
            try:
                c.sendall(data)
            except OSError:
                pass
"""

CLIENT = r"""
import errno, json, socket, sys, time

def family_of(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET

def failure(e):
    return {"result": "error", "errno": e.errno, "name": type(e).__name__}

def tcp(addr, port, token, timeout):
    s = socket.socket(family_of(addr), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
    except OSError as e:
        return failure(e)
    try:
        s.sendall(token.encode())
        data = s.recv(65535)
    except socket.timeout:
        return {"result": "timeout", "connected": True}
    except OSError as e:
        return dict(failure(e), connected=True)
    return {"result": "ok", "echo": data.decode()}

def udp(addr, port, token, timeout):
    s = socket.socket(family_of(addr), socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(token.encode(), (addr, port))
    except OSError as e:
        return failure(e)
    try:
        data, _ = s.recvfrom(65535)
    except socket.timeout:
        return {"result": "timeout", "sent": True}
    except OSError as e:
        return dict(failure(e), sent=True)
    return {"result": "ok", "echo": data.decode()}

def hold(kind, addr, port, token, timeout):
    # connect while allowed, then send one line per stdin line; report each
    stype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(family_of(addr), stype)
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
    except OSError as e:
        print(json.dumps(failure(e)), flush=True)
        return
    def exchange(payload, count):
        sent = errors = 0
        last = None
        for _ in range(count):
            try:
                s.send(payload.encode())
                sent += 1
            except OSError as e:
                errors += 1
                last = failure(e)
        try:
            data = s.recv(65535)
        except socket.timeout:
            return {"result": "timeout", "sent": sent, "errors": errors, "last_error": last}
        except OSError as e:
            return dict(failure(e), sent=sent, errors=errors)
        return {"result": "ok", "echo": data.decode(), "sent": sent, "errors": errors}
    print(json.dumps(exchange(token, 1)), flush=True)
    for line in sys.stdin:
        payload, _, count = line.strip().partition(" ")
        print(json.dumps(exchange(payload, int(count or 1))), flush=True)

def batch(cases):
    # [[op, addr, port, token, timeout], ...] -> one result per case, in order
    return [{"tcp": tcp, "udp": udp}[op](addr, int(port), token, float(timeout))
            for op, addr, port, token, timeout in cases]

op = sys.argv[1]
if op == "batch":
    print(json.dumps(batch(json.loads(sys.argv[2]))))
elif op == "hold":
    hold(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], float(sys.argv[6]))
else:
    fn = {"tcp": tcp, "udp": udp}[op]
    print(json.dumps(fn(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))))
"""


# -- netlink (pyroute2) -----------------------------------------------------------


@dataclass
class Namespaces:
    """Named network namespaces (/run/netns/NAME) made through ``pyroute2.netns``;
    ``close`` removes every one of them.

    A name is recorded before its namespace is made, so that one made halfway (a
    mount point without its bind mount) is removed too; a name that was taken
    already is not recorded, so another run's namespace is never removed.
    """

    made: list[str] = field(default_factory=list)

    def add(self, name: str) -> str:
        self.made.append(name)
        try:
            netns.create(name)
        except FileExistsError:
            self.made.remove(name)
            raise RuntimeError(f"network namespace {name} exists already") from None
        return name

    def close(self) -> None:
        """Remove them all, the last made first, each even when another fails."""
        failed = []
        for name in reversed(self.made):
            try:
                netns.remove(name)  # unmount and unlink /run/netns/NAME
            except FileNotFoundError:
                pass
            except OSError as e:
                failed.append(f"{name}: {e}")
        self.made.clear()
        if failed:
            raise RuntimeError(f"network namespaces not removed: {'; '.join(failed)}")


class Netlink:
    """Netlink requests inside one network namespace, through a pyroute2 ``IPRoute``
    opened in it. A failed request raises RuntimeError naming the namespace and
    the request. Close it (``with``) once done: an open socket keeps its
    namespace alive.
    """

    def __init__(self, ns: str) -> None:
        self.ns = ns
        # flags=0: join the namespace; pyroute2's default (O_CREAT) would make a missing one
        self._ipr: Any = IPRoute(netns=ns, flags=0)

    def _request(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except NetlinkError as e:
            raise RuntimeError(f"netlink in {self.ns}: {what}: {e}") from e

    def index(self, ifname: str) -> int:
        found = self._request(f"look up link {ifname}", self._ipr.link_lookup, ifname=ifname)
        if not found:
            raise RuntimeError(f"netlink in {self.ns}: no link named {ifname}")
        return int(found[0])

    def add_veth(self, ifname: str, peer: str, peer_ns: str) -> None:
        """A veth pair made here whose ``peer`` end is created inside ``peer_ns``
        (IFLA_NET_NS_FD in the peer's request): neither end is ever in the host's
        namespace."""
        self._request(f"add veth {ifname} with peer {peer} in {peer_ns}", self._ipr.link,
                      "add", ifname=ifname, kind="veth",
                      peer={"ifname": peer, "net_ns_fd": peer_ns})

    def up(self, ifname: str) -> None:
        self._request(f"set {ifname} up", self._ipr.link, "set", index=self.index(ifname),
                      state="up")

    def add_address(self, ifname: str, cidr: str) -> None:
        """``cidr`` (ADDRESS/PREFIXLEN) on ``ifname``; IPv6 ones with IFA_F_NODAD."""
        iface = ipaddress.ip_interface(cidr)
        flags = IFA_F_NODAD if iface.version == 6 else 0
        self._request(f"add address {cidr} to {ifname}", self._ipr.addr, "add",
                      index=self.index(ifname), address=str(iface.ip),
                      prefixlen=iface.network.prefixlen, flags=flags)

    def add_route(self, dst: str, gateway: str) -> None:
        self._request(f"add route {dst} via {gateway}", self._ipr.route, "add", dst=dst,
                      gateway=gateway)

    def links(self) -> set[str]:
        return {str(m.get("ifname")) for m in self._request("list links", self._ipr.link, "dump")}

    def addresses(self, ifname: str) -> set[str]:
        """The addresses on ``ifname`` as ADDRESS/PREFIXLEN."""
        dump = self._request(f"list addresses of {ifname}", self._ipr.addr, "dump",
                             index=self.index(ifname))
        return {f"{m.get('address')}/{m['prefixlen']}" for m in dump}

    def routes(self, family: int) -> set[tuple[str, str]]:
        """(destination/prefixlen, gateway) of the main table's routes via a gateway."""
        dump = self._request("list routes", self._ipr.route, "dump", family=family)
        return {(f"{m.get('dst')}/{m['dst_len']}", str(m.get("gateway")))
                for m in dump if m.get("gateway") is not None}

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass
class Server:
    proc: subprocess.Popen[Any]
    log: Path

    def received(self) -> list[str]:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []


@dataclass
class NetLab:
    """The two namespaces and their servers; ``NetLab.create(tmpdir)``."""

    client_ns: str
    peer_ns: str
    workdir: Path
    servers: dict[str, Server] = field(default_factory=dict)
    namespaces: Namespaces = field(default_factory=Namespaces)

    @classmethod
    def create(cls, workdir: Path) -> NetLab:
        tag = secrets.token_hex(4)
        lab = cls(client_ns=f"guard-test-{tag}-c", peer_ns=f"guard-test-{tag}-p",
                  workdir=workdir)
        try:
            lab._build()
        except BaseException:
            lab.close()
            raise
        return lab

    def _build(self) -> None:
        c, p = self.client_ns, self.peer_ns
        self.namespaces.add(c)
        self.namespaces.add(p)
        with Netlink(c) as client, Netlink(p) as peer:
            # made inside the client namespace, its peer end goes straight to the other
            client.add_veth("c0", "p0", p)
            for side in (client, peer):
                side.up("lo")
            client.add_address("c0", f"{CLIENT_V4}/24")
            client.add_address("c0", f"{CLIENT_V6}/64")
            for addr in PEER_V4:
                peer.add_address("p0", f"{addr}/24")
            for addr in PEER_V6:
                peer.add_address("p0", f"{addr}/64")
            client.up("c0")
            peer.up("p0")
            client.add_route("203.0.113.0/24", PEER_V4[0])
            client.add_route("2001:db8:2::/64", PEER_V6[0])
        self.servers["peer"] = self._server(p, "peer")
        self.servers["client"] = self._server(c, "client")  # loopback peer
        self.warm_up()

    def _server(self, ns: str, name: str) -> Server:
        log = self.workdir / f"{name}-{ns}.log"
        log.touch()
        proc: subprocess.Popen[Any] = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(log), ",".join(map(str, PORTS)),
             str(SERVER_LIFETIME_S)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=lambda: setns_net(ns), text=True,
        )
        server = Server(proc, log)
        self.servers[name] = server  # so close() stops it even if it never gets ready
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            why = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"echo server in {ns} did not start: {why}")
        return server

    def peer_received(self, token: str) -> bool:
        return any(token in line for line in self.servers["peer"].received())

    def loopback_received(self, token: str) -> bool:
        return any(token in line for line in self.servers["client"].received())

    def wait_received(self, token: str, server: str = "peer", timeout: float = 2.0) -> bool:
        """True as soon as ``server`` logged ``token``; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if any(token in line for line in self.servers[server].received()):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    # -- clients --------------------------------------------------------------

    def _client(self, cgroup: TestCgroup | None, argv: list[str]) -> subprocess.Popen[str]:
        if cgroup is not None:
            return cgroup.spawn(argv, netns=self.client_ns, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        # stays in the test process's own cgroup
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=lambda: setns_net(self.client_ns))

    def warm_up(self) -> None:
        """One exchange with every peer address, so neighbour discovery is done.

        The first IPv6 datagram to a fresh neighbour can take over a second to be
        answered; tests with short timeouts must not see that.
        """
        cases = [("udp", addr, PORTS[0], f"warm-up-{addr}", 5.0) for addr in addresses()]
        cases += [("tcp", addr, PORTS[0], f"warm-up-{addr}", 5.0) for addr in addresses()]
        for (_op, addr, *_), result in zip(cases, self.batch(None, cases), strict=True):
            if result.get("result") != "ok":
                raise RuntimeError(f"no echo from {addr} in the test namespaces: {result}")

    def run(self, cgroup: TestCgroup | None, op: str, addr: str, port: int, token: str,
            timeout: float = 1.0) -> dict[str, Any]:
        """One client exchange from the client namespace; in ``cgroup`` unless None."""
        argv = [sys.executable, "-c", CLIENT, op, addr, str(port), token, str(timeout)]
        proc = self._client(cgroup, argv)
        try:
            out, err = proc.communicate(timeout=timeout + 20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"client failed ({proc.returncode}): {err}")
        result: dict[str, Any] = json.loads(out)
        return result

    def batch(self, cgroup: TestCgroup | None,
              cases: Sequence[tuple[str, str, int, str, float]]) -> list[dict[str, Any]]:
        """Several exchanges (op, addr, port, token, timeout) from one client process."""
        argv = [sys.executable, "-c", CLIENT, "batch", json.dumps([list(c) for c in cases])]
        proc = self._client(cgroup, argv)
        limit = 20 + sum(c[4] for c in cases)
        try:
            out, err = proc.communicate(timeout=limit)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"client failed ({proc.returncode}): {err}")
        results: list[dict[str, Any]] = json.loads(out)
        return results

    def hold(self, cgroup: TestCgroup, kind: str, addr: str, port: int, token: str,
             timeout: float = 1.0) -> Holder:
        argv = [sys.executable, "-c", CLIENT, "hold", kind, addr, str(port), token,
                str(timeout)]
        proc = cgroup.spawn(argv, netns=self.client_ns, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return Holder(proc)

    def close(self) -> None:
        try:
            for server in self.servers.values():
                if server.proc.stdin is not None:
                    with contextlib.suppress(OSError):
                        server.proc.stdin.close()
                terminate(server.proc)
                for stream in (server.proc.stdout, server.proc.stderr):
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


@dataclass
class Holder:
    """A client that keeps one connection open and sends on request."""

    proc: subprocess.Popen[Any]

    def result(self, timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        import select

        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    break
                value: dict[str, Any] = json.loads(line)
                return value
        raise RuntimeError("holding client gave no answer")

    def send(self, payload: str, count: int = 1) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{payload} {count}\n")
        self.proc.stdin.flush()
        return self.result()

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        terminate(self.proc)


def addresses() -> Sequence[str]:
    return (*PEER_V4, *PEER_V6)
