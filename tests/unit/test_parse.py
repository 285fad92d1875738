"""The policy parser: the model it builds, its defaults, and every rule it enforces.

Positions are asserted exactly: an error is only useful if it points at the value.
"""

from __future__ import annotations

import ipaddress
import os
import textwrap
from pathlib import Path

import pytest
import yaml
from support import need

import guard.policy.yamlnodes
from guard.errors import Diagnostic, Location
from guard.policy.model import (
    Access,
    Action,
    Default,
    EgressSection,
    ExecRule,
    ExecSection,
    FileRule,
    FilesSection,
    Mode,
    NetRule,
    PathPattern,
    Policy,
    PortRange,
    Protocol,
    Scope,
)
from guard.policy.parse import MAX_FILE_BYTES, load_policy_paths, parse_text
from guard.policy.yamlnodes import MAX_ERRORS_PER_FILE

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NOWHERE = Location("", 0, 0)  # locations do not take part in model equality
HEADER = "apiVersion: guard/v1\nkind: Policy\nmetadata:\n  name: {name}\nspec:\n"
SPEC_LINE = 6  # the first line of the spec body written by policy()


@pytest.fixture(autouse=True, params=["libyaml", "python"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with each YAML parser guard can use."""
    if request.param == "libyaml":
        need(yaml.__with_libyaml__, "PyYAML without libyaml (Debian's python3-yaml has it)")
    monkeypatch.setattr(guard.policy.yamlnodes, "USE_LIBYAML", request.param == "libyaml")
    return str(request.param)


def policy(spec: str, name: str = "p") -> str:
    """A policy document whose spec body (indented under ``spec:``) starts on line 6."""
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return HEADER.format(name=name) + body + "\n"


def position(text: str, needle: str, occurrence: int = 1) -> tuple[int, int]:
    """1-based line and column of the n-th occurrence of ``needle``."""
    index = -1
    for _ in range(occurrence):
        index = text.index(needle, index + 1)
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def only_error(text: str) -> Diagnostic:
    policies, diagnostics = parse_text(text, "t.yaml")
    assert len(diagnostics) == 1, diagnostics
    assert policies == []
    return diagnostics[0]


def valid(text: str) -> Policy:
    policies, diagnostics = parse_text(text, "t.yaml")
    assert diagnostics == [], diagnostics
    assert len(policies) == 1
    return policies[0]


# --------------------------------------------------------------------------- the model


def test_the_design_example_becomes_this_model() -> None:
    text = (FIXTURES / "valid" / "design-example.yaml").read_text()
    got = valid(text)
    path = PathPattern
    expected = Policy(
        name="web-tier",
        description="the web tier runs only its own binaries and no mail",
        mode=Mode.ENFORCE,
        scope=Scope(cgroups=("/system.slice/nginx.service",), units=("nginx.service",)),
        exec=ExecSection(Default.ALLOW, (
            ExecRule(0, Action.DENY, (path("/usr/bin/curl", False, NOWHERE),
                                      path("/usr/bin/wget", False, NOWHERE)), NOWHERE),
            ExecRule(1, Action.DENY, (path("/tmp", True, NOWHERE),
                                      path("/dev/shm", True, NOWHERE)), NOWHERE),
            ExecRule(2, Action.ALLOW, (path("/usr/sbin/nginx", False, NOWHERE),), NOWHERE),
        ), NOWHERE),
        files=FilesSection((
            FileRule(0, Action.AUDIT, frozenset({Access.READ, Access.WRITE}),
                     (path("/etc/shadow", False, NOWHERE), path("/etc/ssh", True, NOWHERE)),
                     NOWHERE),
            FileRule(1, Action.DENY, frozenset({Access.WRITE}), (path("/etc", True, NOWHERE),),
                     NOWHERE),
        ), NOWHERE),
        egress=EgressSection(Default.ALLOW, (
            NetRule(0, Action.DENY,
                    (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")),
                    (PortRange(25, 25, NOWHERE), PortRange(465, 465, NOWHERE),
                     PortRange(587, 587, NOWHERE)),
                    Protocol.TCP, NOWHERE),
            NetRule(1, Action.ALLOW, (ipaddress.ip_network("10.0.0.0/8"),), (), Protocol.ANY,
                    NOWHERE),
        ), NOWHERE),
        location=NOWHERE,
    )
    assert got == expected


def test_every_element_keeps_the_location_of_its_yaml() -> None:
    text = (FIXTURES / "valid" / "design-example.yaml").read_text()
    got = valid(text)
    assert got.location == Location("t.yaml", 1, 1)
    assert got.exec is not None and got.files is not None and got.egress is not None
    assert got.exec.location == Location("t.yaml", *position(text, "default: allow"))
    rule = got.exec.rules[1]
    assert rule.location == Location("t.yaml", *position(text, "{action: deny", 2))
    assert rule.paths[1].location == Location("t.yaml", *position(text, '"/dev/shm/**"'))
    assert got.files.location == Location("t.yaml", *position(text, "rules:", 2)[:1], 5)
    assert got.egress.location == Location("t.yaml", *position(text, "default: allow", 2))
    port = got.egress.rules[0].ports[2]
    assert port.location == Location("t.yaml", *position(text, "587"))


def test_defaults() -> None:
    got = valid(policy("{}").replace("spec:\n  {}", "spec: {}"))
    assert got.mode is Mode.ENFORCE
    assert got.scope == Scope() and got.scope.whole_host
    assert (got.exec, got.files, got.egress, got.description) == (None, None, None, "")


def test_empty_sections_mean_their_defaults() -> None:
    got = valid(policy("""
        exec: {}
        files: {}
        network: {egress: {}}
    """))
    assert got.exec == ExecSection(Default.ALLOW, (), NOWHERE)
    assert got.files == FilesSection((), NOWHERE)
    assert got.egress == EgressSection(Default.ALLOW, (), NOWHERE)
    assert valid(policy("network: {}")).egress is None


def test_rule_defaults_and_indexes() -> None:
    got = valid(policy("""
        network:
          egress:
            default: deny
            rules:
              - {action: allow, to: [10.0.0.0/8]}
              - {action: audit, to: [10.1.0.0/16], ports: [53], protocol: udp}
    """))
    assert got.egress is not None
    assert got.egress.default is Default.DENY
    first, second = got.egress.rules
    assert (first.index, first.ports, first.protocol) == (0, (), Protocol.ANY)
    assert (second.index, second.protocol) == (1, Protocol.UDP)


def test_multi_document_text_gives_one_policy_per_document() -> None:
    text = policy("mode: audit", name="one") + "---\n" + policy("{}", name="two") + "...\n"
    policies, diagnostics = parse_text(text, "t.yaml")
    assert diagnostics == []
    assert [(p.name, p.mode, p.location.line) for p in policies] == [
        ("one", Mode.AUDIT, 1), ("two", Mode.ENFORCE, 8)]


def test_a_broken_document_does_not_hide_the_valid_ones_or_their_errors() -> None:
    text = (policy("mode: audit", name="one") + "---\n" + policy("mode: loud", name="two")
            + "---\n" + policy("mode: quiet", name="three"))
    policies, diagnostics = parse_text(text, "t.yaml")
    assert [p.name for p in policies] == ["one"]
    assert [(d.location.line, d.code) for d in diagnostics] == [(13, "bad-value"),
                                                                (20, "bad-value")]


def test_duplicate_names_in_one_text_point_at_the_second() -> None:
    text = policy("{}", name="same") + "---\n" + policy("{}", name="same")
    _, diagnostics = parse_text(text, "t.yaml")
    assert [str(d) for d in diagnostics] == [
        "t.yaml:11:9: error: duplicate policy name 'same': first defined at t.yaml:4:9"]


def test_a_policy_with_errors_still_claims_its_name() -> None:
    # Both problems are reported in one run, not the duplicate only after the fix.
    text = policy("mode: bad", name="same") + "---\n" + policy("{}", name="same")
    _, diagnostics = parse_text(text, "t.yaml")
    assert [d.code for d in diagnostics] == ["bad-value", "duplicate-name"]


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("written, path, subtree", [
    ("/usr/bin/curl", "/usr/bin/curl", False),
    ("/", "/", False),
    ('"/tmp/**"', "/tmp", True),
    ('"/**"', "/", True),
    ('"**"', "/", True),
    ('"/a b/ünï/**"', "/a b/ünï", True),
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6", False),
    ('"/a]b"', "/a]b", False),
])
def test_valid_paths(written: str, path: str, subtree: bool) -> None:
    got = valid(policy(f"exec: {{rules: [{{action: deny, paths: [{written}]}}]}}"))
    assert got.exec is not None
    assert got.exec.rules[0].paths == (PathPattern(path, subtree, NOWHERE),)


def test_a_lone_surrogate_in_a_path_is_an_error(backend: str) -> None:
    text = policy('exec: {rules: [{action: deny, paths: ["/\\ud800"]}]}')
    error = only_error(text)
    if backend == "libyaml":  # libyaml refuses the escape itself
        assert error.code == "yaml-syntax"
        assert position(text, '"/')[1] < error.location.col <= position(text, "800")[1]
    else:
        assert (error.code, error.location.col) == ("bad-path", position(text, '"/')[1])
        assert "UTF-8" in error.message


@pytest.mark.parametrize("written, code, fragment", [
    ("usr/bin/curl", "relative-path", "is not absolute"),
    ('"./x"', "relative-path", "is not absolute"),
    ('"/usr/bin/"', "unnormalized-path", "write '/usr/bin' (or '/usr/bin/**'"),
    ('"/usr//bin"', "unnormalized-path", "write '/usr/bin'"),
    ('"//usr"', "unnormalized-path", "write '/usr'"),
    ('"//**"', "unnormalized-path", "write '/**'"),
    ('"/a/./b"', "unnormalized-path", "write '/a/b'"),
    ('"/a/../b/**"', "unnormalized-path", "write '/b/**'"),
    ('"/.."', "unnormalized-path", "write '/'"),
    ('"/tmp/*"', "unsupported-glob", "did you mean '/tmp/**'?"),
    ('"/tmp/**/x"', "unsupported-glob", "only pattern is a trailing '/**'"),
    ('"/tmp/x*"', "unsupported-glob", "'*', '?' and '[' are not allowed"),
    ('"/tmp/?"', "unsupported-glob", "unsupported glob"),
    ('"/dev/sd[ab]"', "unsupported-glob", "unsupported glob"),
    ('"/***"', "unsupported-glob", "unsupported glob"),
    ('"*"', "unsupported-glob", "unsupported glob"),
    ('""', "bad-path", "empty path"),
    ('"/a\\0b"', "bad-path", "NUL"),
    ('"/' + "a" * 256 + '"', "bad-path", "longer than 255 bytes"),
    ('"/' + "a/" * 2100 + 'a"', "bad-path", "longer than 4095 bytes"),
])
def test_invalid_paths_point_at_the_item(written: str, code: str, fragment: str) -> None:
    text = policy(f"exec: {{rules: [{{action: deny, paths: [/ok, {written}]}}]}}")
    error = only_error(text)
    assert (error.location.line, error.location.col) == position(text, written)
    assert error.code == code
    assert fragment in error.message


@pytest.mark.parametrize("written, network", [
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("10.1.2.3", "10.1.2.3/32"),
    ('"::/0"', "::/0"),
    ('"::1"', "::1/128"),
    ("2001:db8::/32", "2001:db8::/32"),
    ('"::ffff:10.0.0.0/104"', "10.0.0.0/8"),
    ('"::ffff:0:0/96"', "0.0.0.0/0"),
    ('"::ffff:1.2.3.4"', "1.2.3.4/32"),
    ('"::fffe:0:0/95"', "::fffe:0:0/95"),  # wider than the mapped range: stays IPv6
    ("0.0.0.0/0", "0.0.0.0/0"),
])
def test_valid_networks(written: str, network: str) -> None:
    got = valid(policy(f"network: {{egress: {{rules: [{{action: deny, to: [{written}]}}]}}}}"))
    assert got.egress is not None
    assert got.egress.rules[0].to == (ipaddress.ip_network(network),)
    assert type(got.egress.rules[0].to[0]) is type(ipaddress.ip_network(network))


@pytest.mark.parametrize("written, fragment", [
    ("10.0.0.1/8", "did you mean '10.0.0.0/8', or '10.0.0.1/32' for the one address?"),
    ('"2001:db8::1/32"', "did you mean '2001:db8::/32'"),
    ('"::ffff:10.0.0.1/104"', "host bits set"),
    ("10.0.0.0/33", "not an IP address or network"),
    ("256.0.0.1", "not an IP address or network"),
    ("example.com", "guard matches addresses, not host names"),
    ('"fe80::1%eth0"', "zone indexes"),
    ('" 10.0.0.0/8"', "not an IP address"),
    ("010.0.0.1", "not an IP address"),
])
def test_invalid_networks_point_at_the_item(written: str, fragment: str) -> None:
    text = policy(f"network: {{egress: {{rules: [{{action: deny, to: [1.1.1.1, {written}]}}]}}}}")
    error = only_error(text)
    assert (error.location.line, error.location.col) == position(text, written)
    assert error.code == "bad-network"
    assert fragment in error.message


@pytest.mark.parametrize("written, first, last", [
    ("1", 1, 1), ("65535", 65535, 65535), ('"443"', 443, 443), ('"8000-8080"', 8000, 8080),
    ("8000-8080", 8000, 8080), ('"22-22"', 22, 22), ("+80", 80, 80),
])
def test_valid_ports(written: str, first: int, last: int) -> None:
    got = valid(policy(f"network: {{egress: {{rules: [{{action: deny, to: [::1/128], "
                       f"ports: [{written}]}}]}}}}").replace("[::1/128]", '["::1/128"]'))
    assert got.egress is not None
    assert got.egress.rules[0].ports == (PortRange(first, last, NOWHERE),)


@pytest.mark.parametrize("written, code, fragment", [
    ("0", "bad-port", "port 0 is out of range"),
    ("65536", "bad-port", "port 65536 is out of range"),
    ("-1", "bad-port", "port -1 is out of range"),
    ('"0-10"', "bad-port", "port 0 is out of range"),
    ('"10-70000"', "bad-port", "port 70000 is out of range"),
    ('"10-5"', "bad-port", 'backwards: write "5-10"'),
    ("0x50", "bad-port", "plain decimal"),
    ("0o17", "bad-port", "invalid port '0o17'"),  # YAML 1.1 has no 0o: a string
    ("025", "bad-port", "plain decimal"),  # YAML 1.1 octal: 21, not 25
    ("1_000", "bad-port", "plain decimal"),
    ("1:30", "bad-port", "plain decimal"),  # YAML 1.1 base 60: 90
    ('"http"', "bad-port", "invalid port 'http'"),
    ('"80 - 90"', "bad-port", "invalid port"),
    ("9" * 5000, "bad-port", "out of range"),
    ("22.0", "wrong-type", "got a number"),
    ("true", "wrong-type", "got a boolean"),
    ("[22]", "wrong-type", "got a list"),
])
def test_invalid_ports_point_at_the_item(written: str, code: str, fragment: str) -> None:
    text = policy(f"network: {{egress: {{rules: [{{action: deny, to: [1.1.1.1], "
                  f"ports: [443, {written}]}}]}}}}")
    error = only_error(text)
    assert (error.location.line, error.location.col) == position(text, written)
    assert error.code == code
    assert fragment in error.message
    assert len(error.message) < 300


@pytest.mark.parametrize("unit", [
    "nginx.service", "getty@tty1.service", "user-1000.slice", "session-3.scope",
    "docker.socket", "home.mount", "swapfile.swap", "dev-disk-by\\x2duuid-1.swap",
    "a:b_c.d-e.service", "-.slice", "a-b-c.slice",
])
def test_valid_units(unit: str) -> None:
    got = valid(policy(f"scope: {{units: ['{unit}']}}"))
    assert got.scope.units == (unit,)


@pytest.mark.parametrize("unit, fragment", [
    ("nginx", "did you mean 'nginx.service'?"),
    ("backup.timer", "a .timer unit runs no processes"),
    ("multi-user.target", "a .target unit runs no processes"),
    ("getty@.service", "is a template"),
    ("nginx*.service", "patterns are not supported"),
    ("has space.service", "invalid unit name"),
    (".service", "invalid unit name"),
    ("a@b@c.service", "invalid unit name"),
    ("a" * 250 + ".service", "longer than 255"),
    # systemd's slice names: the dashes spell the path in the tree (a-b.slice is in a.slice)
    ("-a.slice", "a slice name cannot start or end with '-' or contain '--'"),
    ("a-.slice", "a slice name cannot start or end with '-' or contain '--'"),
    ("a--b.slice", "a slice name cannot start or end with '-' or contain '--'"),
    ("x@y.slice", "a slice cannot be a template instance"),
    ("x@.slice", "a slice cannot be a template instance"),
])
def test_invalid_units(unit: str, fragment: str) -> None:
    text = policy(f"scope: {{units: [ok.service, '{unit}']}}")
    error = only_error(text)
    assert (error.location.line, error.location.col) == position(text, f"'{unit}'")
    assert error.code == "bad-unit"
    assert fragment in error.message


def test_scope_cgroups() -> None:
    got = valid(policy("scope: {cgroups: [/system.slice/a.service, /, /system.slice/a.service]}"))
    assert got.scope == Scope(cgroups=("/system.slice/a.service", "/"))
    for written, code in [("/sys/fs/cgroup/unified/x.slice", "bad-cgroup"),
                          ("/sys/fs/cgroup/x.slice", "bad-cgroup"),
                          ('"/x.slice/**"', "unsupported-glob"),
                          ("x.slice", "relative-path")]:
        text = policy(f"scope: {{cgroups: [{written}]}}")
        error = only_error(text)
        assert (error.code, error.location.col) == (code, position(text, written)[1])


def test_an_empty_scope_is_an_error_not_the_whole_host() -> None:
    for spec, code in [("scope: {}", "empty-scope"), ("scope: {units: []}", "empty-list"),
                       ("scope: {cgroups: [], units: [a.service]}", "empty-list")]:
        assert only_error(policy(spec)).code == code


@pytest.mark.parametrize("name", ["a", "web-tier", "0", "a1-b2", "x" * 63])
def test_valid_names(name: str) -> None:
    assert valid(policy("{}", name=f'"{name}"')).name == name


@pytest.mark.parametrize("written, fragment", [
    ("Web", "did you mean 'web'?"),
    ("web_tier", "did you mean 'web-tier'?"),
    ("-a", "did you mean 'a'?"),
    ("a-", "did you mean 'a'?"),
    ("x" * 64, "at most 63"),
    ('"a.b"', "did you mean 'a-b'?"),
    ('""', "invalid policy name ''"),
])
def test_invalid_names(written: str, fragment: str) -> None:
    text = policy("{}", name=written)
    error = only_error(text)
    assert (error.code, error.location.line, error.location.col) == ("bad-name", 4, 9)
    assert fragment in error.message


@pytest.mark.parametrize("field, written, fragment", [
    ("mode", "enforcing", "did you mean 'enforce'? (valid: enforce, audit)"),
    ("mode", "Audit", "did you mean 'audit'?"),
    ("exec", "{default: block}", "(valid: allow, deny)"),
    ("exec", "{rules: [{action: Allow, paths: [/x]}]}", "did you mean 'allow'?"),
    ("files", "{rules: [{action: deny, access: [rw], paths: [/x]}]}", "(valid: read, write)"),
    ("network", "{egress: {rules: [{action: deny, to: [::1/128], protocol: icmp}]}}",
     "(valid: any, tcp, udp)"),
])
def test_invalid_choices_list_the_valid_ones(field: str, written: str, fragment: str) -> None:
    text = policy(f"{field}: {written}").replace("[::1/128]", '["::1/128"]')
    error = only_error(text)
    assert error.code == "bad-value"
    assert fragment in error.message


def test_exec_in_files_access_says_where_exec_belongs() -> None:
    text = policy("files: {rules: [{action: deny, access: [read, exec], paths: [/x]}]}")
    error = only_error(text)
    assert (error.location.line, error.location.col) == position(text, "exec")
    assert "spec.exec.rules" in error.message


def test_a_quoted_number_is_a_string_and_a_plain_one_is_not() -> None:
    assert valid(policy("{}", name='"123"')).name == "123"
    error = only_error(policy("{}", name="123"))
    assert error.code == "wrong-type"
    assert 'quote it to make it a string: "123"' in error.message
    # A quote hint is only given when quoting would make the value valid.
    assert "quote" not in only_error(policy("mode: yes")).message


# --------------------------------------------------------------------------- structure


def test_unknown_keys_point_at_the_key_with_a_suggestion() -> None:
    text = policy("exec: {defualt: deny}")
    error = only_error(text)
    assert (error.location.line, error.location.col) == position(text, "defualt")
    assert error.message == "unknown key 'defualt' in spec.exec; did you mean 'default'?"


def test_a_misspelled_required_key_is_one_error_not_two() -> None:
    text = policy("exec: {rules: [{action: deny, pahts: [/x]}]}")
    assert only_error(text).message.endswith("did you mean 'paths'?")


def test_missing_keys_point_at_the_mapping() -> None:
    text = "kind: Policy\nspec: {}\n"
    _, diagnostics = parse_text(text, "t.yaml")
    assert [(d.location.line, d.location.col, d.message) for d in diagnostics] == [
        (1, 1, "missing required key 'apiVersion' in a policy document"),
        (1, 1, "missing required key 'metadata' in a policy document"),
    ]


def test_duplicate_keys_are_caught_even_where_yaml_would_keep_the_last() -> None:
    text = policy("mode: audit\nmode: enforce")
    error = only_error(text)
    assert (error.code, error.location.line, error.location.col) == ("duplicate-key", 7, 3)
    assert "first at 6:3" in error.message


def test_null_is_never_a_value() -> None:
    for spec in ("exec:", "exec: ~", "exec: null", "mode:", "network: {egress: }",
                 "exec: {rules: [{action: deny, paths: null}]}"):
        error = only_error(policy(spec))
        assert error.code == "wrong-type"
        assert "is empty" in error.message
        assert "[null]" not in error.message


def test_a_document_that_is_only_an_alias_or_a_tag_is_one_error() -> None:
    for text, code in [("--- *x\n", "yaml-alias"), ("--- !!binary aGk=\n", "yaml-tag")]:
        _, diagnostics = parse_text(text, "t.yaml")
        assert [d.code for d in diagnostics] == [code]


def test_wrong_types() -> None:
    cases = [
        ("scope: [/a]", "expected a mapping for spec.scope, got a list"),
        ("exec: {rules: {action: deny}}", "expected a list for spec.exec.rules, got a mapping"),
        ("files: {rules: [{action: deny, access: read, paths: [/x]}]}",
         "a list of one is written [read]"),
        ("exec: {rules: [[/x]]}", "expected a mapping for spec.exec.rules[0], got a list"),
        ("exec: {rules: [{action: deny, paths: [[/x]]}]}", "got a list"),
        ("exec: {rules: [{action: deny, paths: [42]}]}", "expected a string"),
    ]
    for spec, fragment in cases:
        error = only_error(policy(spec))
        assert error.code == "wrong-type"
        assert fragment in error.message, (spec, error.message)


def test_a_document_that_is_not_a_mapping() -> None:
    for text, kind in [("- a\n", "a list"), ("hello\n", "a string"), ("42\n", "an integer")]:
        error = only_error(text)
        assert error.message == f"expected a mapping for a policy document, got {kind}"


def test_all_errors_are_reported_in_one_pass() -> None:
    text = policy("""
        mode: loud
        exec: {default: maybe, rules: [{action: nope, paths: [rel]}]}
        files: {rules: [{action: deny, access: [], paths: ["/x/*"]}]}
        network: {egress: {rules: [{action: deny, to: [10.0.0.1/8], ports: [0]}]}}
    """, name="Bad_Name")
    _, diagnostics = parse_text(text, "t.yaml")
    assert [d.code for d in diagnostics] == [
        "bad-name", "bad-value", "bad-value", "bad-value", "relative-path", "empty-list",
        "unsupported-glob", "bad-network", "bad-port"]
    assert diagnostics == sorted(diagnostics)


# --------------------------------------------------------------------------- YAML level


def test_syntax_errors_are_positioned() -> None:
    error = only_error(policy("mode: enforce: audit"))
    assert (error.code, error.location.line, error.location.col) == ("yaml-syntax", 6, 16)
    error = only_error("a: [1, 2\n")
    assert error.code == "yaml-syntax"
    assert "while parsing a flow sequence starting at 1:4" in error.message


def test_unquoted_ipv6_gets_a_hint() -> None:
    error = only_error(policy("network: {egress: {rules: [{action: deny, to: [::/0]}]}}"))
    assert 'quote IPv6 addresses: "::/0"' in error.message


def test_anchors_aliases_and_merge_keys_are_rejected() -> None:
    text = policy("""
        exec: {rules: [{action: deny, paths: &p [/x]}]}
        files: {rules: [{action: deny, access: [read], paths: *p}, {<<: {action: deny}}]}
    """)
    _, diagnostics = parse_text(text, "t.yaml")
    assert [(d.code, d.location.col) for d in diagnostics] == [
        ("yaml-anchor", position(text, "&p")[1]),
        ("yaml-alias", position(text, "*p")[1]),
        ("yaml-merge-key", position(text, "<<")[1]),
    ]


def test_a_document_with_only_a_yaml_level_error_yields_no_policy() -> None:
    # Anchors are reported while the document is composed, before its checks start.
    for spec in ["mode: &m audit", "mode: audit\nmode: audit", "mode: !!str audit\n<<: {}"]:
        policies, diagnostics = parse_text(policy(spec) + "---\n" + policy("{}", name="b"), "t")
        assert [p.name for p in policies] == ["b"], spec
        assert len(diagnostics) == 1


def test_an_alias_bomb_is_rejected_without_expanding() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    policies, diagnostics = parse_text("\n".join(lines) + "\n", "t.yaml")
    assert policies == []
    assert sum(d.code == "yaml-alias" for d in diagnostics) == 90


def test_tags_are_errors_and_never_construct_anything(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = policy(f'mode: !!python/object/apply:os.system ["touch {marker}"]')
    error = only_error(text)
    assert (error.code, error.location.line, error.location.col) == ("yaml-tag", 6, 9)
    assert "!!python/object/apply:os.system" in error.message
    assert not marker.exists()
    assert only_error(policy("mode: !!binary ZW5mb3JjZQ==")).code == "yaml-tag"
    assert valid(policy("mode: !!str audit")).mode is Mode.AUDIT


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    for text in ["[" * 100_000, "a:\n" + "".join("  " * i + "- \n" for i in range(2000)),
                 "{a: " * 5000]:
        error = only_error(text)
        assert error.code == "yaml-too-deep"


def test_control_characters_and_bad_encoding() -> None:
    error = only_error("a: b\nc: d\x01e\n")
    assert (error.code, error.location.line, error.location.col) == ("bad-character", 2, 5)
    assert "U+0001" in error.message


def test_crlf_and_byte_order_mark(tmp_path: Path) -> None:
    text = policy("mode: loud")
    (tmp_path / "crlf.yaml").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    result = load_policy_paths([str(tmp_path)])
    assert [(d.location.line, d.location.col) for d in result.diagnostics] == [(6, 9)]


def test_not_utf8_is_positioned(tmp_path: Path) -> None:
    (tmp_path / "latin1.yaml").write_bytes(b"a: 1\nbb: caf\xe9\n")
    result = load_policy_paths([str(tmp_path)])
    assert [(d.code, d.location.line, d.location.col) for d in result.diagnostics] == [
        ("bad-encoding", 2, 8)]


def test_empty_files_and_documents_are_warnings() -> None:
    for text in ["", "# nothing\n", "\n\n"]:
        policies, diagnostics = parse_text(text, "t.yaml")
        assert policies == []
        assert [(d.severity, d.code, d.location.line) for d in diagnostics] == [
            ("warning", "empty-file", 1)]
    _, diagnostics = parse_text("---\n---\n" + policy("{}"), "t.yaml")
    assert [(d.severity, d.code, d.location.line) for d in diagnostics] == [
        ("warning", "empty-document", 2)]


def test_too_many_errors_are_capped_per_file() -> None:
    paths = ", ".join(["rel"] * (MAX_ERRORS_PER_FILE + 500))
    _, diagnostics = parse_text(policy(f"exec: {{rules: [{{action: deny, paths: [{paths}]}}]}}"),
                                "t.yaml")
    assert len(diagnostics) == MAX_ERRORS_PER_FILE + 1
    summary = [d for d in diagnostics if d.code == "too-many-errors"]
    assert len(summary) == 1
    assert "500 more error(s)" in summary[0].message


# --------------------------------------------------------------------------- files


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_directory_walk(tmp_path: Path) -> None:
    root = tmp_path / "policies"
    write(root / "b.yaml", policy("{}", name="b"))
    write(root / "a.yml", policy("{}", name="a"))
    write(root / "sub" / "c.yaml", policy("{}", name="c"))
    write(root / "sub" / "deeper" / "d.yaml", policy("{}", name="d"))
    for skipped in [".hidden.yaml", ".git/x.yaml", "..data/x.yaml", ".#b.yaml", "b.yaml~",
                    "b.yaml.swp", "notes.txt", "b.yaml.bak", "B.YAML", "#b.yaml#"]:
        write(root / skipped, "garbage: [")
    result = load_policy_paths([str(root)])
    assert result.diagnostics == ()
    assert result.files == tuple(str(root / f) for f in
                                 ["a.yml", "b.yaml", "sub/c.yaml", "sub/deeper/d.yaml"])
    assert result.policy_set is not None
    assert [p.name for p in result.policy_set.policies] == ["a", "b", "c", "d"]


def test_an_explicit_file_is_always_read(tmp_path: Path) -> None:
    odd = write(tmp_path / ".policy.txt", policy("{}", name="odd"))
    result = load_policy_paths([str(odd)])
    assert result.policy_set is not None
    assert [p.name for p in result.policy_set.policies] == ["odd"]


def test_the_same_file_twice_is_read_once(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", policy("{}", name="a"))
    result = load_policy_paths([str(tmp_path), str(tmp_path / "a.yaml"),
                                str(tmp_path) + "/./a.yaml"])
    assert result.files == (str(tmp_path / "a.yaml"),)
    assert result.errors == ()


def test_symlinks(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside" / "x.yaml", policy("{}", name="linked-file"))
    write(tmp_path / "outside" / "sub" / "y.yaml", policy("{}", name="linked-dir"))
    root = tmp_path / "policies"
    root.mkdir()
    (root / "x.yaml").symlink_to(outside)
    (root / "dir").symlink_to(tmp_path / "outside" / "sub")  # not entered
    result = load_policy_paths([str(root)])
    assert result.policy_set is not None
    assert [p.name for p in result.policy_set.policies] == ["linked-file"]
    (root / "gone.yaml").symlink_to(tmp_path / "nowhere.yaml")
    result = load_policy_paths([str(root)])
    assert [(d.location.file, d.code, d.message) for d in result.diagnostics] == [
        (str(root / "gone.yaml"), "read-error", "broken symbolic link")]


def test_missing_paths_and_non_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    missing = tmp_path / "missing"
    result = load_policy_paths([str(missing), str(fifo)])
    assert result.policy_set is None
    assert [str(d) for d in result.diagnostics] == sorted([
        f"{missing}:1:1: error: no such file or directory",
        f"{fifo}:1:1: error: not a regular file",
    ])


def test_a_file_too_large(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_FILE_BYTES + "\n")
    result = load_policy_paths([str(big)])
    assert [d.code for d in result.errors] == ["file-too-large"]


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", policy("{}", name="same"))
    write(tmp_path / "b.yaml", "# leading comment\n" + policy("{}", name="same"))
    result = load_policy_paths([str(tmp_path)])
    assert result.policy_set is None
    assert [str(d) for d in result.diagnostics] == [
        f"{tmp_path}/b.yaml:5:9: error: duplicate policy name 'same': "
        f"first defined at {tmp_path}/a.yaml:4:9"]


def test_warnings_do_not_fail_the_load(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", policy("{}", name="a"))
    write(tmp_path / "empty.yaml", "")
    result = load_policy_paths([str(tmp_path)])
    assert result.errors == ()
    assert [d.code for d in result.diagnostics] == ["empty-file"]
    assert result.policy_set is not None
    assert len(result.files) == 2


def test_errors_of_all_files_sorted_by_file_line_col(tmp_path: Path) -> None:
    write(tmp_path / "b.yaml", policy("mode: x\nexec: {default: y}"))
    write(tmp_path / "a.yaml", policy("exec: {default: y}\nmode: x", name="q"))
    result = load_policy_paths([str(tmp_path / "b.yaml"), str(tmp_path / "a.yaml")])
    assert [(Path(d.location.file).name, d.location.line) for d in result.diagnostics] == [
        ("a.yaml", 6), ("a.yaml", 7), ("b.yaml", 6), ("b.yaml", 7)]
    assert result.files == (str(tmp_path / "b.yaml"), str(tmp_path / "a.yaml"))
