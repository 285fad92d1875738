"""What ``guard run`` says on stderr while it starts: once, in guard's words, with times.

- ``Progress``: one line per stage with its time (``guard: compile: 3 policies,
  5 rules (12 ms)``); a slow stage (bcc compiling the programs) also says that
  it began, so a start under load is never silent;
- ``stderr_line``: the one prefix rule: ``guard: error: MESSAGE``, except that a
  message that already carries its own ``error:``/``warning:`` label (a
  positioned diagnostic, ``FILE:L:C: error: ...``, or a resolver warning,
  ``PATH: warning: ...``) is not labelled twice;
- ``target_unreachable``: the line that says the event target cannot be
  reached, with what to do about it;
- ``lsm_report``: the BPF-LSM diagnosis (guard.kernel.lsm) when an LSM family
  cannot run;
- ``quiet_repeated_loggers``: library loggers whose warnings the daemon
  already reports itself.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from guard.events.formats import SEV_ERR, SEV_WARNING
from guard.events.transports import Sink
from guard.kernel.loader import LSM_FAMILIES
from guard.kernel.lsm import LsmReport, diagnose
from guard.policy.load import PolicyLoad

_LABELLED = re.compile(r"^\S+: (error|warning): ")


def stderr_line(severity: int, message: str) -> str:
    """``guard: [error: |warning: ]MESSAGE``, never with the label twice."""
    label = {SEV_ERR: "error: ", SEV_WARNING: "warning: "}.get(severity, "")
    if label and _LABELLED.match(message):
        label = ""
    return f"guard: {label}{message}"


def _seconds(elapsed: float) -> str:
    return f"{elapsed * 1000:.0f} ms" if elapsed < 1 else f"{elapsed:.1f} s"


class Progress:
    """Stage lines on stderr (not syslog: they are about this start, for the operator)."""

    def __init__(self, stream: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, begin: str = "") -> Iterator[Callable[[str], None]]:
        """``with progress.stage("load", "compiling...") as done: ...; done("summary")``:
        the summary line with the stage's time when ``done`` is called (nothing when
        the stage fails: its error says it); ``begin``, when given, first."""
        if begin:
            print(f"guard: {name}: {begin}...", file=self.stream, flush=True)
        start = self.clock()

        def done(summary: str) -> None:
            elapsed = self.clock() - start
            self.times[name] = elapsed
            print(f"guard: {name}: {summary} ({_seconds(elapsed)})", file=self.stream,
                  flush=True)

        yield done


def compiled(loaded: object) -> str:
    """The compile stage's summary; the failures are printed by the daemon."""
    if not isinstance(loaded, PolicyLoad):
        return "the policies have errors"
    count = len(loaded.policy_set.policies)
    rules = sum(len(section.rules) for p in loaded.policy_set.policies
                for section in (p.exec, p.files, p.egress) if section is not None)
    return (f"{count} polic{'y' if count == 1 else 'ies'}, {rules} rules, revision "
            f"{loaded.revision}")


def target_unreachable(sink: Sink) -> str:
    """A line saying the event target cannot be reached now, or "" when it can."""
    sink.pump()
    stats = sink.stats()
    if stats.connected or not stats.last_error:
        return ""
    return (f"the event target {stats.target} is unreachable ({stats.last_error}): events "
            f"are queued (up to {sink.queue_size}, then counted as lost) and sent once it "
            "answers; `guard events` shows them live meanwhile, or pick another target "
            "with --syslog (e.g. file:/var/log/guard.jsonl)")


def lsm_report(unavailable: Mapping[str, str]) -> LsmReport | None:
    """The BPF-LSM diagnosis when an LSM family is unavailable for a kernel reason
    (not when this guard simply has no source file for it)."""
    reasons = [why for family, why in unavailable.items()
               if family in LSM_FAMILIES and not why.startswith("this guard has no")]
    if not reasons:
        return None
    return diagnose(probe_refused=any("EPERM" in why or "refused" in why for why in reasons))


def policies_dir_problem(path: str) -> str:
    """Why ``guard run --policies PATH`` cannot run, or "": it takes a directory,
    watched and re-read as a whole; a single file is refused with what to do."""
    from pathlib import Path

    given = Path(path)
    if given.is_dir():
        return ""
    if given.is_file():
        return (f"--policies {path}: is a file; guard run takes a directory (it watches it "
                f"and re-reads it as a whole): put the file in a directory of its own, e.g. "
                f"mkdir -p /etc/guard/policies && cp {path} /etc/guard/policies/, and run "
                f"with --policies /etc/guard/policies")
    return f"--policies {path}: no such directory"


def metrics_server(address: str | None, daemon: object, stream: Any) -> Any:
    """The --metrics endpoint (guard.service.metrics), bound before anything is
    loaded; None without --metrics, False (said on ``stream``) when it cannot be."""
    if not address:
        return None
    try:
        from guard.service.metrics import MetricsError, MetricsServer
    except ImportError as error:  # pragma: no cover - depends on the machine
        print(f"guard run: --metrics needs prometheus_client (Debian: "
              f"python3-prometheus-client): {error}", file=stream)
        return False
    try:
        server = MetricsServer(address, daemon)
    except MetricsError as error:
        print(f"guard run: {error}", file=stream)
        return False
    print(f"guard: metrics: serving http://{address.rsplit(':', 1)[0] or '0.0.0.0'}:"
          f"{server.port}/metrics", file=stream, flush=True)
    return server


def host_cgroup_problem(path: str) -> str:
    """Why --host-cgroup cannot be used, or "": it must exist before guard starts
    (its programs attach there), said before anything is compiled."""
    from guard.kernel.cgroups import CgroupError, cgroup_dir

    try:
        directory = cgroup_dir(path)
    except (CgroupError, ValueError) as error:
        return f"--host-cgroup {path}: {error}"
    if directory.is_dir():
        return ""
    return (f"--host-cgroup {path}: no such cgroup ({directory} does not exist); "
            f"create it first (mkdir {directory}) or name an existing one")


def quiet_repeated_loggers() -> None:
    """guard.kernel.apply logs each resolver warning; the daemon reports the same
    warnings itself (stderr and syslog), so its copy would say each one twice."""
    logging.getLogger("guard.kernel.apply").setLevel(logging.ERROR)


__all__ = ["Progress", "compiled", "host_cgroup_problem", "lsm_report", "metrics_server",
           "policies_dir_problem", "quiet_repeated_loggers", "stderr_line",
           "target_unreachable"]
