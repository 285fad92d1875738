"""The compiler: rule table, scopes, precedence, egress tables, limits, determinism.

Policies are built from the model directly (tests/unit/policy_builders.py);
golden files from YAML are in test_cli_compile_explain.py.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from policy_builders import NetSpec, Port, policy, policy_set

from guard.errors import PolicyError
from guard.layout import MAX_PORT_LINES
from guard.policy.compile import compile_policies, summarize
from guard.policy.evaluate import decide_connect, decide_exec
from guard.policy.model import Policy
from guard.policy.plan import Decision, Plan, PortMatch, Proto, Verdict
from guard.policy.units import cgroup_contains, check_unit_name, unit_cgroup

REPO = Path(__file__).resolve().parents[2]
A, W, D, WD = Verdict.ALLOW, Verdict.AUDIT, Verdict.DENY, Verdict.WOULD_DENY


def label(plan: Plan, rule_id: int) -> str:
    ref = plan.rule(rule_id)
    assert ref is not None
    return ref.label


def exec_table(plan: Plan, ruleset: int) -> dict[str, tuple[Verdict, str]]:
    return {
        (f"{e.path}/**" if e.subtree else e.path).replace("//**", "/**"):
            (e.decision.verdict, label(plan, e.decision.rule))
        for e in plan.exec if e.ruleset == ruleset
    }


def table_lines(plan: Plan, ruleset: int, network: str) -> list[tuple[str, int, int, str, str]]:
    entry = next(n for n in plan.net if n.ruleset == ruleset and n.network == network)
    table = next(t for t in plan.port_tables if t.id == entry.table)
    return [(line.proto.name, line.first, line.last, line.decision.verdict.name,
             label(plan, line.decision.rule)) for line in table.lines]


# --- rule table ----------------------------------------------------------------


def test_rule_ids_are_dense_in_policy_section_index_order() -> None:
    plan = compile_policies(policy_set(
        policy("zeta", exec_default="allow", exec_rules=[("deny", ["/a"])]),
        policy("alpha", exec_default="deny", exec_rules=[("allow", ["/b", "/c"])],
               files=[("audit", "r", ["/etc/shadow"])],
               egress_default="allow", egress=[("deny", ["10.0.0.0/8"], [], "any")]),
    ))
    assert [(r.id, r.label) for r in plan.rules] == [
        (1, "alpha/egress.default"),
        (2, "alpha/egress.rules[0]"),
        (3, "alpha/exec.default"),
        (4, "alpha/exec.rules[0]"),
        (5, "alpha/files.rules[0]"),
        (6, "zeta/exec.default"),
        (7, "zeta/exec.rules[0]"),
    ]
    assert str(plan.rules[3].location) == "alpha.yaml:101:9"
    assert str(plan.rules[2].location) == "alpha.yaml:100:3"  # a default points at its section
    # one rule, two paths: two entries, one rule
    assert [(e.path, e.decision.rule) for e in plan.exec if e.ruleset == 0] == [
        ("/a", 7), ("/b", 4), ("/c", 4)]


def test_no_sections_no_defaults() -> None:
    plan = compile_policies(policy_set(policy("empty")))
    assert plan.rules == ()
    assert plan.defaults[0].exec is None and plan.defaults[0].egress is None
    assert plan.exec == ()
    assert plan.files == ()
    assert plan.net == ()
    assert plan.port_tables == ()


# --- scope ---------------------------------------------------------------------


def test_scopes_nested_and_sibling_paths() -> None:
    plan = compile_policies(policy_set(
        policy("host"),
        policy("ab", cgroups=["/a/b"]),
        policy("abc", cgroups=["/a/bc"]),
        policy("deep", cgroups=["/a/b/c/"]),  # trailing slash normalized
    ))
    rulesets = {r.id: r.policies for r in plan.rulesets}
    scopes = {s.cgroup: rulesets[s.ruleset] for s in plan.scopes}
    assert scopes == {
        "/": ("host",),
        "/a/b": ("ab", "host"),
        "/a/b/c": ("ab", "deep", "host"),
        "/a/bc": ("abc", "host"),  # /a/bc is not below /a/b
    }
    # ids follow the sorted policy tuples
    assert [r.policies for r in plan.rulesets] == sorted(rulesets.values())


def test_rulesets_are_shared_by_equal_policy_sets() -> None:
    plan = compile_policies(policy_set(
        policy("p", cgroups=["/x", "/y"]),
    ))
    assert len(plan.rulesets) == 1
    assert [(s.cgroup, s.ruleset) for s in plan.scopes] == [("/x", 0), ("/y", 0)]


def test_host_cgroup_and_units() -> None:
    plan = compile_policies(
        policy_set(
            policy("host"),
            policy("web", units=["nginx.service", "getty@tty1.service", "db.service"]),
        ),
        host_cgroup="/guard-test",
        unit_cgroups={"db.service": "/custom/db"},
    )
    assert [s.cgroup for s in plan.scopes] == [
        "/custom/db",
        "/guard-test",
        "/system.slice/nginx.service",
        "/system.slice/system-getty.slice/getty@tty1.service",
    ]
    # the host policy covers /guard-test only, so the unit scopes hold "web" alone
    rulesets = {r.id: r.policies for r in plan.rulesets}
    assert {s.cgroup: rulesets[s.ruleset] for s in plan.scopes}["/custom/db"] == ("web",)


def test_bad_unit_is_a_diagnostic_at_the_policy() -> None:
    with pytest.raises(PolicyError) as caught:
        compile_policies(policy_set(policy("web", units=["multi-user.target"])))
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.code == "scope-unit"
    assert str(diagnostic.location) == "web.yaml:1:1"
    assert "a .target unit runs no processes of its own" in diagnostic.message


@pytest.mark.parametrize(("unit", "path"), [
    ("nginx.service", "/system.slice/nginx.service"),
    ("x.scope", "/system.slice/x.scope"),
    ("docker.socket", "/system.slice/docker.socket"),
    ("-.slice", "/"),
    ("system.slice", "/system.slice"),
    ("a-b.slice", "/a.slice/a-b.slice"),
    ("user-1000.slice", "/user.slice/user-1000.slice"),
    ("a-b-c.slice", "/a.slice/a-b.slice/a-b-c.slice"),
    ("getty@tty1.service", "/system.slice/system-getty.slice/getty@tty1.service"),
    ("serial-getty@ttyS0.service",
     "/system.slice/system-serial\\x2dgetty.slice/serial-getty@ttyS0.service"),
    ("cpu.service", "/system.slice/_cpu.service"),  # would clash with the cpu controller's files
    ("_x.service", "/system.slice/__x.service"),
])
def test_unit_convention(unit: str, path: str) -> None:
    assert unit_cgroup(unit) == path


@pytest.mark.parametrize("unit", [
    "nginx", "x.target", "x.timer", "foo@.service", "-a.slice", "a--b.slice", "a-.slice",
    "x@y.slice", "a b.service", "", "x" * 300 + ".service",
])
def test_unit_rejected(unit: str) -> None:
    assert check_unit_name(unit) is not None
    with pytest.raises(ValueError):
        unit_cgroup(unit)


@pytest.mark.parametrize(("ancestor", "path", "inside"), [
    ("/", "/", True), ("/", "/a", True), ("/a", "/a", True), ("/a/b", "/a/b/c", True),
    ("/a/b", "/a/bc", False), ("/a/b", "/a", False), ("/a/b/c", "/a/b", False),
])
def test_cgroup_contains_is_component_wise(ancestor: str, path: str, inside: bool) -> None:
    assert cgroup_contains(ancestor, path) is inside


# --- exec and files precedence -------------------------------------------------


def test_exec_merges_ties_to_the_strongest_then_lowest_id() -> None:
    plan = compile_policies(policy_set(
        policy("a", exec_default="allow", exec_rules=[
            ("allow", ["/bin/sh"]), ("deny", ["/bin/sh"]), ("audit", ["/bin/ls"]),
            ("allow", ["/bin/ls"]), ("deny", ["/x"]), ("deny", ["/x"]),
        ]),
        policy("b", exec_default="allow", exec_rules=[("audit", ["/bin/ls"]), ("deny", ["/x"])]),
        policy("c", mode="audit", exec_default="allow", exec_rules=[("deny", ["/bin/ls"])]),
    ))
    assert exec_table(plan, 0) == {
        "/bin/sh": (D, "a/exec.rules[1]"),  # deny beats allow within a policy
        "/bin/ls": (WD, "c/exec.rules[0]"),  # would-deny beats audit and allow across policies
        "/x": (D, "a/exec.rules[4]"),  # equal verdicts: the lowest rule id
    }


def test_exec_subtree_and_exact_are_separate_entries() -> None:
    plan = compile_policies(policy_set(policy("a", exec_default="allow", exec_rules=[
        ("deny", ["/usr/**"]), ("allow", ["/usr"]), ("audit", ["/**"]), ("deny", ["/"]),
    ])))
    assert exec_table(plan, 0) == {
        "/usr/**": (D, "a/exec.rules[0]"), "/usr": (A, "a/exec.rules[1]"),
        "/**": (W, "a/exec.rules[2]"), "/": (D, "a/exec.rules[3]"),
    }


def test_exec_defaults_strongest_wins() -> None:
    plan = compile_policies(policy_set(
        policy("allowing", exec_default="allow"),
        policy("denying", cgroups=["/d"], exec_default="deny"),
        policy("watching", cgroups=["/w"], mode="audit", exec_default="deny"),
        policy("no-exec", cgroups=["/n"]),
    ))
    by_scope = {s.cgroup: plan.defaults[s.ruleset].exec for s in plan.scopes}

    def show(d: Decision | None) -> tuple[Verdict, str] | None:
        return None if d is None else (d.verdict, label(plan, d.rule))

    assert show(by_scope["/"]) == (A, "allowing/exec.default")
    assert show(by_scope["/d"]) == (D, "denying/exec.default")
    assert show(by_scope["/w"]) == (WD, "watching/exec.default")
    assert show(by_scope["/n"]) == (A, "allowing/exec.default")  # inherited from the host


def test_exec_no_section_no_default() -> None:
    plan = compile_policies(policy_set(policy("f", files=[("deny", "w", ["/etc/**"])])))
    assert plan.defaults[0].exec is None


def test_files_read_and_write_merge_separately() -> None:
    plan = compile_policies(policy_set(
        policy("a", files=[("audit", "rw", ["/etc/shadow", "/etc/ssh/**"]),
                           ("deny", "w", ["/etc/**", "/etc/shadow"])]),
        policy("b", mode="audit", files=[("deny", "r", ["/etc/shadow"])]),
    ))
    got = {(f.path, f.subtree): (None if f.read is None else f.read.verdict,
                                 None if f.write is None else f.write.verdict)
           for f in plan.files}
    assert got == {
        ("/etc/shadow", False): (WD, D),
        ("/etc/ssh", True): (W, W),
        ("/etc", True): (None, D),
    }


# --- egress --------------------------------------------------------------------


def test_egress_tables_are_complete_and_ordered() -> None:
    plan = compile_policies(policy_set(
        policy("base", egress_default="allow", egress=[
            ("deny", ["0.0.0.0/0", "::/0"], [25, 465, 587], "tcp"),
            ("allow", ["10.0.0.0/8"], [], "any"),
            ("deny", ["10.0.0.0/8"], [(5000, 6000)], "any"),
            ("audit", ["10.1.0.0/16"], [53], "udp"),
            ("deny", ["10.1.0.0/16"], [], "udp"),
            ("allow", ["10.1.2.3/32"], [25], "tcp"),
        ]),
    ))
    assert [n.network for n in plan.net] == [
        "0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "::/0"]
    assert table_lines(plan, 0, "10.1.0.0/16") == [
        ("UDP", 53, 53, "AUDIT", "base/egress.rules[3]"),  # /16 with ports
        ("UDP", 0, 65535, "DENY", "base/egress.rules[4]"),  # /16 with a protocol
        ("ANY", 5000, 6000, "DENY", "base/egress.rules[2]"),  # /8 with ports
        ("ANY", 0, 65535, "ALLOW", "base/egress.rules[1]"),  # /8 catch-all: the rest is cut
    ]
    assert table_lines(plan, 0, "10.1.2.3/32")[0] == (
        "TCP", 25, 25, "ALLOW", "base/egress.rules[5]")
    assert table_lines(plan, 0, "0.0.0.0/0") == [
        ("TCP", 25, 25, "DENY", "base/egress.rules[0]"),
        ("TCP", 465, 465, "DENY", "base/egress.rules[0]"),
        ("TCP", 587, 587, "DENY", "base/egress.rules[0]"),
        ("ANY", 0, 65535, "ALLOW", "base/egress.default"),
    ]
    # 0.0.0.0/0 and ::/0 hold the same lines, so they share one table
    zero4, zero6 = (n for n in plan.net if n.network in ("0.0.0.0/0", "::/0"))
    assert zero4.table == zero6.table


def test_egress_ties_and_modes() -> None:
    plan = compile_policies(policy_set(
        policy("a", egress_default="allow", egress=[
            ("allow", ["192.168.0.0/16"], [22], "tcp"),
            ("deny", ["192.168.0.0/16"], [22], "tcp"),
        ]),
        policy("b", mode="audit", egress_default="deny", egress=[
            ("deny", ["192.168.0.0/16"], [(20, 30)], "tcp"),
        ]),
    ))
    assert table_lines(plan, 0, "192.168.0.0/16") == [
        ("TCP", 22, 22, "DENY", "a/egress.rules[1]"),  # the tie goes to deny; the allow
        # at tcp 22 can never decide, so it takes no line
        ("TCP", 20, 30, "WOULD_DENY", "b/egress.rules[0]"),  # audit mode: reported, allowed
        ("ANY", 0, 65535, "WOULD_DENY", "b/egress.default"),  # a allows, b would deny
    ]


def test_egress_tables_deduplicated_across_rulesets() -> None:
    plan = compile_policies(policy_set(
        policy("host", egress_default="deny", egress=[("allow", ["127.0.0.0/8"], [], "any")]),
        policy("web", cgroups=["/web"], exec_default="allow"),
    ))
    assert len(plan.rulesets) == 2
    assert len(plan.net) == 6  # 3 prefixes x 2 rulesets
    assert len(plan.port_tables) == 2  # the /0 tables and the 127/8 table, shared
    assert [t.id for t in plan.port_tables] == [0, 1]


def test_egress_ipv4_mapped_and_normalized_networks() -> None:
    plan = compile_policies(policy_set(policy("a", egress_default="allow", egress=[
        ("deny", ["::ffff:10.0.0.0/104"], [], "any"),
        ("deny", ["2001:DB8::/32"], [], "any"),
    ])))
    assert [n.network for n in plan.net] == ["0.0.0.0/0", "10.0.0.0/8", "::/0", "2001:db8::/32"]


def test_no_egress_section_no_entries_even_with_egress_elsewhere() -> None:
    plan = compile_policies(policy_set(
        policy("host", exec_default="allow"),
        policy("web", cgroups=["/web"], egress_default="deny"),
    ))
    host_ruleset = next(s.ruleset for s in plan.scopes if s.cgroup == "/")
    assert [n for n in plan.net if n.ruleset == host_ruleset] == []
    web_ruleset = next(s.ruleset for s in plan.scopes if s.cgroup == "/web")
    assert sorted(n.network for n in plan.net if n.ruleset == web_ruleset) == [
        "0.0.0.0/0", "::/0"]


def test_port_table_limit_points_at_the_rule() -> None:
    ports = list(range(1, MAX_PORT_LINES))  # 15 lines + the default: exactly the limit
    fits = policy("a", egress_default="deny", egress=[("allow", ["10.0.0.0/8"], ports, "tcp")])
    plan = compile_policies(policy_set(fits))
    assert max(len(t.lines) for t in plan.port_tables) == MAX_PORT_LINES
    too_many = policy("a", egress_default="deny", egress=[
        ("allow", ["10.0.0.0/8"], ports, "tcp"),
        ("deny", ["0.0.0.0/0"], [9999], "udp"),
    ])
    with pytest.raises(PolicyError) as caught:
        compile_policies(policy_set(too_many))
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.code == "port-table-limit"
    assert str(diagnostic.location) == "a.yaml:302:9"  # egress.rules[1], the 16th line
    assert f"at most {MAX_PORT_LINES}" in diagnostic.message
    assert "10.0.0.0/8" in diagnostic.message and "17 lines" in diagnostic.message


def test_catch_all_truncation_avoids_the_limit() -> None:
    """Lines behind a catch-all are cut, so they cost nothing in longer prefixes' tables."""
    plan = compile_policies(policy_set(policy("a", egress_default="deny", egress=[
        ("deny", ["0.0.0.0/0"], list(range(1, 11)), "tcp"),
        ("audit", ["10.0.0.0/8"], list(range(101, 111)), "udp"),
        ("allow", ["10.0.0.0/8"], [], "any"),
        ("deny", ["10.1.0.0/16"], [1, 2, 3, 4, 5], "udp"),
    ])))
    assert len(table_lines(plan, 0, "0.0.0.0/0")) == 11
    assert len(table_lines(plan, 0, "10.0.0.0/8")) == 11  # 22 without the cut
    assert len(table_lines(plan, 0, "10.1.0.0/16")) == 16
    assert table_lines(plan, 0, "10.1.0.0/16")[-1] == (
        "ANY", 0, 65535, "ALLOW", "a/egress.rules[2]")


# --- determinism ---------------------------------------------------------------


def sample_policies(shuffle: random.Random | None = None) -> list[Policy]:
    """A varied set; with ``shuffle``, every order that has no meaning is shuffled."""

    def mix(items: list[str]) -> list[str]:
        items = list(items)
        if shuffle:
            shuffle.shuffle(items)
        return items

    def mix_ports(items: list[Port]) -> list[Port]:
        items = list(items)
        if shuffle:
            shuffle.shuffle(items)
        return items

    found = [
        policy("base", exec_default="allow",
               exec_rules=[("deny", mix(["/tmp/**", "/dev/shm/**", "/var/tmp/**"]))],
               files=[("audit", "rw", mix(["/etc/shadow", "/etc/ssh/**"])),
                      ("deny", "w", ["/etc/**"])],
               egress_default="allow",
               egress=[("deny", mix(["0.0.0.0/0", "::/0"]), mix_ports([25, 465, 587]), "tcp")]),
        policy("web", units=mix(["nginx.service", "php-fpm.service"]), exec_default="deny",
               exec_rules=[("allow", mix(["/usr/sbin/nginx", "/usr/lib/**", "/usr/bin/**"])),
                           ("deny", mix(["/usr/bin/curl", "/usr/bin/wget"]))],
               egress_default="deny",
               egress=[("allow", mix(["10.0.0.0/8", "fd00::/8", "192.168.1.0/24"]),
                        mix_ports([443, 80, (8000, 8100)]), "tcp"),
                       ("allow", ["10.0.0.53/32"], [53], "udp")]),
        policy("watch", mode="audit", cgroups=mix(["/a", "/a/b", "/c"]), exec_default="deny",
               exec_rules=[("audit", ["/usr/bin/**"])],
               files=[("deny", "rw", mix(["/home/**", "/root/**"]))],
               egress_default="deny",
               egress=[("allow", mix(["10.0.0.0/8", "2001:db8::/32"]), mix_ports([22, 443]),
                        "tcp"),
                       ("audit", ["10.9.0.0/16"], [], "any")]),
        policy("watch-too", mode="audit", units=["php-fpm.service"], exec_default="allow",
               exec_rules=[("deny", mix(["/usr/bin/curl", "/usr/lib/x/**"]))]),
    ]
    if shuffle:
        shuffle.shuffle(found)
    return found


def test_compile_twice_and_shuffled_inputs_give_identical_json() -> None:
    reference = compile_policies(policy_set(*sample_policies())).to_json()
    assert compile_policies(policy_set(*sample_policies())).to_json() == reference
    for seed in range(20):
        shuffled = compile_policies(policy_set(*sample_policies(random.Random(seed))))
        assert shuffled.to_json() == reference


def test_reordered_rules_decide_the_same() -> None:
    """Rule order changes labels, never a verdict."""
    rules = [("deny", ["/usr/bin/curl"]), ("allow", ["/usr/**"]), ("deny", ["/usr/bin/**"]),
             ("audit", ["/usr/bin/ls"]), ("allow", ["/usr/bin/curl"])]
    net: list[NetSpec] = [
        ("deny", ["10.0.0.0/8"], [25], "tcp"), ("allow", ["10.0.0.0/8"], [], "any"),
        ("audit", ["10.1.0.0/16"], [(1, 100)], "any"), ("deny", ["10.1.0.0/16"], [25], "tcp")]
    plans = []
    for seed in range(10):
        rng = random.Random(seed)
        r, n = list(rules), list(net)
        rng.shuffle(r)
        rng.shuffle(n)
        plans.append(compile_policies(policy_set(policy(
            "p", exec_default="deny", exec_rules=r, egress_default="allow", egress=n))))
    for plan in plans[1:]:
        for path in ["/usr/bin/curl", "/usr/bin/ls", "/usr/bin/x", "/usr/lib/x", "/bin/sh"]:
            assert decide_exec(plan, "/", path).verdict == decide_exec(plans[0], "/", path).verdict
        for addr, port in [("10.1.0.1", 25), ("10.1.0.1", 50), ("10.2.0.1", 25), ("8.8.8.8", 1)]:
            assert (decide_connect(plan, "/", addr, port, "tcp").verdict
                    == decide_connect(plans[0], "/", addr, port, "tcp").verdict)


def test_json_identical_under_different_hash_seeds() -> None:
    """Set and dict order must not leak: compile in fresh interpreters with other seeds."""
    script = (
        "import sys; sys.path.insert(0, 'tests/unit')\n"
        "from test_compile import sample_policies\n"
        "from policy_builders import policy_set\n"
        "from guard.policy.compile import compile_policies\n"
        "sys.stdout.write(compile_policies(policy_set(*sample_policies())).to_json())\n"
    )
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60, check=True)
        outputs.add(done.stdout)
    assert len(outputs) == 1
    assert json.loads(outputs.pop())["rules"]


# --- summary -------------------------------------------------------------------


def test_summarize_lists_rulesets_scopes_and_rules_with_locations() -> None:
    plan = compile_policies(policy_set(*sample_policies()))
    text = summarize(plan)
    assert "ruleset 3: policies base, web\n  scope cgroups: /system.slice/nginx.service\n" in text
    assert "ruleset 2: policies base, watch-too, web\n" in text
    assert "deny   /usr/bin/curl    web/exec.rules[1] (web.yaml:102:9)" in text
    assert "tcp port 25" in text and "any port (any protocol)" in text
    assert text.endswith("\n")


def test_port_match_constants() -> None:
    """The default line is the catch-all the kernel stops at."""
    plan = compile_policies(policy_set(policy("a", egress_default="deny")))
    (table,) = plan.port_tables
    assert table.lines == (PortMatch(Proto.ANY, 0, 65535, Decision(D, 1)),)
