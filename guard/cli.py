"""The ``guard`` command line: one subcommand per stage a person wants to see.

    guard check PATH... [--json]     validate and compile as run does (- for stdin);
                                     FILE:LINE:COL: error: MESSAGE; exit 1 on any
    guard compile PATH... [--json]   the map entries a policy set becomes
    guard explain ...                which rule decides an exec / open / connect, and why
    guard test [PATH...] [--json]    run the PolicyTest cases kept beside the policies
    guard run --policies DIR         the daemon
    guard status                     what the running daemon enforces
    guard stop [--unload]            stop the daemon; --unload also removes the pinned programs
    guard replay --policies DIR REC  recorded operations decided again; those that change
    guard diff OLD NEW               what a policy change changes: rules, map entries, events
    guard suggest --events REC ...   an allowlist policy learned from a recording
    guard events [--json]            the running daemon's events, live

Exit codes (guard.errors.ExitCode): 0 success, 1 invalid policy input, 2 usage
error, 3 runtime failure, 4 replay or diff found changes. Each subcommand's
work lives in the module of its stage, which returns values; this file only
parses arguments and prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from guard.errors import ExitCode

if TYPE_CHECKING:
    from collections.abc import Callable

    from guard.policy.evaluate import Explanation
    from guard.policy.model import PolicySet
    from guard.policy.plan import Plan
    from guard.policy.recording import Recording
    from guard.policy.replay import Outcome


def _print_diagnostics(diagnostics: Sequence[object]) -> None:
    for diagnostic in diagnostics:
        print(diagnostic, file=sys.stderr)


def _stdin_if_asked(paths: Sequence[str]) -> bytes | None:
    """Standard input's bytes when ``-`` is among the paths (read once, size-capped)."""
    from guard.policy.parse import MAX_FILE_BYTES, STDIN_PATH

    return sys.stdin.buffer.read(MAX_FILE_BYTES + 1) if STDIN_PATH in paths else None


def cmd_check(args: argparse.Namespace) -> int:
    """Validate and compile as ``guard run`` would; exit 1 on any error."""
    from guard.policy.check import check_paths

    result = check_paths(args.paths, stdin=_stdin_if_asked(args.paths),
                         host_cgroup=args.host_cgroup, unit_cgroups=_unit_cgroups(args))
    if args.json:
        sys.stdout.write(result.to_json())
        return ExitCode.INVALID if result.errors else ExitCode.OK
    _print_diagnostics(result.diagnostics)
    if result.errors:
        print(f"guard check: {len(result.errors)} error(s) in {len(result.files)} file(s)",
              file=sys.stderr)
        return ExitCode.INVALID
    assert result.policy_set is not None
    cases = sum(len(t.cases) for t in result.tests)
    tests = f" and {cases} test case(s)" if result.tests else ""
    print(f"guard check: {len(result.policy_set.policies)} policies{tests} in "
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
  4  replay or diff found changes (their --fail-on gate)
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
    from guard.kernel.identity import plan_paths, resolve_question
    from guard.policy.evaluate import decide_connect, decide_exec, decide_open, normalize_path
    from guard.policy.units import normalize_cgroup, resolve_unit

    if args.unit:
        cgroup = resolve_unit(args.unit, _unit_cgroups(args))
    else:
        cgroup = normalize_cgroup(args.cgroup or "/")
    if args.operation in ("exec", "open") and not args.as_written:
        # The path as the kernel sees it on this machine: the file it leads to.
        resolved = resolve_question(plan_paths(plan), normalize_path(args.target))
    else:
        resolved = None
    if args.operation == "exec":
        return decide_exec(plan, cgroup, args.target, resolved)
    if args.operation == "open":
        return decide_open(plan, cgroup, args.target, args.access, resolved)
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


def cmd_test(args: argparse.Namespace) -> int:
    """Run the PolicyTest cases found with the policies; exit 1 on any failure or error."""
    from guard.policy.check import check_paths
    from guard.policy.policytest import report, report_json, run_tests

    units = _unit_cgroups(args)
    checked = check_paths(args.paths, stdin=_stdin_if_asked(args.paths),
                          host_cgroup=args.host_cgroup, unit_cgroups=units)
    # What check warns about is check's business; a test run shows only what stops it.
    errors = checked.errors
    results = run_tests(checked.plan, checked.tests, units) if checked.plan is not None else []
    if args.json:
        sys.stdout.write(report_json(results, errors))
    else:
        _print_diagnostics(errors)
        if errors:
            print(f"guard test: {len(errors)} error(s): no case was run", file=sys.stderr)
        elif not results:
            print("guard test: no test case found (kind: PolicyTest documents)")
        else:
            sys.stdout.write(report(results))
    failed = bool(errors) or any(not r.passed for r in results)
    return ExitCode.INVALID if failed else ExitCode.OK


def _test_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    test = sub.add_parser("test", help="run the PolicyTest cases kept beside the policies")
    test.add_argument("paths", nargs="*", default=["."], metavar="PATH",
                      help="files and directories holding policies and tests (default: .); "
                           "- for standard input")
    test.add_argument("--json", action="store_true", help="the results as JSON (docs/policy.md)")
    _compile_args(test)
    test.set_defaults(func=cmd_test)


def cmd_run(args: argparse.Namespace) -> int:
    from guard.service.daemon import run

    return run(args)


def cmd_status(args: argparse.Namespace) -> int:
    from guard.service.control import status

    return status(args)


def cmd_stop(args: argparse.Namespace) -> int:
    from guard.service.control import stop

    return stop(args)


# --- policy as code: replay, diff, suggest --------------------------------------------


def _read_recording(paths: Sequence[str], command: str) -> Recording | ExitCode:
    """The recordings, their bad lines printed as FILE:LINE: error: ...; RUNTIME when
    one cannot be read."""
    from guard.policy.recording import read_recording

    try:
        recording = read_recording(paths)
    except (OSError, UnicodeError) as error:
        print(f"guard {command}: error: cannot read the recording: {error}", file=sys.stderr)
        return ExitCode.RUNTIME
    _print_diagnostics(recording.problems)
    return recording


def _outcome_exit(outcome: Outcome, fail_on: str) -> ExitCode:
    """INVALID when the recording had bad lines, CHANGED when the gate fails, else OK."""
    if outcome.recording.problems:
        return ExitCode.INVALID
    return ExitCode.CHANGED if outcome.failed(fail_on) else ExitCode.OK


def cmd_replay(args: argparse.Namespace) -> int:
    import json

    from guard.policy.replay import render_replay, replay

    plan = _load_plan(args)
    if isinstance(plan, ExitCode):
        return plan
    recording = _read_recording(args.recordings, "replay")
    if isinstance(recording, ExitCode):
        return recording
    outcome = replay(plan, recording)
    if args.json:
        print(json.dumps({"policies": args.paths, **outcome.as_dict()}, indent=2))
    else:
        sys.stdout.write(render_replay(outcome, args.paths))
    return _outcome_exit(outcome, args.fail_on)


def cmd_suggest(args: argparse.Namespace) -> int:
    """An allowlist from a recording, checked by the parser and compiler before it is shown."""
    from guard.errors import PolicyError
    from guard.policy.compile import compile_policies
    from guard.policy.model import PolicySet
    from guard.policy.parse import parse_text
    from guard.policy.suggest import Scope, default_name, suggest, valid_name
    from guard.policy.units import normalize_cgroup, resolve_unit

    try:
        if args.unit:
            scope = Scope(resolve_unit(args.unit, _unit_cgroups(args)), args.unit)
        else:
            scope = Scope(normalize_cgroup(args.scope))
    except ValueError as error:
        print(f"guard suggest: error: {error}", file=sys.stderr)
        return ExitCode.USAGE
    name = args.name or default_name(scope)
    if not valid_name(name):
        print(f"guard suggest: error: {name!r} is not a policy name (a DNS label)",
              file=sys.stderr)
        return ExitCode.USAGE
    recording = _read_recording(args.events, "suggest")
    if isinstance(recording, ExitCode):
        return recording
    try:
        suggestion = suggest(recording, scope, name)
    except ValueError as error:
        print(f"guard suggest: error: {error}", file=sys.stderr)
        return ExitCode.INVALID
    policies, diagnostics = parse_text(suggestion.text, args.output or "<suggestion>")
    try:
        if policies and not diagnostics:
            compile_policies(PolicySet(tuple(policies)), unit_cgroups=_unit_cgroups(args))
    except PolicyError as error:
        diagnostics = list(error.diagnostics)
    if diagnostics:  # a bug in guard: say so rather than hand out a policy check refuses
        _print_diagnostics(diagnostics)
        print("guard suggest: error: the proposed policy is not valid (a bug in guard)",
              file=sys.stderr)
        return ExitCode.RUNTIME
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(suggestion.text)
    else:
        sys.stdout.write(suggestion.text)
    print(f"guard suggest: {suggestion.learned} operation(s) allowed, {suggestion.denied} "
          f"left denied" + (f"; written to {args.output}" if args.output else ""),
          file=sys.stderr)
    return ExitCode.INVALID if recording.problems else ExitCode.OK


def _load_source(path: str, relabel: Callable[[str], str], args: argparse.Namespace
                 ) -> tuple[PolicySet, Plan] | ExitCode:
    """One side of a diff, parsed and compiled; its diagnostics named as the user named it."""
    from guard.errors import PolicyError
    from guard.policy.compile import compile_policies
    from guard.policy.parse import load_policy_paths

    result = load_policy_paths([path])
    for diagnostic in result.diagnostics:
        print(relabel(str(diagnostic)), file=sys.stderr)
    if result.errors or result.policy_set is None:
        return ExitCode.INVALID
    try:
        return result.policy_set, compile_policies(
            result.policy_set, host_cgroup=args.host_cgroup, unit_cgroups=_unit_cgroups(args))
    except PolicyError as error:
        for diagnostic in error.diagnostics:
            print(relabel(str(diagnostic)), file=sys.stderr)
        return ExitCode.INVALID


def cmd_diff(args: argparse.Namespace) -> int:
    from guard.policy.diff import diff, render_json, render_markdown, render_text
    from guard.policy.replay import compare_plans
    from guard.policy.sources import SourceError, open_source

    if args.fail_on != "any" and not args.events:
        print(f"guard diff: error: --fail-on {args.fail_on} needs --events", file=sys.stderr)
        return ExitCode.USAGE
    recording: Recording | None = None
    if args.events:
        read = _read_recording(args.events, "diff")
        if isinstance(read, ExitCode):
            return read
        recording = read
    render = {"text": render_text, "markdown": render_markdown, "json": render_json}
    try:
        with open_source(args.old, args.policies) as old, \
                open_source(args.new, args.policies) as new:
            def relabel(text: str) -> str:
                return new.relabel(old.relabel(text))

            before = _load_source(old.path, relabel, args)
            after = _load_source(new.path, relabel, args)
            if isinstance(before, ExitCode) or isinstance(after, ExitCode):
                return ExitCode.INVALID
            events = (compare_plans(before[1], after[1], recording)
                      if recording is not None else None)
            result = diff(args.old, *before, args.new, *after, events)
            sys.stdout.write(relabel(render[args.format](result)))
    except SourceError as error:
        print(f"guard diff: error: {error}", file=sys.stderr)
        return ExitCode.USAGE
    if recording is not None and recording.problems:
        return ExitCode.INVALID
    return ExitCode.CHANGED if result.failed(args.fail_on) else ExitCode.OK


def _add_replay_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from guard.policy.diff import FAIL_ON as DIFF_FAIL_ON
    from guard.policy.replay import FAIL_ON

    fail_on_help = ("exit 4 on any recorded operation whose verdict changes (any, the "
                    "default) or only on one newly blocked (blocked)")
    rep = sub.add_parser("replay", help="decide recorded operations again under a policy set")
    rep.add_argument("--policies", dest="paths", action="append", required=True,
                     metavar="PATH", help="policy file or directory (repeatable)")
    rep.add_argument("recordings", nargs="+", metavar="REC.jsonl",
                     help="JSON lines written by guard run --syslog file:PATH ('-': stdin)")
    rep.add_argument("--json", action="store_true", help="the result as one JSON object")
    rep.add_argument("--fail-on", choices=FAIL_ON, default="any", help=fail_on_help)
    _compile_args(rep)
    rep.set_defaults(func=cmd_replay)

    dif = sub.add_parser("diff", help="what changing the policies from OLD to NEW changes")
    dif.add_argument("old", metavar="OLD", help="a policy directory or file, or a git revision")
    dif.add_argument("new", metavar="NEW", help="a policy directory or file, or a git revision")
    dif.add_argument("--policies", default="policies", metavar="DIR",
                     help="the policy directory whose git revisions OLD and NEW name "
                          "(default: policies)")
    dif.add_argument("--events", action="append", metavar="REC.jsonl",
                     help="a recording: show the recorded operations whose verdict changes")
    dif.add_argument("--format", choices=["text", "markdown", "json"], default="text",
                     help="markdown: a comment for a pull request")
    dif.add_argument("--fail-on", choices=DIFF_FAIL_ON, default="any",
                     help="exit 4 on any difference (any, the default), on a recorded "
                          "operation whose verdict changes (verdict), or on one newly "
                          "blocked (blocked)")
    _compile_args(dif)
    dif.set_defaults(func=cmd_diff)

    sug = sub.add_parser("suggest", help="propose an allowlist policy from a recording")
    sug.add_argument("--events", action="append", required=True, metavar="REC.jsonl",
                     help="recording made while the scope ran under an audit-mode policy "
                          "(repeatable; '-': stdin)")
    whom = sug.add_mutually_exclusive_group(required=True)
    whom.add_argument("--scope", metavar="CGROUP", help="the scope's cgroup v2 path")
    whom.add_argument("--unit", metavar="UNIT", help="the scope's systemd unit")
    sug.add_argument("--name", help="the policy's name (default: from the scope)")
    sug.add_argument("-o", "--output", metavar="FILE", help="write the policy here, not stdout")
    sug.add_argument("--unit-cgroup", action="append", default=[], metavar="UNIT=CGROUP",
                     help="where the unit's processes live, when not systemd's default place")
    sug.set_defaults(func=cmd_suggest)


def build_parser() -> argparse.ArgumentParser:
    from guard import __version__

    parser = argparse.ArgumentParser(prog="guard", description=__doc__.split("\n\n")[0],
                                     epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"guard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="validate policy files and directories")
    check.add_argument("paths", nargs="+", metavar="PATH", help="file or directory; - for "
                       "standard input")
    check.add_argument("--json", action="store_true",
                       help="the diagnostics as JSON on standard output (docs/policy.md)")
    _compile_args(check)
    check.set_defaults(func=cmd_check)
    _test_parser(sub)

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
    expl.add_argument("--as-written", action="store_true",
                      help="decide exec and open by the path's text, without resolving it on "
                           "this machine (default: by the identity of the file it leads to, "
                           "as the kernel does)")
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

    _add_replay_parsers(sub)
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
