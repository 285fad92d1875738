"""The README's quick start, run as written: its ``sh quickstart=NAME`` blocks, taken
from README.md, so the commands a newcomer types cannot drift from what works.

    setup    make the cgroups                         (bash, waits)
    run      ./scripts/run ... (the daemon)           (in the background, until stopped)
    events   guard events                             (in the background; its first line read)
    shell    a shell moved into the scope             (bash, stdin = the deny block)
    deny     two connects from inside the scope       (fed to that shell)
    exec     whoami (the BPF-LSM variant)             (fed to that shell)
    cleanup  guard stop, rmdir                        (bash, waits; also on failure)

Asserted: the first connect fails with EPERM (Operation not permitted) and the
second reaches the network (Connection refused), ``guard events`` shows the
denial with the shell's pid, and whoami is refused exactly where BPF-LSM runs.
The quick start uses guard's default state directory (/run/guard): the test
skips when another daemon already answers there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import need, need_root
from support.sdnotify import REPO

pytestmark = pytest.mark.host

README = REPO / "README.md"
BLOCK = re.compile(r"^```sh quickstart=(?P<name>\w+)\n(?P<body>.*?)^```$", re.M | re.S)
STATE = Path("/run/guard")


def blocks(text: str) -> dict[str, str]:
    """The quick start's blocks by name, in the README's words."""
    found = {m["name"]: m["body"] for m in BLOCK.finditer(text)}
    assert set(found) == {"setup", "run", "events", "shell", "deny", "exec", "cleanup"}, found
    return found


def bash(script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, text=True,
                          capture_output=True, timeout=120, **kwargs)  # type: ignore[call-overload]


def background(script: str, log: Path) -> subprocess.Popen[str]:
    out = log.open("w")
    return subprocess.Popen(["bash", "-c", script], cwd=REPO, text=True, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def daemon_answers() -> bool:
    done = subprocess.run([str(REPO / ".venv/bin/guard"), "status", "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    return done.returncode == 0


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_readme_blocks_are_found() -> None:
    found = blocks(README.read_text())
    assert "./scripts/run --policies docs/quickstart --host-cgroup /guard-quickstart" in \
        found["run"]
    assert found["events"].strip() == ".venv/bin/guard events"


@pytest.fixture
def quickstart(tmp_path: Path) -> Iterator[dict[str, str]]:
    need_root()
    from guard.kernel.loader import probe_family

    need(probe_family("net").available, "cgroup network programs do not load here")
    need(not ((STATE / "status.sock").exists() and daemon_answers()),
         "a guard daemon already answers on /run/guard: the quick start uses it")
    found = blocks(README.read_text())
    yield found
    bash(found["cleanup"])  # whatever happened; harmless when already clean


def test_the_quick_start_as_written(quickstart: dict[str, str], tmp_path: Path) -> None:
    from guard.kernel.loader import probe_family

    setup = bash(quickstart["setup"])
    assert setup.returncode == 0, setup.stderr
    daemon = background(quickstart["run"], tmp_path / "run.log")
    events: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: daemon.poll() is not None or "guard: enforcing" in
                 (tmp_path / "run.log").read_text(), 180, "the daemon to enforce")
        start = (tmp_path / "run.log").read_text()
        assert daemon.poll() is None, start
        for stage in ("compile", "load", "apply"):
            assert re.search(rf"^guard: {stage}: .*\(\d+(\.\d+)? m?s\)$", start, re.M), start
        events = subprocess.Popen(["bash", "-c", quickstart["events"]], cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)
        wait_for(lambda: json.loads(subprocess.run(
            [str(REPO / ".venv/bin/guard"), "status", "--json"], capture_output=True,
            text=True, timeout=60).stdout)["tail"]["clients"] >= 1, 30, "guard events")

        shell = bash(quickstart["shell"], input=quickstart["deny"] + "echo pid=$$\n"
                     + quickstart["exec"])
        out, err = shell.stdout, shell.stderr
        first, second = [line for line in err.splitlines() if "connect" in line][:2]
        assert "Operation not permitted" in first, err
        assert "Connection refused" in second, err
        exec_lsm = probe_family("exec").available
        if exec_lsm:
            assert "whoami: Operation not permitted" in err, err
        else:
            assert "root" in out.split(), out  # not enforced here, as status says

        assert events.stdout is not None
        line = events.stdout.readline()
        assert "deny connect to 127.0.0.1:8089/tcp" in line, line
        assert "in /guard-quickstart/shell: rule quickstart/egress.rules[0]" in line, line
        status = subprocess.run([str(REPO / ".venv/bin/guard"), "status"], cwd=REPO, text=True,
                                capture_output=True, timeout=60).stdout
        assert "egress: enforced" in status, status
        if not exec_lsm:
            assert "exec: NOT enforced [R1]" in status, status
    finally:
        if events is not None:
            stop(events)
        cleanup = bash(quickstart["cleanup"])
        stop(daemon)
    assert cleanup.returncode == 0, cleanup.stdout + cleanup.stderr
    assert daemon.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
