"""Recordings (guard.policy.recording) and ``guard replay``: the daemon's JSON lines read
back and decided again under a policy set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from recordings import NGINX, connect_event, exec_event, lines, open_event, write

from guard.cli import main
from guard.errors import ExitCode
from guard.events.formats import event_record, format_json, format_rfc5424
from guard.policy.compile import compile_policies
from guard.policy.parse import load_policy_paths
from guard.policy.plan import Plan, Verdict
from guard.policy.recording import operation_of, parse_recording, read_recording, unescape
from guard.policy.replay import decide, replay

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"


def plan_of(*paths: Path | str) -> Plan:
    result = load_policy_paths([str(p) for p in paths])
    assert result.policy_set is not None, result.diagnostics
    return compile_policies(result.policy_set)


def policy_file(tmp: Path, name: str, body: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(f"apiVersion: guard/v1\nkind: Policy\nmetadata: {{name: {name}}}\n"
                    f"spec:\n{body}")
    return path


# --- the record format ------------------------------------------------------------------


def test_every_decision_kind_reads_back_as_the_operation_it_was() -> None:
    events = [exec_event("/usr/bin/curl"),
              exec_event("/usr/lib/x.so", hook="mmap_file"),
              open_event("/etc/shadow", "read,write", count=4),
              connect_event("2001:db8::1", 443, "udp", action="would-deny", undecided=True)]
    rec = parse_recording(lines(events), "rec.jsonl")
    assert rec.problems == () and len(rec.operations) == 4
    ex, mapped, opened, conn = rec.operations
    assert (ex.op, ex.path, ex.cgroup, ex.action, ex.rule) == (
        "exec", "/usr/bin/curl", NGINX, "audit", "learn/x.default")
    assert (mapped.op, mapped.hook) == ("map", "mmap_file")
    assert (opened.op, opened.access, opened.count) == ("open", ("read", "write"), 4)
    assert (conn.op, conn.addr, conn.port, conn.proto, conn.verdict, conn.undecided) == (
        "connect", "2001:db8::1", 443, "udp", Verdict.WOULD_DENY, True)
    assert ex.where == "rec.jsonl:1" and rec.count == 7


def test_op_is_in_the_json_form_only_and_the_syslog_line_is_unchanged() -> None:
    ev = exec_event("/usr/bin/curl", hook="file_mprotect")
    body = json.loads(format_json(event_record(ev), "h", 1))
    assert body["op"] == "map" == operation_of("exec", "file_mprotect")
    assert "op=" not in format_rfc5424(event_record(ev), "h", 1)
    assert operation_of("file", "path_change") == "open"
    assert operation_of("lost", "") == ""


def test_escaped_paths_come_back_as_the_kernel_gave_them() -> None:
    ev = exec_event("/tmp/a\\x0ab\\x5cc\\xff")  # as printable() writes newline, \\, byte 0xff
    (op,) = parse_recording(lines([ev]), "r").operations
    assert op.path == unescape("/tmp/a\\x0ab\\x5cc\\xff") == "/tmp/a\nb\\c\udcff"


def test_bad_lines_are_reported_with_file_and_line_and_the_rest_is_read(tmp_path: Path) -> None:
    good = lines([exec_event("/usr/bin/true")])[0]
    body = json.loads(good)
    no_cgroup = json.dumps({k: v for k, v in body.items() if k != "cgroup"})
    bad_access = json.dumps({**body, "kind": "file", "op": "open", "access": "exec"})
    unnamed = json.dumps({**body, "cgroup": "cgroup-id:42"})
    text = [good, "{not json", "[1, 2]", no_cgroup, bad_access, unnamed,
            json.dumps({**body, "kind": "tamper"}), "", good]
    rec = parse_recording(text, "rec.jsonl")
    assert [str(p) for p in rec.problems] == [
        "rec.jsonl:2: error: not JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)",
        "rec.jsonl:3: error: not a JSON object",
        "rec.jsonl:4: error: field 'cgroup' is missing or not a non-empty string",
        "rec.jsonl:5: error: access 'exec' is not read, write or read,write",
        "rec.jsonl:6: error: cgroup 'cgroup-id:42' is not a cgroup path (the daemon could "
        "not name it)",
    ]
    assert [op.line for op in rec.operations] == [1, 9]
    assert (rec.skipped, rec.lines) == (1, 8)


def test_daemon_lines_are_skipped_and_lost_events_counted(tmp_path: Path) -> None:
    path = write(tmp_path / "rec.jsonl", [exec_event("/usr/bin/true")], lost=5)
    rec = read_recording([str(path)])
    assert (len(rec.operations), rec.skipped, rec.lost, rec.problems) == (1, 1, 5, ())


# --- deciding again -----------------------------------------------------------------------


def test_replay_under_the_recording_policies_changes_nothing() -> None:
    plan = plan_of(POLICIES)
    events = [exec_event("/usr/bin/curl", action="deny",
                         rule="web-no-downloaders/exec.rules[0]"),
              open_event("/etc/shadow", action="audit", cgroup="/user.slice",
                         rule="shadow-read-audit/files.rules[0]"),
              connect_event("192.0.2.1", 587, action="deny", rule="no-mail/egress.rules[0]")]
    outcome = replay(plan, parse_recording(lines(events), "r"))
    assert outcome.changes == () and outcome.operations == 3 and not outcome.failed()


def test_changes_are_classified_and_grouped_by_the_rule_that_decides_now(tmp_path: Path) -> None:
    plan = plan_of(policy_file(tmp_path, "lock", """\
  scope: {cgroups: [/system.slice/nginx.service]}
  exec:
    default: deny
    rules: [{action: allow, paths: [/usr/sbin/nginx]}]
  network:
    egress:
      default: allow
      rules: [{action: audit, to: [192.0.2.0/24]}]
"""))
    events = [exec_event("/usr/bin/curl", count=3), exec_event("/usr/bin/curl"),
              exec_event("/usr/sbin/nginx"),
              exec_event("/usr/lib/libc.so.6", hook="mmap_file", action="would-deny"),
              connect_event("192.0.2.7", 80, action="deny"),
              connect_event("198.51.100.1", 80, action="would-deny")]
    outcome = replay(plan, parse_recording(lines(events), "rec.jsonl"))
    assert (outcome.count("blocked"), outcome.count("allowed"), outcome.count("reported")) == (
        4, 1, 3)
    groups = {g.rule: g for g in outcome.groups()}
    assert set(groups) == {"lock/exec.default", "lock/exec.rules[0]", "lock/egress.rules[0]",
                           "lock/egress.default", ""}
    default = groups["lock/exec.default"]
    assert default.count == 4 and len(default.changes) == 1  # one operation, 4 times
    assert default.location == f"{tmp_path}/lock.yaml:7:5"
    # a mapping is refused by entries only: the exec default does not refuse it
    assert groups[""].count == 1 and groups[""].changes[0][0].op.op == "map"
    assert outcome.failed("any") and outcome.failed("blocked")


def test_an_open_for_read_and_write_takes_the_stronger_verdict(tmp_path: Path) -> None:
    plan = plan_of(policy_file(tmp_path, "etc", """\
  files:
    rules:
      - {action: deny, access: [write], paths: ["/etc/**"]}
      - {action: audit, access: [read], paths: [/etc/passwd]}
"""))
    (op,) = parse_recording(lines([open_event("/etc/passwd", "read,write")]), "r").operations
    assert decide(plan, op).verdict is Verdict.DENY
    (op,) = parse_recording(lines([open_event("/etc/passwd", "read")]), "r").operations
    assert decide(plan, op).verdict is Verdict.AUDIT


# --- the command --------------------------------------------------------------------------


def test_guard_replay_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    rec = write(tmp_path / "rec.jsonl", [exec_event("/usr/bin/curl", count=2),
                                         exec_event("/usr/bin/true")])
    policies = str(POLICIES)
    assert main(["replay", "--policies", policies, str(rec)]) == ExitCode.CHANGED
    out = capsys.readouterr().out
    assert "1 now blocked" not in out and "2 now blocked" in out
    assert "web-no-downloaders/exec.rules[0]" in out and f"{rec}:2" in out
    assert main(["replay", "--policies", policies, "--fail-on", "blocked", "--json",
                 str(rec)]) == ExitCode.CHANGED
    body = json.loads(capsys.readouterr().out)
    assert body["by_effect"] == {"blocked": 2, "allowed": 0, "reported": 1}
    assert body["groups"][0]["rule"] == "web-no-downloaders/exec.rules[0]"
    # only the "reported" change is left under a set that denies nothing: gate on blocked passes
    assert main(["replay", "--policies", str(POLICIES / "no-mail.yaml"), "--fail-on",
                 "blocked", str(rec)]) == ExitCode.OK
    with rec.open("a") as f:
        f.write("{broken\n")
    assert main(["replay", "--policies", policies, str(rec)]) == ExitCode.INVALID
    assert f"{rec}:4: error: not JSON" in capsys.readouterr().err
    assert main(["replay", "--policies", policies, str(tmp_path / "none")]) == ExitCode.RUNTIME


def test_names_the_evaluator_cannot_decide_are_listed_not_fatal(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # an exec recorded by the name it was run by; a mapping recorded by its file's name
    rec = write(tmp_path / "rec.jsonl", [exec_event("./configure"),
                                         exec_event("libc.so.6", hook="mmap_file"),
                                         exec_event("/usr/bin/true")])
    recording = read_recording([str(rec)])
    assert recording.problems == () and len(recording.operations) == 3
    outcome = replay(plan_of(POLICIES), recording)
    assert [p.line for p in outcome.unreplayable] == [2, 3] and outcome.operations == 1
    assert main(["replay", "--policies", str(POLICIES), str(rec)]) == ExitCode.CHANGED
    out = capsys.readouterr().out
    assert f"note: {rec}:2: cannot decide exec ./configure: './configure' is not an " \
           "absolute path" in out
