"""The evaluator: a table of decisions, rendered explanations, and the spec check.

The spec check compares the compiled plan + evaluator against a brute-force
oracle written straight from the combination rule (guard/policy/plan.py): take every
rule of every policy covering the cgroup, keep those that match, pick the most
specific, break ties by verdict strength then rule id. Any disagreement is a
compiler or evaluator bug.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from policy_builders import Port, policy, policy_set

from guard.errors import PolicyError
from guard.policy.compile import compile_policies
from guard.policy.evaluate import (
    decide_connect,
    decide_exec,
    decide_open,
    normalize_path,
    ruleset_for,
)
from guard.policy.model import (
    Access,
    Action,
    Default,
    Mode,
    PathPattern,
    Policy,
    PolicySet,
    Protocol,
)
from guard.policy.plan import Plan, Verdict
from guard.policy.units import unit_cgroup

A, W, D, WD = Verdict.ALLOW, Verdict.AUDIT, Verdict.DENY, Verdict.WOULD_DENY
NGINX = "/system.slice/nginx.service"


def realistic() -> PolicySet:
    return policy_set(
        policy("base", exec_default="allow",
               exec_rules=[("deny", ["/tmp/**", "/dev/shm/**"]), ("audit", ["/usr/bin/sudo"])],
               files=[("audit", "rw", ["/etc/shadow", "/etc/ssh/**"]),
                      ("deny", "w", ["/etc/**"])],
               egress_default="allow",
               egress=[("deny", ["0.0.0.0/0", "::/0"], [25, 465, 587], "tcp")]),
        policy("web-tier", units=["nginx.service"], exec_default="deny",
               exec_rules=[("allow", ["/usr/sbin/nginx", "/usr/lib/**", "/usr/bin/**"]),
                           ("deny", ["/usr/bin/curl", "/usr/bin/wget"])],
               egress_default="deny",
               egress=[("allow", ["10.0.0.0/8"], [443, 80], "tcp"),
                       ("allow", ["10.0.0.53/32"], [53], "udp"),
                       ("audit", ["fd00::/8"], [], "any")]),
        policy("ci", mode="audit", cgroups=["/ci.slice"], exec_default="deny",
               exec_rules=[("allow", ["/usr/bin/**", "/tmp/ci/**"])],
               files=[("deny", "rw", ["/home/**"])],
               egress_default="deny", egress=[("allow", ["192.168.0.0/16"], [], "any")]),
        policy("lab", cgroups=["/lab"], exec_default="allow",
               exec_rules=[("deny", ["/opt/tool"])]),
        policy("lab-inner", cgroups=["/lab/inner"], exec_default="allow",
               exec_rules=[("allow", ["/opt/tool", "/opt/**"])]),
    )


PLAN = compile_policies(realistic())

CASES: list[tuple[str, str, str, str, Verdict, str | None]] = [
    # (cgroup, operation, target, extra, verdict, deciding rule)
    # exec, host scope
    ("/", "exec", "/usr/bin/ls", "", A, "base/exec.default"),
    ("/user.slice/user-1000.slice", "exec", "/tmp/x", "", D, "base/exec.rules[0]"),
    ("/", "exec", "/dev/shm/a/b", "", D, "base/exec.rules[0]"),
    ("/", "exec", "/tmp", "", A, "base/exec.default"),  # /tmp/** is below /tmp, not /tmp
    ("/", "exec", "/tmpfoo", "", A, "base/exec.default"),
    ("/", "exec", "/usr/bin/sudo", "", W, "base/exec.rules[1]"),
    ("/", "exec", "/usr/bin/../../tmp/x", "", D, "base/exec.rules[0]"),  # normalized
    # exec, a unit's scope: base + web-tier
    (NGINX, "exec", "/usr/sbin/nginx", "", A, "web-tier/exec.rules[0]"),
    (NGINX, "exec", "/usr/bin/curl", "", D, "web-tier/exec.rules[1]"),  # exact beats subtree
    (NGINX, "exec", "/usr/bin/env", "", A, "web-tier/exec.rules[0]"),
    (NGINX + "/worker", "exec", "/usr/bin/wget", "", D, "web-tier/exec.rules[1]"),
    (NGINX, "exec", "/bin/sh", "", D, "web-tier/exec.default"),  # default deny beats allow
    (NGINX, "exec", "/tmp/payload", "", D, "base/exec.rules[0]"),
    (NGINX, "exec", "/usr/bin/sudo", "", W, "base/exec.rules[1]"),  # exact audit over subtree
    (NGINX + "x", "exec", "/bin/sh", "", A, "base/exec.default"),  # a sibling, not inside
    # exec, an audit-mode policy
    ("/ci.slice", "exec", "/usr/local/bin/x", "", WD, "ci/exec.default"),
    ("/ci.slice/job-1", "exec", "/usr/bin/make", "", A, "base/exec.default"),  # E decides
    ("/ci.slice", "exec", "/tmp/x", "", D, "base/exec.rules[0]"),  # enforce deny still denies
    ("/ci.slice", "exec", "/tmp/ci/build", "", D, "base/exec.rules[0]"),  # a trial never opens
    # exec, nested scopes: the deepest scope's ruleset holds both policies
    ("/lab", "exec", "/opt/tool", "", D, "lab/exec.rules[0]"),
    ("/lab/inner", "exec", "/opt/tool", "", D, "lab/exec.rules[0]"),  # tie across policies
    ("/lab/inner/x", "exec", "/opt/other", "", A, "lab-inner/exec.rules[0]"),
    ("/lab", "exec", "/opt/other", "", A, "base/exec.default"),  # all three allow: lowest id
    # open
    ("/", "open", "/etc/shadow", "read", W, "base/files.rules[0]"),
    ("/", "open", "/etc/shadow", "write", W, "base/files.rules[0]"),
    ("/", "open", "/etc/passwd", "write", D, "base/files.rules[1]"),
    ("/", "open", "/etc/passwd", "read", A, None),  # files have no default
    ("/", "open", "/etc/ssh/sshd_config", "write", W, "base/files.rules[0]"),
    ("/ci.slice", "open", "/home/u/.ssh/id_rsa", "read", WD, "ci/files.rules[0]"),
    ("/", "open", "/home/u/.ssh/id_rsa", "read", A, None),
    # connect
    ("/", "connect", "203.0.113.9", "25/tcp", D, "base/egress.rules[0]"),
    ("/", "connect", "203.0.113.9", "25/udp", A, "base/egress.default"),
    ("/", "connect", "2001:db8::1", "587/tcp", D, "base/egress.rules[0]"),
    ("/", "connect", "::ffff:203.0.113.9", "465/tcp", D, "base/egress.rules[0]"),
    (NGINX, "connect", "10.1.2.3", "443/tcp", A, "web-tier/egress.rules[0]"),
    (NGINX, "connect", "10.1.2.3", "25/tcp", D, "base/egress.rules[0]"),
    (NGINX, "connect", "10.1.2.3", "8080/tcp", D, "web-tier/egress.default"),
    (NGINX, "connect", "10.0.0.53", "53/udp", A, "web-tier/egress.rules[1]"),
    (NGINX, "connect", "10.0.0.53", "443/tcp", A, "web-tier/egress.rules[0]"),  # inherited
    (NGINX, "connect", "10.0.0.54", "53/udp", D, "web-tier/egress.default"),
    (NGINX, "connect", "fd00::1", "5353/udp", W, "web-tier/egress.rules[2]"),
    (NGINX, "connect", "::ffff:10.9.9.9", "80/tcp", A, "web-tier/egress.rules[0]"),
    ("/ci.slice", "connect", "192.168.1.1", "22/tcp", A, "base/egress.default"),
    ("/ci.slice", "connect", "192.168.1.1", "25/tcp", D, "base/egress.rules[0]"),
    ("/ci.slice", "connect", "8.8.8.8", "53/udp", WD, "ci/egress.default"),
    ("/lab", "connect", "8.8.8.8", "25/tcp", D, "base/egress.rules[0]"),
]


def decide(plan: Plan, cgroup: str, operation: str, target: str, extra: str):  # type: ignore[no-untyped-def]
    if operation == "exec":
        return decide_exec(plan, cgroup, target)
    if operation == "open":
        return decide_open(plan, cgroup, target, extra)
    port, proto = extra.split("/")
    return decide_connect(plan, cgroup, target, int(port), proto)


@pytest.mark.parametrize(("cgroup", "operation", "target", "extra", "verdict", "rule"), CASES)
def test_decision_table(cgroup: str, operation: str, target: str, extra: str, verdict: Verdict,
                        rule: str | None) -> None:
    explanation = decide(PLAN, cgroup, operation, target, extra)
    assert (explanation.verdict, explanation.rule and explanation.rule.label) == (verdict, rule)


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 30


# --- scope lookup --------------------------------------------------------------


def test_ruleset_for_picks_the_deepest_scope() -> None:
    found = ruleset_for(PLAN, "/lab/inner/deeper")
    assert found is not None
    ruleset, scope = found
    assert scope.cgroup == "/lab/inner"
    assert ruleset.policies == ("base", "lab", "lab-inner")
    plan = compile_policies(policy_set(policy("only", cgroups=["/a/b"])))
    assert ruleset_for(plan, "/a/bc") is None
    assert ruleset_for(plan, "/a") is None


# --- explanations --------------------------------------------------------------


def test_render_exact_beats_subtree() -> None:
    text = decide_exec(PLAN, NGINX, "/usr/bin/curl").render()
    assert text.splitlines() == [
        f"deny: exec /usr/bin/curl from {NGINX}",
        "  decided by web-tier/exec.rules[1] (web-tier.yaml:102:9): deny /usr/bin/curl",
        "  why: exact path match; more specific than subtree /usr/bin/** "
        "(allow by web-tier/exec.rules[0] (web-tier.yaml:101:9))",
        f"  scope: {NGINX} -> ruleset 4 (policies: base, web-tier)",
        "  effect: blocked, and reported as an event",
    ]


def test_render_default_and_unscoped() -> None:
    text = decide_exec(PLAN, NGINX, "/bin/sh").render()
    assert "decided by web-tier/exec.default (web-tier.yaml:100:3): default deny" in text
    assert "the ruleset's default applied" in text
    plan = compile_policies(policy_set(policy("only", cgroups=["/a"], exec_default="deny")))
    explanation = decide_exec(plan, "/b", "/bin/sh")
    assert explanation.verdict is A and explanation.rule is None and explanation.ruleset is None
    assert "no policy covers /b (scope cgroups: /a)" in explanation.render()


def test_render_open_passes_over_entries_without_the_access() -> None:
    plan = compile_policies(policy_set(policy("f", files=[
        ("audit", "r", ["/etc/shadow"]), ("deny", "w", ["/etc/**"])])))
    explanation = decide_open(plan, "/", "/etc/shadow", "write")
    assert explanation.verdict is D and explanation.matched == "/etc/**"
    assert "passed over: /etc/shadow" in explanation.render()


def test_render_connect_inherited_line_and_mapped_address() -> None:
    explanation = decide_connect(PLAN, NGINX, "::ffff:10.0.0.53", 443, "tcp")
    text = explanation.render()
    assert explanation.verdict is A
    assert explanation.matched == "to 10.0.0.0/8 tcp port 443"
    assert "longest matching prefix 10.0.0.53/32" in text
    assert "inherited from the shorter prefix 10.0.0.0/8" in text
    assert "IPv4-mapped IPv6 address: decided as IPv4 10.0.0.53" in text
    assert "[" not in text.splitlines()[0]  # shown as the IPv4 it is


def test_render_connect_no_egress_rules() -> None:
    plan = compile_policies(policy_set(policy("x", exec_default="allow")))
    explanation = decide_connect(plan, "/", "10.0.0.1", 80, "tcp")
    assert explanation.verdict is A and explanation.rule is None
    assert "has an egress section, so it is allowed" in explanation.render()


@pytest.mark.parametrize(("raw", "normal"), [
    ("/a/./b//c/", "/a/b/c"), ("/..", "/"), ("/a/../b", "/b"), ("/", "/"),
])
def test_normalize_path(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


def test_bad_inputs_raise_value_error() -> None:
    with pytest.raises(ValueError):
        decide_exec(PLAN, "/", "relative/path")
    with pytest.raises(ValueError):
        decide_connect(PLAN, "/", "10.0.0.300", 1, "tcp")
    with pytest.raises(ValueError):
        decide_connect(PLAN, "/", "10.0.0.1", 70000, "tcp")
    with pytest.raises(ValueError):
        decide_open(PLAN, "/", "/etc/x", "exec")


# --- the spec check: a brute-force oracle from the semantics -------------------
#
# Written from plan.py's docstring without looking at the compiler: no rulesets,
# no tables, no merging. Rule ids run in (policy, section, index) order, so within
# one section "lowest rule id" is "smallest (policy name, index)".


@dataclass(frozen=True)
class Answer:
    verdict: Verdict
    label: str | None


def oracle_verdict(action: Action) -> Verdict:
    return {Action.ALLOW: A, Action.AUDIT: W, Action.DENY: D}[action]


def oracle_scopes(policies: PolicySet) -> dict[str, list[str]]:
    return {p.name: (["/"] if p.scope.whole_host else
                     [c.rstrip("/") or "/" for c in p.scope.cgroups]
                     + [unit_cgroup(u) for u in p.scope.units])
            for p in policies.policies}


def inside(scope: str, cgroup: str) -> bool:
    return scope == "/" or cgroup == scope or cgroup.startswith(scope + "/")


def oracle_covering(policies: PolicySet, cgroup: str) -> list[str] | None:
    """Names of the policies judging ``cgroup``, or None when no scope contains it."""
    scopes = oracle_scopes(policies)
    containing = [s for paths in scopes.values() for s in paths if inside(s, cgroup)]
    if not containing:
        return None
    deepest = max(containing, key=lambda s: 0 if s == "/" else s.count("/"))
    return [name for name, paths in scopes.items() if any(inside(s, deepest) for s in paths)]


Candidate = tuple[tuple[int, ...], Verdict, str, int, str]  # specificity, verdict, tie-break, label


def pick(candidates: list[Candidate]) -> Answer | None:
    """Most specific, then strongest, then lowest (policy, index)."""
    if not candidates:
        return None
    best = min(candidates, key=lambda c: (tuple(-x for x in c[0]), -c[1], c[2], c[3]))
    return Answer(best[1], best[4])


NOTHING = Answer(A, None)


def oracle_combine(enforced: Answer, trial: Answer) -> Answer:
    """Rule 5: E blocks; T only adds a report."""
    if enforced.verdict is D:
        return enforced
    if trial.verdict is D:
        return Answer(WD, trial.label)
    if enforced.verdict is W:
        return enforced
    if trial.verdict is W:
        return trial
    return enforced if enforced.label else trial


def layered(policies: PolicySet, names: list[str], layer_answer) -> Answer:  # type: ignore[no-untyped-def]
    """Ask one layer question of E (enforce-mode policies) and of T (all), and combine."""
    chosen = [p for p in policies.policies if p.name in names]
    enforced = layer_answer([p for p in chosen if p.mode is Mode.ENFORCE])
    return oracle_combine(enforced, layer_answer(chosen))


def oracle_default(members: list[Policy], section: str) -> Answer:
    candidates: list[Candidate] = []
    for p in members:
        part = p.exec if section == "exec" else p.egress
        if part is not None:
            action = Action.DENY if part.default is Default.DENY else Action.ALLOW
            candidates.append(((), oracle_verdict(action), p.name, -1,
                               f"{p.name}/{section}.default"))
    return pick(candidates) or NOTHING


def path_specificity(pat: PathPattern, path: str) -> tuple[int, int] | None:
    """(1, 0) for an exact match, (0, depth) for a subtree match, None for no match."""
    if not pat.subtree:
        return (1, 0) if pat.path == path else None
    if path != pat.path and (pat.path == "/" or path.startswith(pat.path + "/")):
        return (0, len([c for c in pat.path.split("/") if c]))
    return None


def oracle_exec(policies: PolicySet, cgroup: str, path: str) -> Answer:
    names = oracle_covering(policies, cgroup)
    if names is None:
        return NOTHING

    def layer(members: list[Policy]) -> Answer:
        candidates: list[Candidate] = []
        for p in members:
            for rule in p.exec.rules if p.exec else ():
                for pat in rule.paths:
                    specificity = path_specificity(pat, path)
                    if specificity is not None:
                        candidates.append((specificity, oracle_verdict(rule.action), p.name,
                                           rule.index, f"{p.name}/exec.rules[{rule.index}]"))
        return pick(candidates) or oracle_default(members, "exec")

    return layered(policies, names, layer)


def oracle_open(policies: PolicySet, cgroup: str, path: str, access: str) -> Answer:
    names = oracle_covering(policies, cgroup)
    if names is None:
        return NOTHING

    def layer(members: list[Policy]) -> Answer:
        candidates: list[Candidate] = []
        for p in members:
            for rule in p.files.rules if p.files else ():
                if Access(access) not in rule.access:
                    continue
                for pat in rule.paths:
                    specificity = path_specificity(pat, path)
                    if specificity is not None:
                        candidates.append((specificity, oracle_verdict(rule.action), p.name,
                                           rule.index, f"{p.name}/files.rules[{rule.index}]"))
        return pick(candidates) or NOTHING

    return layered(policies, names, layer)


def oracle_connect(policies: PolicySet, cgroup: str, address: str, port: int,
                   proto: str) -> Answer:
    names = oracle_covering(policies, cgroup)
    if names is None:
        return NOTHING
    addr = ipaddress.ip_address(address)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped

    def layer(members: list[Policy]) -> Answer:
        candidates: list[Candidate] = []
        for p in members:
            for rule in p.egress.rules if p.egress else ():
                if rule.protocol is not Protocol.ANY and rule.protocol.value != proto:
                    continue
                if rule.ports and not any(r.first <= port <= r.last for r in rule.ports):
                    continue
                for net in rule.to:
                    if net.version == addr.version and addr in net:
                        specificity = (net.prefixlen, int(bool(rule.ports)),
                                       int(rule.protocol is not Protocol.ANY))
                        candidates.append((specificity, oracle_verdict(rule.action), p.name,
                                           rule.index, f"{p.name}/egress.rules[{rule.index}]"))
        return pick(candidates) or oracle_default(members, "egress")

    return layered(policies, names, layer)


# --- random policy sets --------------------------------------------------------

CGROUPS = ["/a", "/a/b", "/a/bc", "/a/b/c", "/d"]
QUERY_CGROUPS = [*CGROUPS, "/", "/a/b/c/d", "/e", "/system.slice/x.service",
                 "/system.slice/x.service/sub", "/system.slice"]
PATHS = ["/usr", "/usr/bin", "/usr/bin/curl", "/usr/bin/cu", "/tmp", "/tmp/x"]
PATTERNS = ["/**", *PATHS, *(p + "/**" for p in PATHS)]
QUERY_PATHS = ["/", "/usr", "/usr/bin", "/usr/bin/curl", "/usr/bin/cu", "/usr/bin/curl/x",
               "/usr/bin/curls", "/tmp/x", "/tmp/x/y", "/etc/passwd"]
NETWORKS = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32",
            "192.168.0.0/16", "::/0", "2001:db8::/32", "2001:db8:1::/48", "fd00::/8",
            "::ffff:10.1.0.0/112"]
QUERY_ADDRESSES = ["10.1.2.3", "10.1.2.4", "10.2.0.1", "192.168.1.1", "8.8.8.8",
                   "::ffff:10.1.2.3", "2001:db8:1::1", "2001:db8:2::1", "fd00::1", "::1"]
PORT_RANGES: list[Port] = [22, 25, (20, 30), (1000, 2000), (0, 65535)]
QUERY_PORTS = [0, 22, 25, 26, 1500, 65535]

actions = st.sampled_from(["allow", "deny", "audit"])
exec_rules = st.lists(st.tuples(actions, st.lists(st.sampled_from(PATTERNS), min_size=1,
                                                  max_size=3)), max_size=4)
file_rules = st.lists(st.tuples(actions, st.sampled_from(["r", "w", "rw"]),
                                st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=3)),
                      max_size=4)
net_rules = st.lists(st.tuples(actions, st.lists(st.sampled_from(NETWORKS), min_size=1,
                                                 max_size=3),
                               st.lists(st.sampled_from(PORT_RANGES), max_size=2, unique=True),
                               st.sampled_from(["any", "tcp", "udp"])), max_size=3)


@st.composite
def policy_sets(draw: st.DrawFn) -> PolicySet:
    names = draw(st.lists(st.sampled_from(["p", "q", "r"]), min_size=1, max_size=3, unique=True))
    found = []
    for name in names:
        whole_host = draw(st.booleans())
        cgroups = [] if whole_host else draw(st.lists(st.sampled_from(CGROUPS), max_size=2))
        units = [] if whole_host else draw(st.lists(st.just("x.service"), max_size=1))
        if not whole_host and not cgroups and not units:
            cgroups = [draw(st.sampled_from(CGROUPS))]
        exec_spec = draw(exec_rules)
        file_spec = draw(file_rules)
        net_spec = draw(net_rules)
        found.append(policy(
            name, mode=draw(st.sampled_from(["enforce", "audit"])), cgroups=cgroups, units=units,
            exec_default=draw(st.sampled_from([None, "allow", "deny"])), exec_rules=exec_spec,
            files=draw(st.sampled_from([None, file_spec])),
            egress_default=draw(st.sampled_from([None, "allow", "deny"])), egress=net_spec,
        ))
    return policy_set(*found)


def compiled(policies: PolicySet) -> Plan:
    try:
        return compile_policies(policies)
    except PolicyError as error:  # random sets may exceed the port table limit: not a case
        assert all(d.code == "port-table-limit" for d in error.diagnostics)
        assume(False)
        raise


def answer(explanation) -> Answer:  # type: ignore[no-untyped-def]
    return Answer(explanation.verdict, explanation.rule and explanation.rule.label)


SPEC = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SPEC
@given(policy_sets(), st.lists(st.tuples(st.sampled_from(QUERY_CGROUPS),
                                         st.sampled_from(QUERY_PATHS)), min_size=1, max_size=8))
def test_exec_matches_the_oracle(policies: PolicySet, queries: list[tuple[str, str]]) -> None:
    plan = compiled(policies)
    for cgroup, path in queries:
        assert answer(decide_exec(plan, cgroup, path)) == oracle_exec(policies, cgroup, path), \
            (cgroup, path)


@SPEC
@given(policy_sets(), st.lists(st.tuples(st.sampled_from(QUERY_CGROUPS),
                                         st.sampled_from(QUERY_PATHS),
                                         st.sampled_from(["read", "write"])),
                               min_size=1, max_size=8))
def test_open_matches_the_oracle(policies: PolicySet,
                                 queries: list[tuple[str, str, str]]) -> None:
    plan = compiled(policies)
    for cgroup, path, access in queries:
        assert (answer(decide_open(plan, cgroup, path, access))
                == oracle_open(policies, cgroup, path, access)), (cgroup, path, access)


@SPEC
@given(policy_sets(), st.lists(st.tuples(st.sampled_from(QUERY_CGROUPS),
                                         st.sampled_from(QUERY_ADDRESSES),
                                         st.sampled_from(QUERY_PORTS),
                                         st.sampled_from(["tcp", "udp"])),
                               min_size=1, max_size=8))
def test_connect_matches_the_oracle(policies: PolicySet,
                                    queries: list[tuple[str, str, int, str]]) -> None:
    plan = compiled(policies)
    for cgroup, address, port, proto in queries:
        assert (answer(decide_connect(plan, cgroup, address, port, proto))
                == oracle_connect(policies, cgroup, address, port, proto)), \
            (cgroup, address, port, proto)


@SPEC
@given(policy_sets(), st.sampled_from(QUERY_CGROUPS),
       st.integers(0, 2**32 - 1), st.integers(0, 65535), st.sampled_from(["tcp", "udp"]))
def test_connect_matches_the_oracle_on_random_ipv4(policies: PolicySet, cgroup: str,
                                                   raw: int, port: int, proto: str) -> None:
    plan = compiled(policies)
    address = str(ipaddress.IPv4Address(raw))
    assert (answer(decide_connect(plan, cgroup, address, port, proto))
            == oracle_connect(policies, cgroup, address, port, proto))


def test_the_oracle_is_not_vacuous() -> None:
    """The oracle gives the answers the semantics say, so it cannot pass everything."""
    policies = policy_set(policy("p", exec_default="allow", exec_rules=[
        ("allow", ["/usr/**"]), ("deny", ["/usr/bin/**"])]))
    assert oracle_exec(policies, "/", "/usr/bin/curl") == Answer(D, "p/exec.rules[1]")
    assert oracle_exec(policies, "/", "/usr/lib/x") == Answer(A, "p/exec.rules[0]")
    assert oracle_exec(policies, "/", "/bin/sh") == Answer(A, "p/exec.default")
    trial = policy_set(
        policy("e", exec_default="deny", exec_rules=[("allow", ["/usr/**"])]),
        policy("t", mode="audit", exec_default="allow", exec_rules=[
            ("allow", ["/opt/x"]), ("deny", ["/usr/bin/**"])]))
    assert oracle_exec(trial, "/", "/opt/x") == Answer(D, "e/exec.default")
    assert oracle_exec(trial, "/", "/usr/bin/ls") == Answer(WD, "t/exec.rules[1]")
    assert oracle_exec(trial, "/", "/usr/lib/x") == Answer(A, "e/exec.rules[0]")


def test_an_audit_mode_policy_never_opens_what_enforcement_closes() -> None:
    """The flaw plan.py rule 5 fixes: a trial's more specific allow must not unblock."""
    plan = compile_policies(policy_set(
        policy("base", exec_default="allow", exec_rules=[("deny", ["/tmp/**"])]),
        policy("trial", mode="audit", exec_default="deny",
               exec_rules=[("allow", ["/tmp/build/**"])]),
        policy("svc", cgroups=["/svc"], egress_default="deny",
               egress=[("allow", ["10.0.0.0/8"], [443], "tcp")]),
        policy("svc-trial", cgroups=["/svc"], mode="audit", egress_default="allow",
               egress=[("allow", ["0.0.0.0/0"], [], "any"),
                       ("deny", ["10.1.0.0/16"], [443], "tcp")]),
    ))
    assert answer(decide_exec(plan, "/", "/tmp/build/x")) == Answer(D, "base/exec.rules[0]")
    assert answer(decide_exec(plan, "/", "/usr/bin/x")) == Answer(WD, "trial/exec.default")
    assert answer(decide_connect(plan, "/svc", "8.8.8.8", 53, "udp")) == \
        Answer(D, "svc/egress.default")
    assert answer(decide_connect(plan, "/svc", "10.1.1.1", 443, "tcp")) == \
        Answer(WD, "svc-trial/egress.rules[1]")
    assert answer(decide_connect(plan, "/svc", "10.2.1.1", 443, "tcp")) == \
        Answer(A, "svc/egress.rules[0]")
    assert answer(decide_connect(plan, "/svc", "10.1.1.1", 443, "udp")) == \
        Answer(D, "svc/egress.default")
