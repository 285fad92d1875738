"""The control socket's authorization, without a daemon (tests/host/test_control_socket.py
runs the real one): who may ask what, decided in one place."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from guard.service.control import Caller, ControlServer, peer_of


def caller(uid: int = 0, cgroup: str | None = "/ops", identity: str = "pidfd") -> Caller:
    return Caller(pid=4242, ppid=1, uid=uid, gid=0, cgroup=cgroup, comm="sh", exe="/bin/sh",
                  identity=identity)


class Recorder:
    def __init__(self) -> None:
        self.refused: list[tuple[int, str, str]] = []
        self.ran: list[str] = []

    def server(self, tmp_path: Path, confined: str = "/svc") -> ControlServer:
        def authorize(c: Caller) -> str | None:
            return f"inside {confined}" if (c.cgroup or "").startswith(confined) else None

        def handler(name: str) -> Any:
            def run(_body: Any, _caller: Caller) -> dict[str, Any]:
                self.ran.append(name)
                return {"ok": True}
            return run

        return ControlServer(tmp_path, {"status": handler("status"), "stop": handler("stop")},
                             authorize=authorize,
                             on_refused=lambda c, cmd, why: self.refused.append((c.pid, cmd,
                                                                                 why)))


def ask(server: ControlServer, request: dict[str, Any], who: Caller) -> dict[str, Any]:
    return server.answer(json.dumps(request).encode(), who)


def test_status_is_answered_for_anyone(tmp_path: Path) -> None:
    rec = Recorder()
    server = rec.server(tmp_path)
    for who in (caller(), caller(uid=1000), caller(cgroup="/svc/web")):
        assert ask(server, {"command": "status"}, who) == {"ok": True}
    assert rec.ran == ["status"] * 3 and not rec.refused


@pytest.mark.parametrize(("who", "why"), [
    (caller(cgroup="/svc/web"), "inside /svc"),
    (caller(uid=1000), "uid 1000 is not root"),
    (caller(cgroup=None), "exited before its cgroup could be read"),
    (caller(identity="gone"), "exited before its cgroup could be read"),
])
def test_stop_is_refused_to_a_confined_or_unknown_caller(tmp_path: Path, who: Caller,
                                                         why: str) -> None:
    rec = Recorder()
    reply = ask(rec.server(tmp_path), {"command": "stop", "unload": True}, who)
    assert reply["ok"] is False and why in reply["error"]
    assert rec.ran == [] and rec.refused == [(4242, "stop", rec.refused[0][2])]
    assert why in rec.refused[0][2]


def test_stop_from_unconfined_root_runs(tmp_path: Path) -> None:
    rec = Recorder()
    assert ask(rec.server(tmp_path), {"command": "stop"}, caller(identity="pid")) == {"ok": True}
    assert rec.ran == ["stop"] and not rec.refused


def test_unknown_and_malformed_requests(tmp_path: Path) -> None:
    rec = Recorder()
    server = rec.server(tmp_path)
    assert "unknown command" in ask(server, {"command": "unload"}, caller())["error"]
    assert server.answer(b"[1]", caller())["ok"] is False
    assert rec.ran == [] and not rec.refused


def test_peer_of_names_the_connecting_process(tmp_path: Path) -> None:
    """SO_PEERCRED through a real socket pair: this very process."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        who = peer_of(left)
    assert who.pid == os.getpid() and who.uid == os.getuid()
    assert who.ppid == os.getppid()
    assert who.cgroup is not None and who.cgroup.startswith("/")
    assert who.identity in ("pidfd", "pid")
