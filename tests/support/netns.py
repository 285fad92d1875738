"""Two network namespaces joined by a veth pair, with echo servers: real peers.

    client ns  c0  198.51.100.1/24, 2001:db8:1::1/64    routes to 203.0.113.0/24
                                                         and 2001:db8:2::/64 via the peer
    peer ns    p0  198.51.100.2/24, 198.51.100.3/24, 203.0.113.2/24,
                   2001:db8:1::2/64, 2001:db8:1::3/64, 2001:db8:2::2/64

Addresses come from the documentation ranges and exist only inside the two
namespaces (the veth pair is made inside them and never appears in the host's
namespace), so test traffic cannot leave the machine and cannot collide with
the host's own addresses or with another test run. IPv6 addresses are added
with ``nodad`` so they are usable at once.

A TCP + UDP echo server runs in each namespace on ``PORTS`` (IPv4 and IPv6; in
the client namespace it answers on loopback). Every payload a server receives
is appended to its log, so a test can prove that a datagram was *not*
delivered. Clients run ``CLIENT`` (``python -c CLIENT OP ...``) and print one
JSON result.

Teardown kills only the servers this object started and deletes only the
namespaces it made (which removes the veth pair).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

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


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


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
        ip("netns", "add", c)
        ip("netns", "add", p)
        # made inside the client namespace, its peer end goes straight to the other
        ip("-n", c, "link", "add", "c0", "type", "veth", "peer", "name", "p0", "netns", p)
        for ns in (c, p):
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", c, "addr", "add", f"{CLIENT_V4}/24", "dev", "c0")
        ip("-n", c, "-6", "addr", "add", f"{CLIENT_V6}/64", "dev", "c0", "nodad")
        for addr in PEER_V4:
            ip("-n", p, "addr", "add", f"{addr}/24", "dev", "p0")
        for addr in PEER_V6:
            ip("-n", p, "-6", "addr", "add", f"{addr}/64", "dev", "p0", "nodad")
        ip("-n", c, "link", "set", "c0", "up")
        ip("-n", p, "link", "set", "p0", "up")
        ip("-n", c, "route", "add", "203.0.113.0/24", "via", PEER_V4[0])
        ip("-n", c, "-6", "route", "add", "2001:db8:2::/64", "via", PEER_V6[0])
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
        for server in self.servers.values():
            if server.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    server.proc.stdin.close()
            terminate(server.proc)
            for stream in (server.proc.stdout, server.proc.stderr):
                if stream is not None:
                    stream.close()
        self.servers.clear()
        for ns in (self.client_ns, self.peer_ns):
            with contextlib.suppress(RuntimeError):
                ip("netns", "del", ns)

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
