"""``guard suggest``: the allowlist learned from a recording is a policy ``guard check``
accepts, and ``guard replay`` of the same recording under it blocks nothing recorded."""

from __future__ import annotations

import ipaddress
from collections import Counter
from pathlib import Path

import pytest
from recordings import NGINX, connect_event, exec_event, open_event, write

from guard.cli import main
from guard.errors import ExitCode
from guard.policy.compile import compile_policies
from guard.policy.parse import load_policy_paths
from guard.policy.recording import read_recording
from guard.policy.replay import replay
from guard.policy.suggest import (
    Scope,
    collapse_addresses,
    collapse_paths,
    common_root,
    default_name,
    port_ranges,
    suggest,
)

LEARN = dict(action="would-deny", rule="learn/exec.default")


def learning_run() -> list:  # type: ignore[type-arg]
    """What an audit-mode default-deny policy reports of a service, and of others."""
    events = [exec_event(p, **LEARN) for p in
              ("/usr/sbin/nginx", "/opt/app/bin/a", "/opt/app/bin/b", "/opt/app/bin/c",
               "/usr/bin/id", "/usr/bin/env", "/tmp/job")]
    events += [exec_event("/usr/lib/x86_64-linux-gnu/libc.so.6", hook="mmap_file", **LEARN)]
    events += [exec_event("/opt/app/bin/a", count=40, **LEARN)]
    events += [exec_event("/usr/bin/curl", action="deny", rule="web/exec.rules[0]")]
    events += [open_event(p, "write", **LEARN) for p in
               ("/var/lib/app/db/1", "/var/lib/app/db/2", "/var/log/app/x.log")]
    events += [open_event("/etc/app.conf", "read,write", **LEARN)]
    events += [connect_event(f"10.0.0.{i}", 5432, **LEARN) for i in (3, 4, 5, 9)]
    events += [connect_event("10.0.0.7", 5432, action="deny", rule="db/egress.rules[0]")]
    events += [connect_event("192.0.2.1", p, **LEARN)
               for p in (80, 443, 8080, 8081, 8082, 9000, 9100, 9200)]
    events += [connect_event("2001:db8::1", 53, "udp", **LEARN)]
    events += [connect_event("::ffff:198.51.100.4", 0, "udp", **LEARN)]
    # another service, and the host: not the scope's
    events += [exec_event("/usr/bin/perl", cgroup="/system.slice/cron.service", **LEARN),
               connect_event("203.0.113.9", 22, cgroup="/user.slice", **LEARN)]
    return events


def test_the_suggestion_passes_check_and_replay_blocks_nothing_recorded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = write(tmp_path / "rec.jsonl", learning_run(), lost=2)
    out = tmp_path / "policies" / "nginx.yaml"
    out.parent.mkdir()
    assert main(["suggest", "--events", str(rec), "--unit", "nginx.service",
                 "-o", str(out)]) == ExitCode.OK
    assert "left denied" in capsys.readouterr().err
    assert main(["check", str(out.parent)]) == ExitCode.OK
    # the same recording, replayed under the suggestion: nothing newly blocked
    assert main(["replay", "--policies", str(out.parent), "--fail-on", "blocked",
                 str(rec)]) == ExitCode.OK
    result = load_policy_paths([str(out.parent)])
    assert result.policy_set is not None
    outcome = replay(compile_policies(result.policy_set), read_recording([str(rec)]))
    assert outcome.count("blocked") == 0 and outcome.count("allowed") == 0
    # every operation of the scope that ran is allowed now; what was denied stays denied
    assert outcome.count("reported") == sum(
        op.count for op in read_recording([str(rec)]).operations
        if op.cgroup == NGINX and op.action == "would-deny") + 2  # + the other scopes' two


def test_the_policy_text_says_what_it_chose(tmp_path: Path) -> None:
    rec = read_recording([str(write(tmp_path / "rec.jsonl", learning_run(), lost=2))])
    text = suggest(rec, Scope(NGINX, "nginx.service"), "nginx-allowlist").text
    assert 'units: ["nginx.service"]' in text and "mode: enforce" in text
    assert '- "/opt/app/bin/**"  # 3 seen: a, b, c' in text
    assert '- "/usr/bin/id"' in text and "/usr/bin/**" not in text  # a shared directory
    assert "beware: programs ran from world-writable places: /tmp/job" in text
    assert "libc" not in text  # mappings teach nothing
    assert "perl" not in text and "203.0.113.9" not in text  # not the scope's
    assert "Left denied (2 operation(s)" in text and "exec /usr/bin/curl" in text
    assert "reports 2 lost event(s)" in text
    # 10.0.0.7 was denied: the four seen around it stay single addresses
    assert '"10.0.0.3/32"' in text and "10.0.0.0/28" not in text
    assert '"198.51.100.4/32"' in text and "any port" in text
    assert 'ports: [80, 443, "8080-8082", "9000-9100", 9200]  # 8 ports seen' in text
    # reads were seen under /etc only; writes from /etc to /var: the whole tree
    assert 'access: [read]\n        paths: ["/etc/**"]' in text
    assert 'access: [write]\n        paths: ["/**"]' in text and '"/var/lib/app/db/**"' in text
    assert text.count("access: [read]") == 2 and '"/etc/app.conf"' in text


def test_collapsing() -> None:
    assert [c.pattern for c in collapse_paths(Counter(["/opt/a/x", "/opt/a/y", "/opt/a/z",
                                                       "/opt/b/x"]), [], 3)] == [
        "/opt/a/**", "/opt/b/x"]
    assert [c.pattern for c in collapse_paths(Counter(["/opt/a/x", "/opt/a/y", "/opt/a/z"]),
                                              ["/opt/a/evil"], 3)] == [
        "/opt/a/x", "/opt/a/y", "/opt/a/z"]
    assert common_root(["/var/lib/a/x", "/var/log/y"]) == "/var"
    assert common_root(["/etc/passwd", "/usr/lib/x"]) == "/"
    assert common_root(["/var/lib/app", "/var/lib/app/x"]) == "/var/lib"
    v4 = ipaddress.IPv4Address
    assert [str(n) for n in collapse_addresses([v4("10.1.1.1"), v4("10.1.1.2"),
                                                v4("10.1.1.3")], [])] == ["10.1.1.0/30"]
    assert [str(n) for n in collapse_addresses([v4("10.1.1.1"), v4("10.1.2.2")], [])] == [
        "10.1.1.1/32", "10.1.2.2/32"]
    assert port_ranges([80, 81, 82, 443]) == [(80, 82), (443, 443)]
    assert port_ranges([1, 3, 10, 30], limit=2) == [(1, 10), (30, 30)]
    assert default_name(Scope("/system.slice/nginx.service", "nginx.service")) == (
        "nginx-allowlist")
    assert default_name(Scope("/batch.slice")) == "batch-allowlist"


def test_suggest_refuses_a_scope_with_nothing_to_learn(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    rec = write(tmp_path / "rec.jsonl", learning_run())
    assert main(["suggest", "--events", str(rec), "--scope", "/nobody.slice"]) == (
        ExitCode.INVALID)
    assert "no operation that ran in /nobody.slice" in capsys.readouterr().err
    assert main(["suggest", "--events", str(rec), "--scope", "/x", "--name", "Bad_Name"]) == (
        ExitCode.USAGE)
