"""The guest test harness: runs guard's BPF-LSM tests inside a QEMU guest.

The host kernel refuses LSM BPF programs, so every test marked ``guest`` (all of
``tests/guest/``) runs inside a guest booted with Debian's kernel by virtme-ng, with
``lsm=...,bpf`` on its command line. This module is both halves of that:

On the host (:class:`HostController`), the first guest test to run boots ONE guest
for the whole pytest session and hands it the node ids of every selected guest test.
Each host test item then waits for its own results from the guest and reports them
as its own setup/call/teardown outcome, with the guest's traceback, captured output
and duration. A guest that does not boot, crashes or overruns the time limit makes
every guest test that has not reported FAIL with the reason (never skip, never pass).

In the guest (``python tests/guestharness.py --guest RWDIR``), :func:`guest_main`
mounts what BPF needs, checks the kernel, then runs pytest over the selected tests;
:class:`GuestReporter` (registered by ``tests/conftest.py`` in that pytest) writes one
JSON line per test report into ``RWDIR/results.jsonl``, a directory shared read-write
with the host (the rest of the host filesystem is read-only in the guest).

Environment knobs (host side):

* ``GUARD_GUEST_TIMEOUT``: seconds for the whole guest run (default 3600, 60 min).
* ``GUARD_GUEST_KERNEL``: kernel release to boot (default: the one ``scripts/setup``
  recorded in ``/var/lib/guard-dev/guest-kernel``).
* ``GUARD_GUEST_MEMORY`` / ``GUARD_GUEST_CPUS``: guest size (default 2G / 2).
* ``GUARD_GUEST_KEEP=1``: keep the run directory (console log, results) even on success.
* ``GUARD_GUEST_VERBOSE=1``: boot with the kernel console on (vng --verbose) for debugging.

Inside the guest, ``GUARD_IN_GUEST=1`` is set; tests can use :func:`in_guest`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
GUEST_TESTS = TESTS / "guest"
HOST_TESTS = TESTS / "host"

ENV_IN_GUEST = "GUARD_IN_GUEST"
ENV_GUEST_DIR = "GUARD_GUEST_DIR"
STATE_DIR = Path(os.environ.get("GUARD_SETUP_STATE", "/var/lib/guard-dev"))
KERNEL_FILE = STATE_DIR / "guest-kernel"
LSM_APPEND = "lsm=lockdown,capability,landlock,bpf"
DEFAULT_TIMEOUT_S = 60 * 60  # the whole guest run; a CI run has 90 minutes for everything
POLL_S = 0.2
GRACEFUL_EXIT_S = 90.0  # for the guest to finish its pytest and power off after the last test

RESULTS = "results.jsonl"
NODEIDS = "nodeids.json"
CONSOLE_LOG = "console.log"  # everything vng printed (the guest's stdout), written by the host
GUEST_PYTEST_LOG = "guest-pytest.log"  # the guest pytest's own output, written in the guest

Phase = Literal["setup", "call", "teardown"]
PHASES: tuple[Phase, ...] = ("setup", "call", "teardown")


def in_guest() -> bool:
    """True inside the BPF-LSM guest that the harness booted."""
    return os.environ.get(ENV_IN_GUEST) == "1"


def is_guest_item(item: pytest.Item) -> bool:
    return item.get_closest_marker("guest") is not None


def _under(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory)
    except ValueError:
        return False
    return True


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise pytest.UsageError(f"{name}={raw!r} is not a number of seconds") from None


# --------------------------------------------------------------------------------------
# plugin entry point (called from tests/conftest.py)
# --------------------------------------------------------------------------------------


class LayerMarker:
    """Marks every test under tests/guest with ``guest`` and under tests/host with ``host``.

    Runs before ``-m`` deselection, so ``-m "not guest and not host"`` selects the unit
    tests even when a test author forgot the marker.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            path = Path(str(item.path))
            if _under(path, GUEST_TESTS) and item.get_closest_marker("guest") is None:
                item.add_marker(pytest.mark.guest)
            elif _under(path, HOST_TESTS) and item.get_closest_marker("host") is None:
                item.add_marker(pytest.mark.host)


def configure(config: pytest.Config) -> None:
    config.pluginmanager.register(LayerMarker(), "guard-layer-marker")
    if in_guest():
        guest_dir = os.environ.get(ENV_GUEST_DIR)
        if guest_dir:
            config.pluginmanager.register(GuestReporter(Path(guest_dir)), "guard-guest-reporter")
    else:
        config.pluginmanager.register(HostController(config), "guard-guest-controller")


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------


class _Crash:
    """The ``reprcrash`` of a relayed failure: pytest's short summary reads ``.message``."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.path = ""
        self.lineno = 0


class GuestLongRepr:
    """A failure text produced in the guest (or about the guest), shown like a traceback."""

    def __init__(self, text: str, message: str | None) -> None:
        self.text = text
        if message is not None:
            self.reprcrash = _Crash(message)

    def toterminal(self, tw: Any) -> None:
        for line in self.text.splitlines():
            tw.line(line)

    def __str__(self) -> str:
        return self.text


@dataclass
class _ItemResult:
    reports: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


class GuestRun:
    """One guest boot running a fixed list of guest tests; results stream back as JSON lines."""

    def __init__(self, nodeids: list[str], rootdir: Path) -> None:
        self.nodeids = nodeids
        self.rootdir = rootdir
        self.timeout_s = _env_float("GUARD_GUEST_TIMEOUT", DEFAULT_TIMEOUT_S)
        self.dir = Path(tempfile.mkdtemp(prefix="guard-guest-"))
        self.results: dict[str, _ItemResult] = {}
        self.collect_errors: list[str] = []
        self.guest_info: dict[str, Any] | None = None
        self.guest_error: str | None = None
        self.guest_exit: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.failure: str | None = None  # why the run ended early, once it did
        self.kernel: str | None = None
        self.started_at = 0.0
        self.ended_at: float | None = None
        self.booted_after: float | None = None
        self.last_result_at: float | None = None
        self._buffer = b""
        self._announced = False
        self._offset = 0
        self._log: IO[bytes] | None = None
        self._pump: threading.Thread | None = None

    # -- starting ------------------------------------------------------------------------

    def _kernel_release(self) -> str:
        release = os.environ.get("GUARD_GUEST_KERNEL", "").strip()
        if not release:
            try:
                release = KERNEL_FILE.read_text().strip()
            except OSError:
                raise _GuestUnavailable(
                    f"no guest kernel recorded in {KERNEL_FILE}: run ./scripts/setup as root"
                ) from None
        if not Path(f"/boot/vmlinuz-{release}").is_file():
            raise _GuestUnavailable(
                f"/boot/vmlinuz-{release} is missing: run ./scripts/setup as root"
            )
        return release

    def _vng(self) -> Path:
        vng = Path(sys.executable).parent / "vng"
        if not vng.exists():
            found = shutil.which("vng")
            if found is None:
                raise _GuestUnavailable(
                    "vng (virtme-ng) is not installed in this environment: run ./scripts/setup"
                )
            vng = Path(found)
        return vng

    def command(self) -> list[str]:
        assert self.kernel is not None
        env_prefix = {
            ENV_IN_GUEST: "1",
            ENV_GUEST_DIR: str(self.dir),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/guard-hypothesis",
        }
        guest_cmd = " ".join(
            [
                "cd",
                shlex.quote(str(self.rootdir)),
                "&&",
                *(f"{k}={shlex.quote(v)}" for k, v in env_prefix.items()),
                "exec",
                shlex.quote(sys.executable),
                shlex.quote(str(Path(__file__).resolve())),
                "--guest",
                shlex.quote(str(self.dir)),
            ]
        )
        cmd = [
            str(self._vng()),
            "--run",
            f"/boot/vmlinuz-{self.kernel}",
            "--disable-kvm",  # KVM stops early in boot and hangs on these machines: TCG only
            "--memory",
            os.environ.get("GUARD_GUEST_MEMORY", "2G"),
            "--cpus",
            os.environ.get("GUARD_GUEST_CPUS", "2"),
            "--append",
            LSM_APPEND,
            "--rwdir",
            str(self.dir),
        ]
        if os.environ.get("GUARD_GUEST_VERBOSE") == "1":
            cmd.append("--verbose")
        return [*cmd, "--", guest_cmd]

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.kernel = self._kernel_release()
        (self.dir / NODEIDS).write_text(json.dumps(self.nodeids))
        (self.dir / RESULTS).touch()
        cmd = self.command()
        (self.dir / "command").write_text(shlex.join(cmd) + "\n")
        env = dict(os.environ)
        # vng runs virtme-run and friends from PATH.
        env["PATH"] = f"{Path(cmd[0]).parent}{os.pathsep}{env.get('PATH', '')}"
        self._log = open(self.dir / CONSOLE_LOG, "wb")  # noqa: SIM115 (closed in finish())
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=str(self.rootdir),
            env=env,
            start_new_session=True,  # its own process group, so a timeout kills qemu too
        )
        self._pump = threading.Thread(target=self._copy_console, daemon=True)
        self._pump.start()

    def _copy_console(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None and self._log is not None
        for chunk in _chunks(self.proc.stdout):
            self._log.write(chunk)
            self._log.flush()

    # -- reading results -----------------------------------------------------------------

    def _read_results(self) -> None:
        path = self.dir / RESULTS
        try:
            with open(path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        self._offset += len(data)
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                try:
                    self._handle(json.loads(line))
                except ValueError:
                    continue

    def _handle(self, rec: dict[str, Any]) -> None:
        event = rec.get("event")
        if event == "report":
            self.results.setdefault(rec["nodeid"], _ItemResult()).reports.append(rec)
        elif event == "finish":
            self.results.setdefault(rec["nodeid"], _ItemResult()).finished = True
        elif event == "collect_error":
            self.collect_errors.append(f"{rec.get('nodeid')}:\n{rec.get('text', '')}")
        elif event == "guest_start":
            self.guest_info = rec
            self.booted_after = time.monotonic() - self.started_at
        elif event == "guest_error":
            self.guest_error = str(rec.get("message"))
        elif event == "guest_end":
            self.guest_exit = int(rec.get("pytest_exit", -1))

    def wait_for(self, nodeid: str, on_boot: Any = None) -> _ItemResult | None:
        """Wait until the guest has reported ``nodeid`` (or the run has ended); None if never."""
        while True:
            self._read_results()
            if on_boot is not None and not self._announced and self.guest_info is not None:
                self._announced = True
                on_boot(self)
            result = self.results.get(nodeid)
            if result is not None and result.finished:
                self.last_result_at = time.monotonic()
                return result
            if self.failure is not None:
                return result
            assert self.proc is not None
            if self.proc.poll() is not None:
                self._read_results()  # what was written just before it exited
                self._finish(None)
                continue
            if time.monotonic() - self.started_at > self.timeout_s:
                self._finish(f"the guest run timed out after {self.timeout_s:.0f} s and was killed")
                continue
            time.sleep(POLL_S)

    def all_finished(self) -> bool:
        self._read_results()
        return all(n in self.results and self.results[n].finished for n in self.nodeids)

    # -- ending --------------------------------------------------------------------------

    def _finish(self, reason: str | None) -> None:
        if self.failure is not None:
            return
        self.kill()
        self.ended_at = time.monotonic()
        if reason is None:
            assert self.proc is not None
            code = self.proc.returncode
            if self.guest_error is not None:
                reason = f"the guest could not run tests: {self.guest_error}"
            elif self.guest_info is None:
                reason = f"the guest did not boot (vng exited with status {code})"
            elif self.guest_exit is None:
                reason = f"the guest stopped before its pytest finished (vng exit status {code})"
            else:
                reason = (
                    f"the guest's pytest ended (exit status {self.guest_exit}) without running it"
                )
        self.failure = reason

    def kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._pump is not None:
            self._pump.join(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def console_tail(self, lines: int = 40) -> str:
        for name in (GUEST_PYTEST_LOG, CONSOLE_LOG):
            with contextlib.suppress(OSError):
                text = (self.dir / name).read_text(errors="replace")
                if text.strip():
                    tail = text.splitlines()[-lines:]
                    return f"last {len(tail)} lines of {self.dir / name}:\n" + "\n".join(tail)
        return f"(no output from the guest in {self.dir})"


class _GuestUnavailable(Exception):
    pass


class HostController:
    """Runs the selected guest tests in one guest and relays their outcomes."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.run: GuestRun | None = None
        self.unavailable: str | None = None
        self.detailed_failures = 0
        self.relayed: dict[str, str] = {}

    def _terminal(self) -> Any:
        return self.config.pluginmanager.get_plugin("terminalreporter")

    def _say(self, text: str) -> None:
        tr = self._terminal()
        if tr is not None:
            tr.write_line(f"guard guest: {text}")

    def _start(self, session: pytest.Session) -> None:
        nodeids = [i.nodeid for i in session.items if is_guest_item(i)]
        self.run = GuestRun(nodeids, Path(str(self.config.rootpath)))
        try:
            self.run.start()
        except (_GuestUnavailable, OSError) as exc:
            self.unavailable = str(exc)
            self.run.kill()
            shutil.rmtree(self.run.dir, ignore_errors=True)
            self.run = None
            return
        self._say(
            f"booting a {self.run.kernel} guest (TCG) for {len(nodeids)} guest test(s); "
            f"run directory {self.run.dir}; time limit {self.run.timeout_s:.0f} s"
        )

    def _on_boot(self, run: GuestRun) -> None:
        info = run.guest_info or {}
        self._say(
            f"guest up after {run.booted_after or 0:.1f} s: kernel {info.get('release')}, "
            f"lsm {info.get('lsm')}"
        )

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        if not is_guest_item(item):
            return None
        if self.run is None and self.unavailable is None:
            self._start(item.session)
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in self._reports_for(item):
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _reports_for(self, item: pytest.Item) -> list[pytest.TestReport]:
        run = self.run
        if self.unavailable is not None or run is None:
            return self._failed(item, f"the guest could not be started: {self.unavailable}", None)
        result = run.wait_for(item.nodeid, on_boot=self._on_boot)
        received = result.reports if result is not None else []
        reports = [self._relay(item, rec) for rec in received]
        if result is not None and result.finished:
            failed = any(r.failed for r in reports)
            self.relayed[item.nodeid] = "failed" if failed else "ok"
            return reports
        # The run ended before this test finished: fail it, keeping what did arrive.
        reason = run.failure or "the guest run ended"
        if not received:
            detail = [f"{reason}; this test never ran."]
        else:
            detail = [f"{reason} while this test was running."]
        if run.collect_errors:
            detail.append("collection errors in the guest:\n" + "\n\n".join(run.collect_errors))
        self.detailed_failures += 1
        if self.detailed_failures == 1:
            detail.append(run.console_tail())
        else:
            detail.append(f"(guest output: {run.dir})")
        text = "\n".join(detail)
        seen = {rec.get("when") for rec in received}
        failed_already = any(rec.get("outcome") == "failed" for rec in received)
        if "setup" not in seen:
            return reports + self._failed(item, text, reason)
        if "call" not in seen and not failed_already and received[0].get("outcome") == "passed":
            reports.append(self._make(item, "call", "failed", GuestLongRepr(text, reason)))
        if "teardown" not in seen:
            outcome: Literal["passed", "failed"] = "passed" if failed_already else "failed"
            longrepr = None if failed_already else GuestLongRepr(text, reason)
            reports.append(self._make(item, "teardown", outcome, longrepr))
        self.relayed[item.nodeid] = "failed"
        return reports

    def _failed(self, item: pytest.Item, text: str, message: str | None) -> list[pytest.TestReport]:
        self.relayed[item.nodeid] = "failed"
        first_line = text.splitlines()[0] if text else "failed in the guest"
        return [
            self._make(item, "setup", "passed", None),
            self._make(item, "call", "failed", GuestLongRepr(text, message or first_line)),
            self._make(item, "teardown", "passed", None),
        ]

    def _make(
        self,
        item: pytest.Item,
        when: Phase,
        outcome: Literal["passed", "failed", "skipped"],
        longrepr: Any,
        sections: list[tuple[str, str]] | None = None,
        duration: float = 0.0,
    ) -> pytest.TestReport:
        now = time.time()
        return pytest.TestReport(
            nodeid=item.nodeid,
            location=item.location,
            keywords=dict.fromkeys(item.keywords, 1),
            outcome=outcome,
            longrepr=longrepr,
            when=when,
            sections=sections or [],
            duration=duration,
            start=now - duration,
            stop=now,
            user_properties=list(item.user_properties),
        )

    def _relay(self, item: pytest.Item, rec: dict[str, Any]) -> pytest.TestReport:
        when: Phase = rec["when"] if rec.get("when") in PHASES else "call"
        outcome: Literal["passed", "failed", "skipped"] = "failed"
        if rec.get("outcome") in ("passed", "skipped"):
            outcome = rec["outcome"]
        lr = rec.get("longrepr")
        longrepr: Any = None
        if isinstance(lr, dict):
            if lr.get("kind") == "tuple":
                path, lineno, reason = lr["value"]
                longrepr = (str(path), int(lineno), str(reason))
            else:
                run = self.run
                header = "[ran in the BPF-LSM guest"
                if run is not None and run.guest_info is not None:
                    header += f", kernel {run.guest_info.get('release')}"
                if run is not None:
                    header += f"; guest output: {run.dir / GUEST_PYTEST_LOG}"
                text = f"{header}]\n{lr.get('value', '')}"
                longrepr = GuestLongRepr(text, lr.get("crash"))
        sections = [(str(t), str(c)) for t, c in rec.get("sections", [])]
        report = self._make(item, when, outcome, longrepr, sections, float(rec.get("duration", 0)))
        if "wasxfail" in rec:
            report.wasxfail = rec["wasxfail"]
        return report

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        run = self.run
        if run is None and self.unavailable is None:
            return
        if self.unavailable is not None:
            terminalreporter.write_line(f"guard guest: not started: {self.unavailable}")
            return
        assert run is not None
        if run.failure is not None and run.ended_at is not None:
            end = run.ended_at
        else:
            end = run.last_result_at or run.ended_at or time.monotonic()
        failed = sum(1 for v in self.relayed.values() if v != "ok")
        kept = failed or self._keep()
        terminalreporter.write_line(
            f"guard guest: {len(self.relayed)} guest test(s) relayed, "
            f"results in {end - run.started_at:.1f} s after the start ("
            + (
                f"boot {run.booted_after:.1f} s); "
                if run.booted_after is not None
                else "no boot); "
            )
            + (f"run directory kept: {run.dir}" if kept else "run directory removed")
        )

    @staticmethod
    def _keep() -> bool:
        return os.environ.get("GUARD_GUEST_KEEP") == "1"

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        run = self.run
        if run is None:
            return
        if run.failure is None:
            # Every guest test reported (or the session stopped early, e.g. -x / Ctrl-C).
            # When every guest test has reported, the guest's pytest finishes and the guest
            # powers off by itself: give it a bounded moment, so its log is complete.
            if run.all_finished() and run.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    run.proc.wait(timeout=GRACEFUL_EXIT_S)
            run.kill()
            run.ended_at = run.ended_at or time.monotonic()

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        run = self.run
        if run is None:
            return
        run.kill()
        all_ok = bool(self.relayed) and all(v == "ok" for v in self.relayed.values())
        if all_ok and not self._keep():
            shutil.rmtree(run.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------
# guest side
# --------------------------------------------------------------------------------------


class _Recorder:
    """Appends JSON records to the shared results file, each flushed to the host at once."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


class GuestReporter:
    """Inside the guest: runs only the host's selected node ids and records every report."""

    def __init__(self, guest_dir: Path) -> None:
        self.recorder = _Recorder(guest_dir / RESULTS)
        try:
            self.wanted: set[str] | None = set(json.loads((guest_dir / NODEIDS).read_text()))
        except (OSError, ValueError):
            self.wanted = None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        if self.wanted is None:
            return
        keep = [i for i in items if i.nodeid in self.wanted]
        drop = [i for i in items if i.nodeid not in self.wanted]
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.recorder.write(
                {"event": "collect_error", "nodeid": report.nodeid, "text": report.longreprtext}
            )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        longrepr: dict[str, Any] | None
        if report.longrepr is None:
            longrepr = None
        elif isinstance(report.longrepr, tuple):
            longrepr = {"kind": "tuple", "value": list(report.longrepr)}
        else:
            crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)
            longrepr = {"kind": "text", "value": _longrepr_text(report), "crash": crash}
        record: dict[str, Any] = {
            "event": "report",
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "longrepr": longrepr,
            "duration": report.duration,
            "sections": [list(s) for s in report.sections],
        }
        if hasattr(report, "wasxfail"):
            record["wasxfail"] = report.wasxfail
        self.recorder.write(record)

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        self.recorder.write({"event": "finish", "nodeid": nodeid})


def _longrepr_text(report: pytest.TestReport) -> str:
    """The failure text as pytest prints it (``longreprtext`` strips the first indent)."""
    try:
        from _pytest._io import TerminalWriter

        out = io.StringIO()
        tw = TerminalWriter(out)
        tw.hasmarkup = False
        report.toterminal(tw)
        return out.getvalue().rstrip()
    except Exception:
        return report.longreprtext


def _mounted(target: str, fstype: str) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == target and fields[sep + 1] == fstype:
                return True
    return False


def _guest_prepare() -> tuple[dict[str, str], dict[str, Any]]:
    """Mount what BPF needs and find kernel headers; returns (extra env, info) or raises."""
    for fstype, target in (
        ("securityfs", "/sys/kernel/security"),
        ("tracefs", "/sys/kernel/tracing"),
        ("bpf", "/sys/fs/bpf"),
    ):
        if not _mounted(target, fstype):
            os.makedirs(target, exist_ok=True)
            subprocess.run(["mount", "-t", fstype, fstype, target], check=True, timeout=30)
    release = os.uname().release
    lsm = Path("/sys/kernel/security/lsm").read_text().strip()
    if "bpf" not in lsm.split(","):
        raise RuntimeError(f"BPF LSM is not active in the guest kernel {release} (lsm={lsm})")
    env: dict[str, str] = {}
    build = Path(f"/lib/modules/{release}/build")
    if not (build / "Makefile").exists():
        headers = Path(f"/usr/src/linux-headers-{release}")
        if not (headers / "Makefile").exists():
            raise RuntimeError(f"no kernel headers for {release} (looked at {build}, {headers})")
        env["BCC_KERNEL_SOURCE"] = str(headers)
    info = {"release": release, "lsm": lsm, "headers": env.get("BCC_KERNEL_SOURCE", str(build))}
    return env, info


def guest_main(guest_dir: Path) -> int:
    recorder = _Recorder(guest_dir / RESULTS)
    try:
        extra_env, info = _guest_prepare()
    except Exception as exc:
        recorder.write({"event": "guest_error", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    recorder.write({"event": "guest_start", **info})
    nodeids: list[str] = json.loads((guest_dir / NODEIDS).read_text())
    files = list(dict.fromkeys(n.split("::", 1)[0] for n in nodeids))
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-v",
        "-ra",
        "--rootdir",
        str(ROOT),
        *(str(ROOT / f) for f in files),
    ]
    env = {**os.environ, **extra_env, ENV_IN_GUEST: "1", ENV_GUEST_DIR: str(guest_dir)}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    with open(guest_dir / GUEST_PYTEST_LOG, "wb") as log:
        proc = subprocess.Popen(
            args, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert proc.stdout is not None
        for chunk in _chunks(proc.stdout):
            log.write(chunk)
            log.flush()
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        code = proc.wait()
    recorder.write({"event": "guest_end", "pytest_exit": code})
    return code


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while True:
        chunk = stream.read1(65536)  # type: ignore[attr-defined]
        if not chunk:
            return
        yield chunk


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--guest":
        sys.exit(guest_main(Path(sys.argv[2])))
    sys.exit(f"usage: {sys.argv[0]} --guest RWDIR (runs inside the test guest)")
