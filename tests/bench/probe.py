"""Build the C probe (probe.c) and run its loops, inside a cgroup or namespace when asked."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("probe.c")


class ProbeError(RuntimeError):
    pass


def build(out_dir: Path) -> Path:
    """Compile probe.c into ``out_dir/probe`` unless an up-to-date binary is there."""
    binary = out_dir / "probe"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise ProbeError("no C compiler (cc, gcc or clang) to build the probe")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([cc, "-O2", "-Wall", "-o", str(binary), str(SOURCE)],
                          capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise ProbeError(f"building the probe failed:\n{done.stderr}")
    return binary


Preexec = Callable[[], None]


def run(binary: Path, args: Sequence[str], timeout: float,
        preexec: Preexec | None = None, pass_fds: Sequence[int] = ()) -> dict[str, Any]:
    """Run one probe command to completion; its JSON line."""
    try:
        done = subprocess.run([str(binary), *args], capture_output=True, text=True,
                              timeout=timeout, preexec_fn=preexec, pass_fds=tuple(pass_fds),
                              check=False)
    except subprocess.TimeoutExpired as error:
        raise ProbeError(f"probe {' '.join(args)} overran {timeout:.0f} s") from error
    if done.returncode != 0:
        raise ProbeError(f"probe {' '.join(args)} exited {done.returncode}: "
                         f"{done.stderr.strip()[-500:]}")
    try:
        value: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as error:
        raise ProbeError(f"probe {' '.join(args)} printed no result: {done.stdout!r}") from error
    return value


def start(binary: Path, args: Sequence[str], preexec: Preexec | None = None,
          stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """Start a long-running probe (a server, the verdict poller); waits for 'ready'."""
    proc = subprocess.Popen([str(binary), *args], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        proc.wait(timeout=10)
        raise ProbeError(f"probe {' '.join(args)} did not start: {line!r} {err}")
    return proc
