"""Rule sets of a given size, as guard plans and as policy files.

The rule set of the network benchmark: one policy, egress ``default: allow``
and one deny rule (TCP, any port) listing k /32 destinations from the
benchmarking range 198.18.0.0/15, which no bench traffic goes to, so every
connection is judged against all of them and matches none.

Plans for the per-syscall measurements are built directly, in exactly the
shape ``guard.policy.compile.compile_policies`` gives for that policy: ``check_shape``
compiles the policy text at small sizes and compares (run at the start of
every bench run and by the unit tests). The compiler is not used for the large
sizes because today it takes minutes there (it is quadratic in the number of
prefixes), which the daemon measurements, which do go through it, show.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import fields

from guard.errors import Location
from guard.policy.plan import (
    Decision,
    ExecEntry,
    FileEntry,
    NetEntry,
    Plan,
    PortMatch,
    PortTable,
    Proto,
    RuleRef,
    Ruleset,
    RulesetDefaults,
    ScopeEntry,
    Verdict,
)

BENCH_RANGE = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544: for benchmarks
MAX_BLOCKED = BENCH_RANGE.num_addresses
POLICY = "bench"
HERE = Location("bench.yaml", 1, 1)
FILE_LIMIT_BYTES = 1 << 20  # guard refuses larger policy files
PER_FILE = 25_000  # destinations per policy file: about 0.8 MB of YAML


def blocked_address(i: int) -> str:
    if not 0 <= i < MAX_BLOCKED:
        raise ValueError(f"at most {MAX_BLOCKED} blocked destinations")
    return str(BENCH_RANGE.network_address + i)


# --- policy text -------------------------------------------------------------------------


def egress_policy(name: str, destinations: Sequence[str], *, mode: str = "enforce",
                  extra_rules: Sequence[str] = ()) -> str:
    """One policy: default allow, one TCP deny rule listing ``destinations`` (if any)."""
    lines = ["apiVersion: guard/v1", "kind: Policy", "metadata:", f"  name: {name}", "spec:",
             f"  mode: {mode}", "  network:", "    egress:", "      default: allow"]
    rules = list(extra_rules)
    if destinations:
        rules.append("        - action: deny\n          protocol: tcp\n          to:\n"
                     + "\n".join(f"            - {d}/32" for d in destinations))
    lines.append("      rules:" if rules else "      rules: []")
    lines += rules
    return "\n".join(lines) + "\n"


def policy_files(k: int, prefix: str = POLICY) -> dict[str, str]:
    """file name -> text for a policy directory with k blocked destinations.

    Split into files of at most PER_FILE destinations (guard reads files of up to
    1 MiB); each file is one policy, all covering the whole host.
    """
    if k <= PER_FILE:
        return {f"{prefix}.yaml": egress_policy(prefix, [blocked_address(i) for i in range(k)])}
    out: dict[str, str] = {}
    for part, start in enumerate(range(0, k, PER_FILE)):
        name = f"{prefix}-{part:02d}"
        out[f"{name}.yaml"] = egress_policy(
            name, [blocked_address(i) for i in range(start, min(k, start + PER_FILE))])
    for text in out.values():
        assert len(text.encode()) < FILE_LIMIT_BYTES
    return out


# --- plans, built directly -------------------------------------------------------------


def net_plan(scope: str, k: int, first: int = 0) -> Plan:
    """The compiler's plan for ``egress_policy(bench, k destinations)`` scoped to ``scope``.

    ``first`` shifts the destinations (a reload that changes every entry).
    """
    default = RuleRef(1, POLICY, "egress", -1, HERE)
    rules = [default]
    allow = PortMatch(Proto.ANY, 0, 65535, Decision(Verdict.ALLOW, 1))
    tables = [PortTable(0, (allow,))]
    net = [NetEntry(0, "0.0.0.0/0", 0), NetEntry(0, "::/0", 0)]
    if k:
        rules.append(RuleRef(2, POLICY, "egress", 0, HERE))
        tables.append(PortTable(1, (PortMatch(Proto.TCP, 0, 65535, Decision(Verdict.DENY, 2)),
                                    allow)))
        net += [NetEntry(0, f"{blocked_address(first + i)}/32", 1) for i in range(k)]
    return Plan(
        rules=tuple(rules),
        rulesets=(Ruleset(0, (POLICY,)),),
        scopes=(ScopeEntry(scope, 0),),
        defaults=(RulesetDefaults(0, None, Decision(Verdict.ALLOW, 1)),),
        exec=(), files=(), net=tuple(net), port_tables=tuple(tables),
    )


def exec_policy(exact: Sequence[str], subtrees: Sequence[str]) -> str:
    paths = [*exact, *(f"{s}/**" for s in subtrees)]
    lines = ["apiVersion: guard/v1", "kind: Policy", "metadata:", f"  name: {POLICY}", "spec:",
             "  mode: enforce", "  exec:", "    default: allow"]
    if paths:
        lines += ["    rules:", "      - action: deny", "        paths:"]
        lines += [f'          - "{p}"' for p in paths]
    else:
        lines.append("    rules: []")
    return "\n".join(lines) + "\n"


def exec_plan(scope: str, exact: Sequence[str], subtrees: Sequence[str]) -> Plan:
    """The compiler's plan for ``exec_policy``: deny the paths, default allow."""
    default = RuleRef(1, POLICY, "exec", -1, HERE)
    rules = [default]
    entries: list[ExecEntry] = []
    if exact or subtrees:
        rules.append(RuleRef(2, POLICY, "exec", 0, HERE))
        deny = Decision(Verdict.DENY, 2)
        entries = [ExecEntry(0, p, False, deny) for p in exact]
        entries += [ExecEntry(0, s, True, deny) for s in subtrees]
    return Plan(
        rules=tuple(rules), rulesets=(Ruleset(0, (POLICY,)),), scopes=(ScopeEntry(scope, 0),),
        defaults=(RulesetDefaults(0, Decision(Verdict.ALLOW, 1), None),),
        exec=tuple(sorted(entries)), files=(), net=(), port_tables=(),
    )


def files_policy(exact: Sequence[str], subtrees: Sequence[str]) -> str:
    paths = [*exact, *(f"{s}/**" for s in subtrees)]
    lines = ["apiVersion: guard/v1", "kind: Policy", "metadata:", f"  name: {POLICY}", "spec:",
             "  mode: enforce", "  files:", "    rules:", "      - action: audit",
             "        access: [read]", "        paths:"]
    lines += [f'          - "{p}"' for p in paths]
    return "\n".join(lines) + "\n"


def files_plan(scope: str, exact: Sequence[str], subtrees: Sequence[str]) -> Plan:
    """The compiler's plan for ``files_policy`` (audit reads); no paths: no file entries."""
    rules: list[RuleRef] = []
    entries: list[FileEntry] = []
    if exact or subtrees:
        rules.append(RuleRef(1, POLICY, "files", 0, HERE))
        audit = Decision(Verdict.AUDIT, 1)
        entries = [FileEntry(0, p, False, audit, None) for p in exact]
        entries += [FileEntry(0, s, True, audit, None) for s in subtrees]
    return Plan(
        rules=tuple(rules), rulesets=(Ruleset(0, (POLICY,)),), scopes=(ScopeEntry(scope, 0),),
        defaults=(RulesetDefaults(0, None, None),),
        exec=(), files=tuple(sorted(entries)), net=(), port_tables=(),
    )


# --- the shape check ---------------------------------------------------------------------


def compiled(text: str, scope: str) -> Plan:
    from guard.policy.compile import compile_policies
    from guard.policy.model import PolicySet
    from guard.policy.parse import parse_text

    policies, diagnostics = parse_text(text, "bench.yaml")
    errors = [str(d) for d in diagnostics if d.severity == "error"]
    if errors:
        raise ValueError("bench policy does not parse: " + "; ".join(errors))
    return compile_policies(PolicySet(tuple(sorted(policies, key=lambda p: p.name))),
                            host_cgroup=scope, unit_cgroups={})


def differences(a: Plan, b: Plan) -> list[str]:
    """Fields where two plans differ, order of entries ignored (apply does not care)."""
    out = []
    for f in fields(Plan):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if sorted(x) != sorted(y):
            out.append(f"{f.name}: {sorted(x)[:3]}... != {sorted(y)[:3]}...")
    return out


def check_shape(scope: str = "/guard-bench", sizes: Iterable[int] = (0, 1, 100)) -> list[str]:
    """Problems found comparing the direct plans with the compiler's, empty when none."""
    problems: list[str] = []
    for k in sizes:
        text = egress_policy(POLICY, [blocked_address(i) for i in range(k)])
        problems += [f"net k={k}: {d}" for d in differences(net_plan(scope, k),
                                                            compiled(text, scope))]
        exact = [f"/tmp/guard-bench/rules/f{i}" for i in range(max(0, k - 1))]
        subtrees = ["/tmp/guard-bench/denied"] if k else []
        problems += [f"exec k={k}: {d}" for d in differences(
            exec_plan(scope, exact, subtrees), compiled(exec_policy(exact, subtrees), scope))]
        if k:
            problems += [f"files k={k}: {d}" for d in differences(
                files_plan(scope, exact, subtrees),
                compiled(files_policy(exact, subtrees), scope))]
    return problems
