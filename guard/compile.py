"""The compiler: a validated policy set becomes a Plan (see guard/plan.py).

Pure and deterministic: the same policy set gives a byte-identical
``plan.to_json()``. Nothing here iterates a dict or set without sorting first,
and every id is handed out in a sorted order.

The stages, each a small function taking values and returning values:

    rule_table      every rule and default gets a RuleRef (dense ids from 1)
    scope_paths     each policy's scope as normalized cgroup paths
    rulesets        distinct scope paths -> the policies covering them
    exec_entries    per ruleset and path, the merged exec decision
    file_entries    per ruleset and path, the merged read / write decisions
    egress_entries  per ruleset and prefix, a complete port table
    ruleset_defaults per ruleset, the strongest exec / egress default

The combination rule itself is written once, in guard/plan.py's docstring.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from guard.errors import Diagnostic, Location, PolicyError
from guard.layout import MAX_PORT_LINES
from guard.model import (
    Access,
    Action,
    Default,
    IPNetwork,
    Mode,
    NetRule,
    Policy,
    PolicySet,
    Protocol,
)
from guard.plan import (
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
from guard.units import cgroup_contains, check_unit_name, normalize_cgroup, resolve_unit

SECTIONS = ("egress", "exec", "files")  # sorted: RuleRef ids follow this order
PROTO_OF = {Protocol.ANY: Proto.ANY, Protocol.TCP: Proto.TCP, Protocol.UDP: Proto.UDP}
PORT_MAX = 65535

RuleKey = tuple[str, str, int]  # (policy, section, index); index -1 for the default


# --- verdicts ------------------------------------------------------------------


def rule_verdict(action: Action, mode: Mode) -> Verdict:
    """allow -> ALLOW, audit -> AUDIT, deny -> DENY (enforce) or WOULD_DENY (audit mode)."""
    if action is Action.ALLOW:
        return Verdict.ALLOW
    if action is Action.AUDIT:
        return Verdict.AUDIT
    return Verdict.DENY if mode is Mode.ENFORCE else Verdict.WOULD_DENY


def default_verdict(default: Default, mode: Mode) -> Verdict:
    return rule_verdict(Action.DENY if default is Default.DENY else Action.ALLOW, mode)


def stronger(current: Decision | None, candidate: Decision) -> Decision:
    """The tie-break of plan.py rule 3: the stronger verdict, then the lower rule id."""
    if current is None:
        return candidate
    if (candidate.verdict, -candidate.rule) > (current.verdict, -current.rule):
        return candidate
    return current


# --- stage 1: the rule table ---------------------------------------------------


def rule_table(policy_set: PolicySet) -> tuple[RuleRef, ...]:
    """Every rule and every section default, ids dense from 1 in (policy, section, index) order."""
    found: list[tuple[RuleKey, Location]] = []
    for policy in policy_set.policies:
        if policy.egress is not None:
            found.append(((policy.name, "egress", -1), policy.egress.location))
            found += [((policy.name, "egress", r.index), r.location) for r in policy.egress.rules]
        if policy.exec is not None:
            found.append(((policy.name, "exec", -1), policy.exec.location))
            found += [((policy.name, "exec", r.index), r.location) for r in policy.exec.rules]
        if policy.files is not None:
            found += [((policy.name, "files", r.index), r.location) for r in policy.files.rules]
    found.sort(key=lambda item: item[0])
    return tuple(
        RuleRef(id=i, policy=key[0], section=key[1], index=key[2], location=location)
        for i, (key, location) in enumerate(found, start=1)
    )


def rule_ids(rules: Iterable[RuleRef]) -> dict[RuleKey, int]:
    return {(r.policy, r.section, r.index): r.id for r in rules}


# --- stage 2: scope paths ------------------------------------------------------


def scope_paths(
    policy_set: PolicySet, host_cgroup: str, unit_cgroups: Mapping[str, str]
) -> dict[str, tuple[str, ...]]:
    """Policy name -> its scope as sorted, normalized cgroup paths."""
    diagnostics: list[Diagnostic] = []
    try:
        host = normalize_cgroup(host_cgroup)
    except ValueError as error:
        raise PolicyError([Diagnostic(Location("<host-cgroup>", 1, 1), "scope-cgroup",
                                      str(error))]) from None
    result: dict[str, tuple[str, ...]] = {}
    for policy in policy_set.policies:
        if policy.scope.whole_host:
            result[policy.name] = (host,)
            continue
        paths: set[str] = set()
        for cgroup in policy.scope.cgroups:
            try:
                paths.add(normalize_cgroup(cgroup))
            except ValueError as error:
                diagnostics.append(Diagnostic(policy.location, "scope-cgroup", str(error)))
        for unit in policy.scope.units:
            problem = None if unit in unit_cgroups else check_unit_name(unit)
            if problem is not None:
                diagnostics.append(Diagnostic(policy.location, "scope-unit", problem))
                continue
            try:
                paths.add(resolve_unit(unit, unit_cgroups))
            except ValueError as error:
                diagnostics.append(Diagnostic(policy.location, "scope-unit", str(error)))
        result[policy.name] = tuple(sorted(paths))
    if diagnostics:
        raise PolicyError(diagnostics)
    return result


# --- stage 3: rulesets ---------------------------------------------------------


def rulesets(
    policy_scopes: Mapping[str, tuple[str, ...]],
) -> tuple[tuple[Ruleset, ...], tuple[ScopeEntry, ...]]:
    """Each distinct scope path gets the ruleset of every policy covering it.

    A policy covers a path when one of its scope paths is that path or an
    ancestor of it (component-wise). Rulesets are deduplicated by their
    policy tuple and numbered in sorted order of the tuples.
    """
    all_paths = sorted({p for paths in policy_scopes.values() for p in paths})
    members: dict[str, tuple[str, ...]] = {}
    for path in all_paths:
        members[path] = tuple(sorted(
            name for name, paths in policy_scopes.items()
            if any(cgroup_contains(scope, path) for scope in paths)
        ))
    ids = {names: i for i, names in enumerate(sorted(set(members.values())))}
    sets = tuple(Ruleset(id=i, policies=names) for names, i in sorted(ids.items(),
                                                                      key=lambda kv: kv[1]))
    scopes = tuple(ScopeEntry(cgroup=path, ruleset=ids[members[path]]) for path in all_paths)
    return sets, scopes


# --- stages 4 and 5: exec and file entries -------------------------------------


def _members(ruleset: Ruleset, by_name: Mapping[str, Policy]) -> Iterator[Policy]:
    return (by_name[name] for name in ruleset.policies)


def exec_entries(
    sets: Iterable[Ruleset], by_name: Mapping[str, Policy], ids: Mapping[RuleKey, int]
) -> tuple[ExecEntry, ...]:
    """Per (ruleset, path, subtree): the strongest decision among the rules naming it."""
    entries: list[ExecEntry] = []
    for ruleset in sets:
        merged: dict[tuple[str, bool], Decision] = {}
        for policy in _members(ruleset, by_name):
            if policy.exec is None:
                continue
            for rule in policy.exec.rules:
                decision = Decision(rule_verdict(rule.action, policy.mode),
                                    ids[(policy.name, "exec", rule.index)])
                for pattern in rule.paths:
                    key = (pattern.path, pattern.subtree)
                    merged[key] = stronger(merged.get(key), decision)
        entries += [ExecEntry(ruleset.id, path, subtree, decision)
                    for (path, subtree), decision in merged.items()]
    return tuple(sorted(entries))


def file_entries(
    sets: Iterable[Ruleset], by_name: Mapping[str, Policy], ids: Mapping[RuleKey, int]
) -> tuple[FileEntry, ...]:
    """Per (ruleset, path, subtree): the strongest read and write decisions, each on its own."""
    entries: list[FileEntry] = []
    for ruleset in sets:
        reads: dict[tuple[str, bool], Decision] = {}
        writes: dict[tuple[str, bool], Decision] = {}
        for policy in _members(ruleset, by_name):
            if policy.files is None:
                continue
            for rule in policy.files.rules:
                decision = Decision(rule_verdict(rule.action, policy.mode),
                                    ids[(policy.name, "files", rule.index)])
                for pattern in rule.paths:
                    key = (pattern.path, pattern.subtree)
                    for access, table in ((Access.READ, reads), (Access.WRITE, writes)):
                        if access in rule.access:
                            table[key] = stronger(table.get(key), decision)
        for key in sorted(reads.keys() | writes.keys()):
            entries.append(FileEntry(ruleset.id, key[0], key[1], reads.get(key),
                                     writes.get(key)))
    return tuple(sorted(entries))


# --- stage 6: egress -----------------------------------------------------------

ZERO_V4 = ipaddress.ip_network("0.0.0.0/0")
ZERO_V6 = ipaddress.ip_network("::/0")


@dataclass(frozen=True, order=True)
class _Line:
    """A port line with the key that orders it inside a table (smaller sorts first)."""

    key: tuple[int, int, int, int, int, int, int, int]
    line: PortMatch


def _is_catch_all(line: PortMatch) -> bool:
    return line.proto is Proto.ANY and line.first == 0 and line.last == PORT_MAX


def rule_lines(rule: NetRule, network: IPNetwork, decision: Decision) -> list[_Line]:
    """One line per port range (one 0-65535 line without ports), keyed by specificity.

    Order (plan.py rule 2 and 3): longer prefix, then has ports, then has a
    protocol, then the stronger verdict, then the lower rule id.
    """
    proto = PROTO_OF[rule.protocol]
    ranges = [(p.first, p.last) for p in rule.ports] or [(0, PORT_MAX)]
    specificity = (-network.prefixlen, -int(bool(rule.ports)), -int(proto is not Proto.ANY),
                   -int(decision.verdict), decision.rule)
    return [_Line((*specificity, first, last, int(proto)),
                  PortMatch(proto, first, last, decision)) for first, last in ranges]


def _network_order(network: IPNetwork) -> tuple[int, int, int]:
    return (network.version, int(network.network_address), network.prefixlen)


@dataclass(frozen=True)
class _Table:
    ruleset: int
    network: IPNetwork
    lines: tuple[PortMatch, ...]


def _ruleset_tables(
    ruleset: Ruleset, by_name: Mapping[str, Policy], ids: Mapping[RuleKey, int],
    default: Decision | None, problems: dict[int, list[str]],
) -> list[_Table]:
    by_network: dict[IPNetwork, list[_Line]] = {}
    for policy in _members(ruleset, by_name):
        if policy.egress is None:
            continue
        for rule in policy.egress.rules:
            decision = Decision(rule_verdict(rule.action, policy.mode),
                                ids[(policy.name, "egress", rule.index)])
            for network in rule.to:
                by_network.setdefault(network, []).extend(rule_lines(rule, network, decision))
    if default is None:  # no policy of this ruleset has an egress section, so no rules either
        return []
    by_network.setdefault(ZERO_V4, [])
    by_network.setdefault(ZERO_V6, [])
    tables: list[_Table] = []
    for network in sorted(by_network, key=_network_order):
        # Complete: this prefix's lines and those of every shorter prefix containing it.
        found = sorted(
            line
            for other, lines in by_network.items()
            if other.version == network.version and network.subnet_of(other)  # type: ignore[arg-type]
            for line in lines
        )
        # dict.fromkeys: a rule naming one prefix twice must not cost two lines.
        lines = list(dict.fromkeys(item.line for item in found))
        lines.append(PortMatch(Proto.ANY, 0, PORT_MAX, default))
        cut = next(i for i, line in enumerate(lines) if _is_catch_all(line))
        lines = lines[: cut + 1]  # nothing after a catch-all line can match
        if len(lines) > MAX_PORT_LINES:
            # Blame the rule whose line is the first that does not fit; when only the
            # default is pushed out, the last rule line is what pushed it.
            overflow = lines[MAX_PORT_LINES]
            if overflow is lines[-1] and overflow.decision == default:
                overflow = lines[MAX_PORT_LINES - 1]
            offender = overflow.decision.rule
            names = ", ".join(ruleset.policies)
            problems.setdefault(offender, []).append(
                f"the port table for {network} in the ruleset of policies [{names}] needs "
                f"{len(lines)} lines")
        tables.append(_Table(ruleset.id, network, tuple(lines)))
    return tables


def egress_entries(
    sets: Iterable[Ruleset], by_name: Mapping[str, Policy], ids: Mapping[RuleKey, int],
    defaults: Mapping[int, RulesetDefaults], rules: tuple[RuleRef, ...],
) -> tuple[tuple[NetEntry, ...], tuple[PortTable, ...]]:
    """Per ruleset and named prefix, a complete port table; tables deduplicated by content."""
    by_id = {r.id: r for r in rules}
    problems: dict[int, list[str]] = {}
    tables: list[_Table] = []
    for ruleset in sets:
        tables += _ruleset_tables(ruleset, by_name, ids, defaults[ruleset.id].egress, problems)
    if problems:
        raise PolicyError([_limit_diagnostic(by_id[rule], found)
                           for rule, found in sorted(problems.items())])
    table_ids: dict[tuple[PortMatch, ...], int] = {}
    entries: list[NetEntry] = []
    for table in tables:  # already sorted by (ruleset, family, address, prefix length)
        table_id = table_ids.setdefault(table.lines, len(table_ids))
        entries.append(NetEntry(table.ruleset, str(table.network), table_id))
    port_tables = tuple(PortTable(i, lines) for lines, i in table_ids.items())
    return tuple(entries), port_tables


def _limit_diagnostic(rule: RuleRef, found: list[str]) -> Diagnostic:
    more = f" (and {len(found) - 1} more table(s))" if len(found) > 1 else ""
    return Diagnostic(
        rule.location, "port-table-limit",
        f"{found[0]}{more}, but the kernel scans at most {MAX_PORT_LINES}, and this rule's "
        f"port lines are where it overflows. A table holds one line per port range of every "
        f"rule at that prefix or a shorter one containing it, plus the default: merge port "
        f"ranges, drop a protocol split, or move rules into a narrower scope",
    )


# --- stage 7: defaults ---------------------------------------------------------


def ruleset_defaults(
    sets: Iterable[Ruleset], by_name: Mapping[str, Policy], ids: Mapping[RuleKey, int]
) -> tuple[RulesetDefaults, ...]:
    """Per ruleset, the strongest exec and egress default of its policies (None: no section)."""
    result: list[RulesetDefaults] = []
    for ruleset in sets:
        exec_default: Decision | None = None
        egress_default: Decision | None = None
        for policy in _members(ruleset, by_name):
            if policy.exec is not None:
                exec_default = stronger(exec_default, Decision(
                    default_verdict(policy.exec.default, policy.mode),
                    ids[(policy.name, "exec", -1)]))
            if policy.egress is not None:
                egress_default = stronger(egress_default, Decision(
                    default_verdict(policy.egress.default, policy.mode),
                    ids[(policy.name, "egress", -1)]))
        result.append(RulesetDefaults(ruleset.id, exec_default, egress_default))
    return tuple(result)


# --- the whole pipeline --------------------------------------------------------


def compile_policies(
    policy_set: PolicySet, *, host_cgroup: str = "/",
    unit_cgroups: Mapping[str, str] | None = None,
) -> Plan:
    """The plan for ``policy_set``; PolicyError when a kernel limit or a scope is violated."""
    by_name = {p.name: p for p in policy_set.policies}
    rules = rule_table(policy_set)
    ids = rule_ids(rules)
    policy_scopes = scope_paths(policy_set, host_cgroup, dict(unit_cgroups or {}))
    sets, scopes = rulesets(policy_scopes)
    defaults = ruleset_defaults(sets, by_name, ids)
    net, port_tables = egress_entries(sets, by_name, ids, {d.ruleset: d for d in defaults},
                                      rules)
    return Plan(
        rules=rules,
        rulesets=sets,
        scopes=scopes,
        defaults=defaults,
        exec=exec_entries(sets, by_name, ids),
        files=file_entries(sets, by_name, ids),
        net=net,
        port_tables=port_tables,
    )


# --- a listing for people ------------------------------------------------------


def verdict_word(verdict: Verdict) -> str:
    return verdict.name.lower().replace("_", "-")


def rule_text(plan: Plan, rule_id: int) -> str:
    """``web-tier/exec.rules[0] (policies/web.yaml:12:9)``."""
    ref = plan.rule(rule_id)
    return "no rule" if ref is None else f"{ref.label} ({ref.location})"


def decision_text(plan: Plan, decision: Decision | None) -> str:
    if decision is None:
        return "-"
    return f"{verdict_word(decision.verdict)} by {rule_text(plan, decision.rule)}"


def pattern_text(path: str, subtree: bool) -> str:
    if not subtree:
        return path
    return "/**" if path == "/" else f"{path}/**"


def port_text(line: PortMatch) -> str:
    """``tcp port 25``, ``udp ports 1000-2000``, ``any port (any protocol)``."""
    if (line.first, line.last) == (0, PORT_MAX):
        ports = "any port"
    elif line.first == line.last:
        ports = f"port {line.first}"
    else:
        ports = f"ports {line.first}-{line.last}"
    if line.proto is Proto.ANY:
        return f"{ports} (any protocol)"
    return f"{line.proto.name.lower()} {ports}"


def _table(rows: list[tuple[str, ...]], indent: str) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
            + "  " + row[-1] for row in rows]


def summarize(plan: Plan) -> str:
    """A readable listing: rulesets with their policies and scopes, then their entries."""
    out = [f"{len(plan.rulesets)} ruleset(s), {len(plan.scopes)} scope(s), "
           f"{len(plan.rules)} rule(s), {len(plan.port_tables)} port table(s)"]
    tables = {t.id: t for t in plan.port_tables}
    for ruleset in plan.rulesets:
        rid = ruleset.id
        out.append("")
        out.append(f"ruleset {rid}: policies {', '.join(ruleset.policies)}")
        scopes = [s.cgroup for s in plan.scopes if s.ruleset == rid]
        out.append(f"  scope cgroups: {', '.join(scopes)}")
        defaults = next(d for d in plan.defaults if d.ruleset == rid)
        out.append(f"  exec default:   {decision_text(plan, defaults.exec)}")
        out.append(f"  egress default: {decision_text(plan, defaults.egress)}")
        execs = [e for e in plan.exec if e.ruleset == rid]
        if execs:
            out.append("  exec:")
            out += _table([(verdict_word(e.decision.verdict), pattern_text(e.path, e.subtree),
                            rule_text(plan, e.decision.rule)) for e in execs], "    ")
        files = [f for f in plan.files if f.ruleset == rid]
        if files:
            out.append("  files:")
            rows: list[tuple[str, ...]] = []
            for f in files:
                for access, decision in (("read", f.read), ("write", f.write)):
                    if decision is not None:
                        rows.append((pattern_text(f.path, f.subtree), access,
                                     verdict_word(decision.verdict),
                                     rule_text(plan, decision.rule)))
            out += _table(rows, "    ")
        nets = [n for n in plan.net if n.ruleset == rid]
        if nets:
            out.append("  egress (first matching line decides):")
            for net in nets:
                out.append(f"    to {net.network} (table {net.table}):")
                out += _table([(port_text(line), verdict_word(line.decision.verdict),
                                rule_text(plan, line.decision.rule))
                               for line in tables[net.table].lines], "      ")
    return "\n".join(out) + "\n"
