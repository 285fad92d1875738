"""Policy tests: ``kind: PolicyTest`` documents kept beside the policies, and running them.

A test document lists cases; each names an actor (a cgroup or a systemd unit),
one operation (exec a path, open a path for read or write, connect to an
address and port over a protocol) and the verdict expected, optionally the
rule expected to decide. ``guard test`` compiles the policies found in the same
paths and decides every case with the evaluator the daemon's answers are
tested against (guard.policy.evaluate), by the path as written: the same
answer on every machine. Documents are read with the policy parser's machinery
(guard.policy.yamlnodes), so a bad test gets a positioned diagnostic like a bad
policy. docs/policy.md ("Policy tests") describes the format for users.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from yaml.nodes import Node, ScalarNode

from guard.errors import Code, Diagnostic, Location
from guard.policy.evaluate import Explanation, decide_connect, decide_exec, decide_open
from guard.policy.model import Access, Protocol
from guard.policy.parse import (
    LoadResult,
    _cgroup_path,
    _check_name,
    _parse_path,
    _unit_name,
    load_policy_paths,
)
from guard.policy.plan import Plan
from guard.policy.text import quoted as _q
from guard.policy.text import verdict_word
from guard.policy.units import resolve_unit
from guard.policy.yamlnodes import (
    TAG_INT,
    Bad,
    Context,
    choice,
    converted,
    mapping_fields,
    node_list,
    node_string,
    wrong_type,
)

JSON_VERSION = 1
RULE_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?/(exec|files|egress)\.(default|rules\[\d+\])")


class Expect(StrEnum):
    """The verdicts a case can expect: text.verdict_word of each Verdict, as explain
    prints them (a unit test proves the two lists are the same)."""

    ALLOW = "allow"
    AUDIT = "audit"
    WOULD_DENY = "would-deny"
    DENY = "deny"


class Operation(StrEnum):
    EXEC = "exec"
    OPEN = "open"
    CONNECT = "connect"


@dataclass(frozen=True)
class Case:
    """One question and its expected answer."""

    name: str
    cgroup: str | None  # the actor: a cgroup, or
    unit: str | None  # a unit (neither: the root cgroup)
    operation: Operation
    target: str  # the path, or the address
    access: Access | None  # open
    port: int | None  # connect
    protocol: Protocol | None  # connect
    expect: Expect
    rule: str | None  # "POLICY/SECTION.rules[N]" or "POLICY/SECTION.default"
    location: Location


@dataclass(frozen=True)
class PolicyTest:
    """One test document: its name (unique among tests) and its cases."""

    name: str
    description: str
    cases: tuple[Case, ...]


@dataclass(frozen=True)
class CaseResult:
    test: str
    case: Case
    verdict: str | None  # what the evaluator answered; None when the actor cannot be resolved
    rule: str | None  # the deciding rule's label; None: no rule
    rule_location: Location | None
    problem: str | None  # why it failed; None: passed

    @property
    def passed(self) -> bool:
        return self.problem is None


# --------------------------------------------------------------------------- reading

_SPEC_KEYS = ("cases",)
_CASE_KEYS = ("name", "actor", "exec", "open", "connect", "expect", "rule")
_ACTOR_KEYS = ("cgroup", "unit")
_OPEN_KEYS = ("path", "access")
_CONNECT_KEYS = ("to", "port", "protocol")


def read_test(ctx: Context, fields: Mapping[str, Node]) -> tuple[str | None, Node | None, object]:
    """A PolicyTest document's name, the name's node and the test (parse.TestReader)."""
    name, name_node, description = None, None, ""
    meta = mapping_fields(ctx, fields["metadata"], "metadata", ("name",),
                          ("name", "description")) if "metadata" in fields else None
    if meta is not None:
        if "name" in meta:
            name_node = meta["name"]
            name = converted(ctx, name_node, "metadata.name", _check_name)
        if "description" in meta:
            description = node_string(ctx, meta["description"], "metadata.description") or ""
    cases: list[Case] = []
    spec = mapping_fields(ctx, fields["spec"], "spec", _SPEC_KEYS, _SPEC_KEYS) \
        if "spec" in fields else None
    if spec is not None and "cases" in spec:
        items = node_list(ctx, spec["cases"], "spec.cases", empty="a test needs a case")
        for index, item in enumerate(items):
            case = _read_case(ctx, item, f"spec.cases[{index}]", index)
            if case is not None:
                cases.append(case)
    test = PolicyTest(name, description, tuple(cases)) if name is not None else None
    return name, name_node, test


def _read_case(ctx: Context, node: Node, where: str, index: int) -> Case | None:
    fields = mapping_fields(ctx, node, where, ("expect",), _CASE_KEYS)
    if fields is None:
        return None
    name = node_string(ctx, fields["name"], f"{where}.name") if "name" in fields else None
    cgroup, unit = None, None
    if "actor" in fields:
        actor = mapping_fields(ctx, fields["actor"], f"{where}.actor", (), _ACTOR_KEYS)
        if actor is not None and len(actor) != 1:
            ctx.error(fields["actor"], Code.WRONG_TYPE,
                      f"{where}.actor names one of cgroup or unit")
        elif actor is not None and "cgroup" in actor:
            cgroup = converted(ctx, actor["cgroup"], f"{where}.actor.cgroup", _cgroup_path)
        elif actor is not None:
            unit = converted(ctx, actor["unit"], f"{where}.actor.unit", _unit_name)
    operations = [op for op in Operation if op.value in fields]
    if not operations:
        ctx.error(node, Code.MISSING_KEY,
                  f"{where} needs an operation: one of the keys exec, open or connect")
        return None
    if len(operations) > 1:
        keys = [key for key, _ in node.value if isinstance(key, ScalarNode)
                and key.value in {op.value for op in operations}]
        ctx.error(keys[1], Code.UNKNOWN_KEY,
                  f"{where} already has {keys[0].value}: a case asks one question, "
                  f"so it has one of exec, open or connect")
        return None
    operation = operations[0]
    body = fields[operation.value]
    target: str | None = None
    access: Access | None = None
    port: int | None = None
    protocol: Protocol | None = None
    if operation is Operation.EXEC:
        target = converted(ctx, body, f"{where}.exec", _exact_path)
    elif operation is Operation.OPEN:
        opened = mapping_fields(ctx, body, f"{where}.open", _OPEN_KEYS, _OPEN_KEYS)
        if opened is not None and len(opened) == 2:
            target = converted(ctx, opened["path"], f"{where}.open.path", _exact_path)
            access = choice(ctx, opened["access"], f"{where}.open.access", Access)
    else:
        sent = mapping_fields(ctx, body, f"{where}.connect", ("to", "port"), _CONNECT_KEYS)
        if sent is not None and "to" in sent and "port" in sent:
            target = converted(ctx, sent["to"], f"{where}.connect.to", _address)
            port = _port(ctx, sent["port"], f"{where}.connect.port")
            protocol = choice(ctx, sent["protocol"], f"{where}.connect.protocol", Protocol) \
                if "protocol" in sent else Protocol.TCP
    expect = choice(ctx, fields["expect"], f"{where}.expect", Expect) \
        if "expect" in fields else None
    rule = converted(ctx, fields["rule"], f"{where}.rule", _rule_label) \
        if "rule" in fields else None
    complete = target is not None and expect is not None and (
        operation is not Operation.OPEN or access is not None) and (
        operation is not Operation.CONNECT or (port is not None and protocol is not None))
    if not complete or expect is None or target is None:
        return None
    return Case(name or f"case {index}", cgroup, unit, operation, target, access, port,
                protocol, expect, rule, ctx.location(node))


def _exact_path(text: str) -> str:
    path, _ = _parse_path(text, subtree_ok=False)
    return path


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise Bad(Code.BAD_NETWORK, f"{_q(text)} is not an IP address") from None


def _port(ctx: Context, node: Node, where: str) -> int | None:
    if not isinstance(node, ScalarNode) or node.tag != TAG_INT or not node.value.isdigit():
        wrong_type(ctx, node, where, "a port number")
        return None
    port = int(node.value)
    if not 1 <= port <= 65535:
        ctx.error(node, Code.BAD_PORT, f"port {port} is out of range: ports are 1..65535")
        return None
    return port


def _rule_label(text: str) -> str:
    if not RULE_RE.fullmatch(text):
        raise Bad(Code.BAD_VALUE, f"invalid rule {_q(text)}: write POLICY/SECTION.rules[N] or "
                                  f"POLICY/SECTION.default (SECTION: exec, files or egress), "
                                  f"as guard explain names rules")
    return text


def load_tests(paths: Sequence[str], *, stdin: bytes | None = None) -> LoadResult:
    """Policies and test documents under ``paths``, every problem of both reported."""
    return load_policy_paths(paths, stdin=stdin, tests=read_test)


def tests_of(result: LoadResult) -> tuple[PolicyTest, ...]:
    return tuple(t for t in result.tests if isinstance(t, PolicyTest))


# --------------------------------------------------------------------------- running


def decide(plan: Plan, case: Case, unit_cgroups: Mapping[str, str]) -> Explanation:
    """The evaluator's answer to a case; ValueError when its actor cannot be placed."""
    cgroup = resolve_unit(case.unit, unit_cgroups) if case.unit else case.cgroup or "/"
    if case.operation is Operation.EXEC:
        return decide_exec(plan, cgroup, case.target)
    if case.operation is Operation.OPEN:
        assert case.access is not None
        return decide_open(plan, cgroup, case.target, case.access.value)
    assert case.port is not None and case.protocol is not None
    return decide_connect(plan, cgroup, case.target, case.port, case.protocol.value)


def run_tests(plan: Plan, tests: Sequence[PolicyTest],
              unit_cgroups: Mapping[str, str] | None = None) -> list[CaseResult]:
    results: list[CaseResult] = []
    for test in tests:
        for case in test.cases:
            try:
                answer = decide(plan, case, unit_cgroups or {})
            except ValueError as error:
                results.append(CaseResult(test.name, case, None, None, None, str(error)))
                continue
            verdict = verdict_word(answer.verdict)
            label = answer.rule.label if answer.rule is not None else None
            problems = []
            if verdict != case.expect.value:
                problems.append(f"expected {case.expect.value}, got {verdict}")
            if case.rule is not None and label != case.rule:
                problems.append(f"expected {case.rule} to decide, got {label or 'no rule'}")
            results.append(CaseResult(
                test.name, case, verdict, label,
                answer.rule.location if answer.rule is not None else None,
                "; ".join(problems) or None))
    return results


def describe(case: Case) -> str:
    """``exec /usr/bin/curl from unit nginx.service``."""
    if case.operation is Operation.EXEC:
        what = f"exec {case.target}"
    elif case.operation is Operation.OPEN:
        what = f"open {case.target} for {case.access}"
    else:
        what = f"connect {case.target} {case.port}/{case.protocol}"
    actor = f"unit {case.unit}" if case.unit else f"cgroup {case.cgroup or '/'}"
    return f"{what} from {actor}"


def report(results: Sequence[CaseResult]) -> str:
    """The readable report: one line per case, the failures explained, a summary."""
    out: list[str] = []
    for result in results:
        case = result.case
        head = f"{'ok  ' if result.passed else 'FAIL'} {result.test}: {case.name}"
        out.append(f"{head} ({case.location})")
        if not result.passed:
            out.append(f"     {describe(case)}: {result.problem}")
            if result.rule is not None:
                out.append(f"     decided by {result.rule} ({result.rule_location})")
    failed = sum(not r.passed for r in results)
    out.append(f"guard test: {len(results) - failed} passed, {failed} failed")
    return "\n".join(out) + "\n"


def report_json(results: Sequence[CaseResult], diagnostics: Sequence[Diagnostic]) -> str:
    """Stable fields for tools: see docs/policy.md ("Policy tests")."""
    cases = []
    for result in results:
        case = result.case
        cases.append({
            "test": result.test, "case": case.name, "file": case.location.file,
            "line": case.location.line, "col": case.location.col,
            "operation": describe(case), "expect": case.expect.value, "expect_rule": case.rule,
            "verdict": result.verdict, "rule": result.rule, "passed": result.passed,
            "problem": result.problem,
        })
    failed = sum(not r.passed for r in results)
    return json.dumps({
        "version": JSON_VERSION, "passed": len(results) - failed, "failed": failed,
        "cases": cases,
        "diagnostics": [d.to_dict() for d in diagnostics],
    }, indent=2) + "\n"
