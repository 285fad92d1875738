"""guard as systemd/guard.service runs it, without systemd: for host and guest tests.

systemd is not PID 1 on the development machines nor in the test guest, so a
test cannot start the unit. What it can do is run the daemon under the same
restrictions, read from the unit file itself (so the test follows the unit):

* ``ExecStart`` expanded the way systemd expands it (``${VAR}`` one word,
  ``$VAR`` split on whitespace) from ``Environment=`` defaults and an
  environment file;
* ``CapabilityBoundingSet`` and ``NoNewPrivileges`` through ``setpriv``: as
  root, the daemon gets exactly the bounding set;
* ``SystemCallFilter=~...`` (later assignments without ``~`` taking calls back out)
  and ``RestrictAddressFamilies`` as a seccomp filter
  made with libseccomp (what systemd uses), errno from ``SystemCallErrorNumber``;
* ``ProtectSystem=strict`` / ``ProtectKernelTunables`` / ``ProtectControlGroups``
  as a private mount namespace where every mount is read-only except the
  ``ReadWritePaths`` (bind-mounted onto themselves first, as systemd does),
  ``/dev``, ``/proc`` (``/proc/sys`` read-only) and the directories the test
  names as its own (its policies, its syslog socket).

``GuardService`` starts that process with NOTIFY_SOCKET pointing at a
listener of the test's, waits for READY=1, asks ``guard status``, stops it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import sdnotify

REPO = sdnotify.REPO
UNIT = REPO / "systemd" / "guard.service"
ENV_TEMPLATE = REPO / "systemd" / "guard.env"


# --- the unit file -----------------------------------------------------------------------


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """Every ``Key=value`` of the [Service] section, values in order (repeatable keys)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def env_file(path: Path) -> dict[str, str]:
    """systemd's EnvironmentFile= reading of the simple form the template uses."""
    found: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        found[key.strip()] = value.strip().strip('"')
    return found


def unit_environment(settings: Mapping[str, list[str]], overrides: Mapping[str, str]
                     ) -> dict[str, str]:
    """Environment= defaults, then the environment file's values, then ``overrides``."""
    env: dict[str, str] = {}
    for value in settings.get("Environment", []):
        for item in shlex.split(value):
            key, _, val = item.partition("=")
            env[key] = val
    env.update(overrides)
    return env


def expand_exec(command: str, env: Mapping[str, str]) -> list[str]:
    """systemd.service(5) "Command lines": ${VAR} is one argument, $VAR splits."""
    out: list[str] = []
    for word in shlex.split(command):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            out.extend(env.get(whole.group(1), "").split())
            continue
        out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                          lambda m: env.get(m.group(1), ""), word))
    return out


def capability_names(settings: Mapping[str, list[str]]) -> list[str]:
    return [c for v in settings.get("CapabilityBoundingSet", []) for c in v.split()]


CAP_NUMBERS = {"CAP_DAC_READ_SEARCH": 2, "CAP_NET_ADMIN": 12, "CAP_SYS_PTRACE": 19,
               "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39}


def capability_mask(names: Iterable[str]) -> int:
    return sum(1 << CAP_NUMBERS[name] for name in names)


# --- seccomp, as systemd applies SystemCallFilter= and RestrictAddressFamilies= -----------


def syscall_group(name: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of ``@group`` (nested groups expanded), from systemd itself."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        calls |= syscall_group(word, seen) if word.startswith("@") else {word}
    return calls


def denied_syscalls(settings: Mapping[str, list[str]]) -> set[str]:
    """As systemd reads SystemCallFilter=: the first assignment, a deny list (``~``),
    sets the default action; later ones add to it (``~``) or take out of it (no ``~``)."""
    denied: set[str] = set()
    for index, value in enumerate(settings.get("SystemCallFilter", [])):
        deny = value.startswith("~")
        assert deny or index > 0, "only a deny list first is emulated"
        calls: set[str] = set()
        for item in value.removeprefix("~").split():
            calls |= syscall_group(item) if item.startswith("@") else {item}
        denied = denied | calls if deny else denied - calls
    return denied


AF_NUMBERS = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}
AF_MAX = 46


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


@dataclass(frozen=True)
class SeccompPlan:
    syscalls: tuple[str, ...]
    errno: int
    families: tuple[int, ...]  # allowed socket() families

    def load(self) -> None:
        """Install the filter in this process (between fork and exec)."""
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        allow, action = 0x7FFF0000, 0x00050000 | (self.errno & 0xFFFF)
        refuse_family = 0x00050000 | errno.EAFNOSUPPORT
        ctx = lib.seccomp_init(allow)
        if not ctx:
            raise OSError("seccomp_init failed")
        for name in self.syscalls:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                continue  # not a system call of this architecture
            if lib.seccomp_rule_add_array(ctx, action, number, 0, None) != 0:
                raise OSError(f"seccomp rule for {name}")
        socket_nr = lib.seccomp_syscall_resolve_name(b"socket")
        for family in range(AF_MAX):
            if family in self.families:
                continue
            cmp = (_ArgCmp * 1)(_ArgCmp(0, 4, family, 0))  # SCMP_CMP_EQ on arg 0
            if lib.seccomp_rule_add_array(ctx, refuse_family, socket_nr, 1, cmp) != 0:
                raise OSError(f"seccomp rule for socket family {family}")
        if lib.seccomp_load(ctx) != 0:
            raise OSError("seccomp_load failed")


def seccomp_plan(settings: Mapping[str, list[str]]) -> SeccompPlan:
    errno_name = (settings.get("SystemCallErrorNumber") or ["EPERM"])[-1]
    families = tuple(AF_NUMBERS[f] for v in settings.get("RestrictAddressFamilies", [])
                     for f in v.split())
    return SeccompPlan(tuple(sorted(denied_syscalls(settings))), getattr(errno, errno_name),
                       families)


# --- a read-only file system, as ProtectSystem=strict and friends make it -----------------

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
CLONE_NEWNS = 0x00020000


def _mount(source: str, target: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        points.append(point)
    return points


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


@dataclass(frozen=True)
class ReadOnlyPlan:
    writable: tuple[str, ...]  # ReadWritePaths and the test's own directories
    api: tuple[str, ...] = ("/dev", "/proc")

    def apply(self) -> None:
        """In a new mount namespace: writable paths bound onto themselves, then every
        other mount remounted read-only (``/proc/sys`` too, as ProtectKernelTunables)."""
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        _mount("none", "/", MS_REC | MS_PRIVATE)
        for path in self.writable:
            _mount(path, path, MS_BIND | MS_REC)
        keep = set(self.writable)
        for point in _mount_points():
            if point in keep or _under(point, self.writable):
                continue
            if _under(point, self.api) and not _under(point, ("/proc/sys",)):
                continue
            with contextlib.suppress(OSError):  # e.g. a mount hidden below another
                _mount("none", point, MS_BIND | MS_REMOUNT | MS_RDONLY)
        if "/proc/sys" not in _mount_points():
            _mount("/proc/sys", "/proc/sys", MS_BIND)
            _mount("none", "/proc/sys", MS_BIND | MS_REMOUNT | MS_RDONLY)


# --- the daemon, run as the unit runs it ----------------------------------------------------


@dataclass(frozen=True)
class ServiceCommand:
    argv: list[str]  # setpriv ... -- python -m guard run ...
    guard_args: list[str]  # what follows "guard" in ExecStart
    capabilities: list[str]
    seccomp: SeccompPlan
    read_only: ReadOnlyPlan

    def preexec(self) -> None:
        self.read_only.apply()
        self.seccomp.load()


def service_command(env: Mapping[str, str], own_dirs: Sequence[str | Path] = (),
                    replace: Mapping[str, str] | None = None,
                    settings: Mapping[str, list[str]] | None = None) -> ServiceCommand:
    """The unit's ExecStart with ``env`` (GUARD_POLICIES, GUARD_SYSLOG, GUARD_OPTS),
    ``replace`` applied to its arguments (e.g. the state or pin directory a test
    uses instead of /run/guard), wrapped in its restrictions."""
    settings = settings if settings is not None else unit_settings()
    [exec_start] = settings["ExecStart"]
    argv = expand_exec(exec_start, unit_environment(settings, env))
    assert argv[0] == "/usr/local/bin/guard", argv[0]
    guard_args = [(replace or {}).get(a, a) for a in argv[1:]]
    caps = capability_names(settings)
    bounding = "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    wrapper = ["setpriv", "--bounding-set", bounding, "--inh-caps", "-all"]
    if (settings.get("NoNewPrivileges") or ["no"])[-1] == "yes":
        wrapper.append("--no-new-privs")
    writable = [p for v in settings.get("ReadWritePaths", []) for p in v.split()]
    writable = [(replace or {}).get(p, p) for p in writable]
    writable += [str(p) for p in own_dirs]
    return ServiceCommand(
        argv=[*wrapper, "--", sys.executable, "-m", "guard", *guard_args],
        guard_args=guard_args, capabilities=caps, seccomp=seccomp_plan(settings),
        read_only=ReadOnlyPlan(tuple(dict.fromkeys(writable))))


class NotifyListener(sdnotify.NotifyListener):
    """The sd_notify socket (abstract, datagrams), read by a thread as systemd does."""

    def __init__(self) -> None:
        super().__init__("guard-svc-notify")

    def wait_for(self, text: str, timeout: float, after: int = 0,
                 alive: Callable[[], bool] = lambda: True) -> int:
        """Index of the first message from ``after`` on containing ``text``."""
        return self.first(lambda m: text in m, timeout, after=after, alive=alive,
                          what=repr(text))


@dataclass
class GuardService:
    """One daemon started by a test; ``state_dir`` and ``pin_dir`` are the test's."""

    proc: subprocess.Popen[bytes]
    notify: NotifyListener
    state_dir: Path
    stderr_path: Path
    started: float
    ready_after: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The daemon's pid: setpriv execs it, so it is the child's own."""
        return self.proc.pid

    def wait_ready(self, timeout: float) -> None:
        self.notify.wait_for("READY=1", timeout, alive=lambda: self.proc.poll() is None)
        self.ready_after = time.monotonic() - self.started

    def status(self) -> dict[str, Any]:
        done = guard_cli(["status", "--json", "--state-dir", str(self.state_dir)])
        assert done.returncode == 0, done.stderr
        body: dict[str, Any] = json.loads(done.stdout)
        return body

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (SIGKILL after ``timeout``); the exit code. Pins are not touched."""
        code = sdnotify.stop(self.proc, timeout)
        self.notify.close()
        return code

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        self.proc.kill()
        self.proc.wait(timeout=60)
        self.notify.close()


def guard_cli(args: Sequence[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "guard", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def start_guard(guard_args: Sequence[str], state_dir: Path, stderr_path: Path, *,
                command: ServiceCommand | None = None,
                preexec: Callable[[], None] | None = None,
                env: Mapping[str, str] | None = None) -> GuardService:
    """``python -m guard ARGS`` (or the unit's wrapped command), READY not yet awaited;
    ``env`` is added to this process's environment."""
    notify = NotifyListener()
    argv = command.argv if command else [sys.executable, "-m", "guard", *guard_args]
    proc = sdnotify.spawn(argv, notify, stderr_path, env, command.preexec if command else preexec)
    return GuardService(proc, notify, state_dir, stderr_path, time.monotonic())


def proc_capabilities(pid: int) -> dict[str, int]:
    """CapEff, CapPrm, CapBnd... of a live process, as integers."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cap"):
            key, value = line.split(":", 1)
            found[key] = int(value.strip(), 16)
    return found


def no_new_privs(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NoNewPrivs:"):
            return line.split()[1] == "1"
    return False


def seccomp_mode(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Seccomp:"):
            return int(line.split()[1])
    return 0
