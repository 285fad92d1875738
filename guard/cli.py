"""The ``guard`` command line: one subcommand per stage a person wants to see.

    guard check PATH...              validate; FILE:LINE:COL: error: MESSAGE; exit 1 on any
    guard compile PATH... [--json]   the map entries a policy set becomes
    guard explain ...                which rule decides an exec / open / connect, and why
    guard run --policies DIR         the daemon
    guard status                     what the running daemon enforces
    guard stop [--unload]            stop the daemon; --unload also removes the pinned programs
    guard events [--json]            the running daemon's events, live

Exit codes (guard.errors.ExitCode): 0 success, 1 invalid policy input, 2 usage
error, 3 runtime failure. Each subcommand's work lives in the module of its
stage, which returns values; this file only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from guard.errors import ExitCode

if TYPE_CHECKING:
    from guard.policy.evaluate import Explanation
    from guard.policy.plan import Plan


def _print_diagnostics(diagnostics: Sequence[object]) -> None:
    for diagnostic in diagnostics:
        print(diagnostic, file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    from guard.policy.parse import load_policy_paths

    result = load_policy_paths(args.paths)
    _print_diagnostics(result.diagnostics)
    if result.errors:
        print(f"guard check: {len(result.errors)} error(s) in {len(result.files)} file(s)",
              file=sys.stderr)
        return ExitCode.INVALID
    assert result.policy_set is not None
    print(f"guard check: {len(result.policy_set.policies)} policies in "
          f"{len(result.files)} file(s) are valid")
    return ExitCode.OK


def _compile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host-cgroup", default="/", metavar="CGROUP", type=_host_cgroup_arg,
                        help="the cgroup whole-host policies cover (default: /, the cgroup2 root)")
    parser.add_argument("--unit-cgroup", action="append", default=[], metavar="UNIT=CGROUP",
                        type=_unit_cgroup_arg,
                        help="resolve a systemd unit to this cgroup instead of asking systemd")


def _unit_cgroups(args: argparse.Namespace) -> dict[str, str]:
    """The --unit-cgroup UNIT=CGROUP mapping (each item checked by _unit_cgroup_arg)."""
    return dict(args.unit_cgroup)


# --- operator options: checked at once, with a hint (guard.policy.arguments) -----------


def _host_cgroup_arg(text: str) -> str:
    from guard.policy.arguments import cgroup_argument

    try:
        return cgroup_argument(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _unit_cgroup_arg(text: str) -> tuple[str, str]:
    from guard.policy.arguments import unit_cgroup_argument

    try:
        return unit_cgroup_argument(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


EXIT_CODES = """exit codes (every command):
  0  success (check: the policies are valid; explain: answered, whatever the verdict)
  1  invalid policy input: positioned errors FILE:LINE:COL on stderr
  2  usage error: the command line itself is wrong
  3  runtime failure: no daemon answers, the kernel or the daemon refused, a stop timed out
  130  interrupted (Ctrl-C)"""

RUN_TARGETS = """event targets (--syslog TARGET):
  /dev/log          the local syslog daemon (the default); RFC 5424 lines, facility authpriv,
                    which rsyslog on Debian/Ubuntu writes to /var/log/auth.log and
                    systemd-journald keeps in the journal (journalctl SYSLOG_FACILITY=10)
  unix:PATH         another unix datagram or stream socket speaking syslog
  udp://HOST:PORT   a remote syslog over UDP (RFC 5426)
  tcp://HOST:PORT   a remote syslog over TCP, octet-counted frames (RFC 6587)
  file:PATH         JSON lines appended to PATH, one event per line (for machines)
An unreachable target is said on stderr at start; events are queued and counted when lost.
`guard events` shows the events live over the control socket, with or without syslog.

--policies takes a directory (it is watched and re-read as a whole); to run one
file, put it in a directory of its own."""


def cmd_events(args: argparse.Namespace) -> int:
    from guard.service.tail import events_command

    return events_command(args)


def _add_events(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ev = sub.add_parser("events", help="the running daemon's events, live",
                        description="Follow the running daemon's events over its control "
                        "socket: readable lines, or --json (the file: target's JSON lines). "
                        "Works without any syslog daemon. A client that reads too slowly "
                        "is told how many events it missed; the daemon never waits for it.")
    ev.add_argument("--json", action="store_true", help="one JSON object per event")
    ev.add_argument("--policy", default=None, help="only this policy's events")
    ev.add_argument("--action", default=None,
                    choices=["deny", "audit", "would-deny", "lost"], help="only this action")
    ev.add_argument("--kind", default=None,
                    choices=["exec", "file", "connect", "tamper", "lost"], help="only this kind")
    ev.add_argument("--count", type=int, default=0, metavar="N",
                    help="exit after N events (default: follow until the daemon stops)")
    ev.add_argument("--state-dir", default="/run/guard", metavar="DIR")
    ev.set_defaults(func=cmd_events)


def _load_plan(args: argparse.Namespace) -> Plan | ExitCode:
    """Parse and compile, or print the diagnostics and return an exit code."""
    from guard.errors import PolicyError
    from guard.policy.compile import compile_policies
    from guard.policy.parse import load_policy_paths

    result = load_policy_paths(args.paths)
    _print_diagnostics(result.diagnostics)
    if result.errors or result.policy_set is None:
        return ExitCode.INVALID
    units = _unit_cgroups(args)
    try:
        return compile_policies(result.policy_set, host_cgroup=args.host_cgroup,
                                unit_cgroups=units)
    except PolicyError as error:
        _print_diagnostics(error.diagnostics)
        return ExitCode.INVALID


def cmd_compile(args: argparse.Namespace) -> int:
    from guard.policy.compile import summarize

    plan = _load_plan(args)
    if isinstance(plan, ExitCode):
        return plan
    sys.stdout.write(plan.to_json() if args.json else summarize(plan))
    return ExitCode.OK


def _explanation(plan: Plan, args: argparse.Namespace) -> Explanation:
    """The evaluator's answer to the question on the command line; ValueError for a bad one.

    The acting process's cgroup is --cgroup, or --unit resolved (the --unit-cgroup
    mapping first), or the root.
    """
    from guard.policy.evaluate import decide_connect, decide_exec, decide_open
    from guard.policy.units import normalize_cgroup, resolve_unit

    if args.unit:
        cgroup = resolve_unit(args.unit, _unit_cgroups(args))
    else:
        cgroup = normalize_cgroup(args.cgroup or "/")
    if args.operation == "exec":
        return decide_exec(plan, cgroup, args.target)
    if args.operation == "open":
        return decide_open(plan, cgroup, args.target, args.access)
    if args.operation == "connect":
        return decide_connect(plan, cgroup, args.target, args.port, args.protocol)
    raise ValueError(f"unknown operation {args.operation!r}")


def cmd_explain(args: argparse.Namespace) -> int:
    """Print which rule decides; a denied answer is still a success."""
    plan = _load_plan(args)
    if isinstance(plan, ExitCode):
        return plan
    try:
        explanation = _explanation(plan, args)
    except ValueError as error:
        print(f"guard explain: error: {error}", file=sys.stderr)
        return ExitCode.USAGE
    sys.stdout.write(explanation.render())
    return ExitCode.OK


def cmd_run(args: argparse.Namespace) -> int:
    from guard.service.daemon import run

    return run(args)


def cmd_status(args: argparse.Namespace) -> int:
    from guard.service.control import status

    return status(args)


def cmd_stop(args: argparse.Namespace) -> int:
    from guard.service.control import stop

    return stop(args)


def build_parser() -> argparse.ArgumentParser:
    from guard import __version__

    parser = argparse.ArgumentParser(prog="guard", description=__doc__.split("\n\n")[0],
                                     epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"guard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="validate policy files and directories")
    check.add_argument("paths", nargs="+", metavar="PATH")
    check.set_defaults(func=cmd_check)

    comp = sub.add_parser("compile", help="show the map entries a policy set compiles to")
    comp.add_argument("paths", nargs="+", metavar="PATH")
    comp.add_argument("--json", action="store_true", help="the exact plan, as JSON")
    _compile_args(comp)
    comp.set_defaults(func=cmd_compile)

    expl = sub.add_parser("explain", help="which rule decides an exec, open or connect, and why")
    expl.add_argument("--policies", dest="paths", action="append", required=True,
                      metavar="PATH", help="policy file or directory (repeatable)")
    where = expl.add_mutually_exclusive_group()
    where.add_argument("--cgroup", default=None, help="the acting process's cgroup v2 path")
    where.add_argument("--unit", default=None, help="the acting process's systemd unit")
    _compile_args(expl)
    what = expl.add_subparsers(dest="operation", required=True, metavar="OPERATION")
    e_exec = what.add_parser("exec", help="running a binary")
    e_exec.add_argument("target", metavar="PATH")
    e_open = what.add_parser("open", help="opening a file")
    e_open.add_argument("target", metavar="PATH")
    e_open.add_argument("--access", choices=["read", "write"], default="read")
    e_conn = what.add_parser("connect", help="an outbound connection or datagram")
    e_conn.add_argument("target", metavar="ADDRESS", help="IPv4 or IPv6 address")
    e_conn.add_argument("port", type=int)
    e_conn.add_argument("--protocol", choices=["tcp", "udp"], default="tcp")
    expl.set_defaults(func=cmd_explain)

    run = sub.add_parser("run", help="the daemon: enforce, watch, stream events",
                         epilog=RUN_TARGETS + "\n\n" + EXIT_CODES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--policies", required=True, metavar="DIR",
                     help="the policy directory (not a file: see below)")
    run.add_argument("--syslog", default="/dev/log", metavar="TARGET",
                     help="where events go: /dev/log (default), unix:PATH, udp://HOST:PORT, "
                          "tcp://HOST:PORT, file:PATH (JSON lines); see below")
    run.add_argument("--host-cgroup", default="/", metavar="CGROUP", type=_host_cgroup_arg,
                     help="the cgroup whole-host policies cover and network programs attach "
                          "to, as in /proc/self/cgroup (default /)")
    run.add_argument("--state-dir", default="/run/guard", metavar="DIR",
                     help="where the status socket lives (default /run/guard)")
    run.add_argument("--metrics", default=None, metavar="ADDR:PORT",
                     help="serve Prometheus metrics over HTTP there (e.g. 127.0.0.1:9464; "
                          "guard_policy_events_total and more, see docs/service.md)")
    run.add_argument("--no-watch", action="store_true",
                     help="do not watch the policy directory; reload on SIGHUP only")
    run.add_argument("--pin-dir", default=None, metavar="DIR",
                     help="pin the programs under DIR (a bpffs, e.g. /sys/fs/bpf/guard): "
                          "enforcement outlives the daemon (fail-closed) and the next daemon "
                          "started with DIR takes over; default: nothing is pinned")
    run.add_argument("--fail-open", action="store_true",
                     help="pin nothing even with --pin-dir: enforcement ends with the daemon, "
                          "however it ends (earlier daemons' pins are still taken over)")
    run.set_defaults(func=cmd_run)

    stat = sub.add_parser("status", help="what the running daemon enforces")
    stat.add_argument("--json", action="store_true")
    stat.add_argument("--state-dir", default="/run/guard", metavar="DIR")
    stat.add_argument("--pin-dir", default="/sys/fs/bpf/guard", metavar="DIR",
                      help="with no daemon running, say what is still pinned there")
    stat.set_defaults(func=cmd_status)

    stop = sub.add_parser("stop", help="stop the daemon; --unload also ends enforcement")
    stop.add_argument("--unload", action="store_true",
                      help="remove every pinned program and map: nothing of guard stays")
    stop.add_argument("--state-dir", default="/run/guard", metavar="DIR")
    stop.add_argument("--pin-dir", default="/sys/fs/bpf/guard", metavar="DIR",
                      help="where the pins are (default /sys/fs/bpf/guard)")
    stop.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                      help="how long to wait for the daemon to exit (default 60)")
    stop.set_defaults(func=cmd_stop)
    _add_events(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
