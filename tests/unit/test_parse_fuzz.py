"""Property tests: whatever the text, the parser returns policies or positioned diagnostics.

Four sources of input: structures of random YAML values planted at the policy's
keys, valid documents mutated as text (truncated, spliced, garbled), raw text and
raw bytes, and generated *valid* policies whose model must come back exactly.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import string
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import need

import guard.policy.yamlnodes
from guard.errors import Code, Diagnostic, Stage
from guard.policy.model import Access, Action, Default, Protocol
from guard.policy.parse import load_policy_paths, parse_text

CHECK_CODES = {code.value for code in Code if code.stage is Stage.CHECK}
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
VALID_TEXTS = sorted(p.read_text() for p in (FIXTURES / "valid").rglob("*.y*ml")
                     if not any(part.startswith(".") for part in p.parts[-3:]))
DESIGN = yaml.safe_load((FIXTURES / "valid" / "design-example.yaml").read_text())
# Generating text is most of these tests' time: dump with libyaml when there is one.
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
BREAKS = re.compile("\r\n|[\n\r\x85\u2028\u2029]")  # PyYAML's line breaks

# Modest by default so the unit layer stays fast; GUARD_FUZZ_EXAMPLES=5000 for a deep run.
EXAMPLES = int(os.environ.get("GUARD_FUZZ_EXAMPLES", "200"))
SETTINGS = settings(deadline=None, max_examples=EXAMPLES,
                    suppress_health_check=[HealthCheck.too_slow])
# For the tests whose examples are costly to generate (nested structures, whole policies).
HEAVY = settings(SETTINGS, max_examples=max(1, EXAMPLES // 2))

WORDS = [
    "apiVersion", "kind", "metadata", "name", "description", "spec", "mode", "scope",
    "cgroups", "units", "exec", "default", "rules", "action", "paths", "files", "access",
    "network", "egress", "to", "ports", "protocol", "guard/v1", "Policy", "enforce", "audit",
    "allow", "deny", "read", "write", "exec", "tcp", "udp", "any", "/", "/**", "**", "/tmp/**",
    "/usr/bin/curl", "/a/../b", "rel/path", "10.0.0.0/8", "10.0.0.1/8", "::/0",
    "::ffff:10.0.0.0/104", "80", "1-2", "2-1", "0", "nginx.service", "x.timer",
    "/system.slice", "<<", "=", "~", "",
]
YAML_CHARS = "-:{}[],&*!|>'\"%@`#?\n\t .0123456789abc/\\"


# --------------------------------------------------------------------------- invariants


def lines_of(text: str) -> list[str]:
    """The text's lines as PyYAML counts them; an error may sit just past the last one."""
    return BREAKS.split(text)


def assert_well_formed(text: str, filename: str, policies: list[Any],
                       diagnostics: list[Diagnostic]) -> None:
    lines = lines_of(text)
    for diagnostic in diagnostics:
        where = diagnostic.location
        assert where.file == filename
        assert diagnostic.code in CHECK_CODES, diagnostic
        assert diagnostic.severity == Code(diagnostic.code).severity, diagnostic
        assert 1 <= where.line <= len(lines), (diagnostic, len(lines))
        assert 1 <= where.col <= len(lines[where.line - 1]) + 1, (diagnostic,
                                                                  lines[where.line - 1])
        assert "\n" not in diagnostic.message
        assert len(diagnostic.message) < 1200
    assert diagnostics == sorted(diagnostics)
    if any(d.severity == "error" for d in diagnostics):
        # A document with an error yields no policy; a file with one yields fewer
        # policies than documents, never a half-validated one.
        names = [p.name for p in policies]
        assert len(names) == len(set(names)) or any(d.code == "duplicate-name"
                                                    for d in diagnostics)


def check(text: str, libyaml: bool) -> None:
    """Parse with the chosen YAML parser (both, across examples) and check the invariants."""
    saved = guard.policy.yamlnodes.USE_LIBYAML
    guard.policy.yamlnodes.USE_LIBYAML = libyaml and yaml.__with_libyaml__
    try:
        policies, diagnostics = parse_text(text, "fuzz.yaml")
    finally:
        guard.policy.yamlnodes.USE_LIBYAML = saved
    assert_well_formed(text, "fuzz.yaml", policies, diagnostics)


# --------------------------------------------------------------------------- structures


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(), st.text(max_size=12), st.sampled_from(WORDS))
keys = st.one_of(st.sampled_from(WORDS), st.text(max_size=8), st.integers(-3, 3), st.booleans())
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=25)


@st.composite
def planted_documents(draw: st.DrawFn) -> str:
    """The design example with one subtree replaced, deleted or extended at random."""
    document = copy.deepcopy(DESIGN)
    node: Any = document
    while True:
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        if not children:
            break
        key, child = draw(st.sampled_from(children))
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child
            continue
        operation = draw(st.sampled_from(["replace", "delete", "add"]))
        if operation == "replace":
            node[key] = draw(values)
        elif operation == "delete":
            del node[key]
        elif isinstance(node, dict):
            node[draw(keys)] = draw(values)
        else:
            node.append(draw(values))
        break
    flow = draw(st.sampled_from([None, True, False]))
    return yaml.dump(document, Dumper=DUMPER, default_flow_style=flow,
                     allow_unicode=draw(st.booleans()), sort_keys=draw(st.booleans()))


@SETTINGS
@given(planted_documents(), st.booleans())
def test_planted_random_values(text: str, libyaml: bool) -> None:
    check(text, libyaml)


@HEAVY
@given(st.dictionaries(keys, values, max_size=6), st.booleans())
def test_random_documents(document: dict[Any, Any], libyaml: bool) -> None:
    check(yaml.dump(document, Dumper=DUMPER), libyaml)


@HEAVY
@given(st.lists(st.dictionaries(keys, values, max_size=5), min_size=1, max_size=3), st.booleans())
def test_random_multi_documents(documents: list[dict[Any, Any]], libyaml: bool) -> None:
    check(yaml.dump_all(documents, Dumper=DUMPER), libyaml)


# --------------------------------------------------------------------------- text


@st.composite
def mutated_texts(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(VALID_TEXTS))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        operation = draw(st.sampled_from(
            ["truncate", "insert", "delete", "replace", "duplicate-line", "delete-line"]))
        if operation == "truncate":
            text = text[:at]
        elif operation == "insert":
            text = text[:at] + draw(st.text(alphabet=YAML_CHARS, max_size=6)) + text[at:]
        elif operation == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
        elif operation == "replace" and at < len(text):
            text = text[:at] + draw(st.characters()) + text[at + 1:]
        elif operation in ("duplicate-line", "delete-line"):
            lines = text.split("\n")
            index = min(at, len(lines) - 1)
            if operation == "duplicate-line":
                lines.insert(index, lines[index])
            else:
                del lines[index]
            text = "\n".join(lines)
    return text


@SETTINGS
@given(mutated_texts(), st.booleans())
def test_mutated_valid_documents(text: str, libyaml: bool) -> None:
    check(text, libyaml)


@SETTINGS
@given(st.text(alphabet=YAML_CHARS, max_size=120), st.booleans())
def test_yaml_shaped_text(text: str, libyaml: bool) -> None:
    check(text, libyaml)


@SETTINGS
@given(st.text(max_size=120), st.booleans())
def test_any_text(text: str, libyaml: bool) -> None:
    check(text, libyaml)


@settings(SETTINGS, max_examples=max(1, EXAMPLES * 3 // 10))
@given(st.binary(max_size=200) | mutated_texts().map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_in_a_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.yaml"
        path.write_bytes(data)
        result = load_policy_paths([str(path)])
    text = data.decode("utf-8", errors="replace")
    lines = max(len(lines_of(text)), data.count(b"\n") + 1)
    for diagnostic in result.diagnostics:
        assert diagnostic.location.file == str(path)
        assert 1 <= diagnostic.location.line <= lines
        assert diagnostic.location.col >= 1
    assert (result.policy_set is None) == bool(result.errors)


# --------------------------------------------------------------------------- round trip

component = st.text(alphabet=string.ascii_letters + string.digits + "-_.@+ é", min_size=1,
                    max_size=8).filter(lambda c: c not in (".", ".."))
names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)


@st.composite
def path_patterns(draw: st.DrawFn) -> tuple[str, str, bool]:
    """(written, path, subtree)"""
    path = "/" + "/".join(draw(st.lists(component, max_size=4)))
    if draw(st.booleans()):
        return ("/**" if path == "/" else path + "/**"), path, True
    return path, path, False


@st.composite
def networks(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    address = draw(st.ip_addresses())
    prefix = draw(st.integers(0, address.max_prefixlen))
    network = ipaddress.ip_network((address, prefix), strict=False)
    if isinstance(network, ipaddress.IPv6Network) and (
            network.network_address.ipv4_mapped is not None
            or network.overlaps(ipaddress.ip_network("::ffff:0:0/96"))):
        return ipaddress.ip_network("2001:db8::/32")  # mapped networks: see test_parse
    return network


ports = st.integers(1, 65535).flatmap(
    lambda first: st.one_of(st.just((first, first)),
                            st.integers(first, 65535).map(lambda last: (first, last))))


def net_rule(action: Action, nets: list[Any], port_list: list[tuple[int, int]],
             protocol: Protocol) -> dict[str, Any]:
    rule: dict[str, Any] = {"action": action.value, "to": [str(n) for n in nets],
                            "protocol": protocol.value}
    if port_list:  # omitted means any port; an empty list is an error
        rule["ports"] = [first if first == last else f"{first}-{last}"
                         for first, last in port_list]
    return rule


def dedupe(items: list[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


@HEAVY
@given(st.data())
def test_generated_valid_policies_come_back_exactly(data: st.DataObject) -> None:
    name = data.draw(names)
    exec_rules = data.draw(st.lists(st.tuples(st.sampled_from(list(Action)),
                                              st.lists(path_patterns(), min_size=1, max_size=3)),
                                    max_size=3))
    file_rules = data.draw(st.lists(st.tuples(
        st.sampled_from(list(Action)), st.sets(st.sampled_from(list(Access)), min_size=1),
        st.lists(path_patterns(), min_size=1, max_size=3)), max_size=3))
    net_rules = data.draw(st.lists(st.tuples(
        st.sampled_from(list(Action)), st.lists(networks(), min_size=1, max_size=3),
        st.lists(ports, max_size=3), st.sampled_from(list(Protocol))), max_size=3))
    exec_default = data.draw(st.sampled_from(list(Default)))
    egress_default = data.draw(st.sampled_from(list(Default)))
    document = {
        "apiVersion": "guard/v1", "kind": "Policy", "metadata": {"name": name},
        "spec": {
            "exec": {"default": exec_default.value, "rules": [
                {"action": a.value, "paths": [w for w, _, _ in ps]} for a, ps in exec_rules]},
            "files": {"rules": [
                {"action": a.value, "access": sorted(x.value for x in acc),
                 "paths": [w for w, _, _ in ps]} for a, acc, ps in file_rules]},
            "network": {"egress": {"default": egress_default.value,
                                   "rules": [net_rule(*rule) for rule in net_rules]}},
        },
    }
    flow = data.draw(st.sampled_from([None, False]))
    text = yaml.dump(document, Dumper=DUMPER, default_flow_style=flow,
                     allow_unicode=data.draw(st.booleans()))
    policies, diagnostics = parse_text(text, "gen.yaml")
    assert diagnostics == [], (text, diagnostics)
    (got,) = policies
    assert got.name == name
    assert got.exec is not None and got.files is not None and got.egress is not None
    assert got.exec.default is exec_default and got.egress.default is egress_default
    assert [(r.action, [(p.path, p.subtree) for p in r.paths]) for r in got.exec.rules] == [
        (a, dedupe([(p, s) for _, p, s in ps])) for a, ps in exec_rules]
    assert [(r.action, r.access, [(p.path, p.subtree) for p in r.paths])
            for r in got.files.rules] == [
        (a, frozenset(acc), dedupe([(p, s) for _, p, s in ps])) for a, acc, ps in file_rules]
    assert [(r.action, list(r.to), [(p.first, p.last) for p in r.ports], r.protocol)
            for r in got.egress.rules] == [
        (a, dedupe(nets), dedupe(pl), proto) for a, nets, pl, proto in net_rules]


# --------------------------------------------------------------------------- backends


def parse_with(text: str, libyaml: bool) -> tuple[list[Any], list[Diagnostic]]:
    saved = guard.policy.yamlnodes.USE_LIBYAML
    guard.policy.yamlnodes.USE_LIBYAML = libyaml
    try:
        return parse_text(text, "diff.yaml")
    finally:
        guard.policy.yamlnodes.USE_LIBYAML = saved


@SETTINGS
@given(mutated_texts() | planted_documents())
def test_both_yaml_parsers_agree_on_well_formed_yaml(text: str) -> None:
    # The parsers word syntax errors differently, and do not always agree on what
    # is one: "{access:[read]}" in a flow mapping is a syntax error to libyaml and a
    # key "access:[read" to the pure-Python scanner. On text both accept, everything
    # guard reports (and builds) must be the same.
    need(yaml.__with_libyaml__, "PyYAML without libyaml: nothing to compare")
    python = parse_with(text, libyaml=False)
    c = parse_with(text, libyaml=True)
    syntax = any(d.code == "yaml-syntax" for d in (*python[1], *c[1]))
    if syntax or "\\u" in text or "\\U" in text:
        return
    assert c == python
