"""The compiler: a validated policy set becomes a Plan (see guard/policy/plan.py).

Pure and deterministic: the same policy set gives a byte-identical
``plan.to_json()``. Nothing here iterates a dict or set without sorting first,
and every id is handed out in a sorted order.

The stages, each a small function taking values and returning values:

    rule_table      every rule and default gets a RuleRef (dense ids from 1)
    scope_paths     each policy's scope as normalized cgroup paths
    rulesets        distinct scope paths -> the policies covering them
    exec_entries    per ruleset and path, the exec decision
    file_entries    per ruleset and path, the read / write decisions
    egress_entries  per ruleset and prefix, a complete port table
    ruleset_defaults per ruleset, the exec / egress defaults

The combination rule itself is written once, in guard/policy/plan.py's docstring. Each
of the last four stages works it out twice per ruleset (rule 5): layer E, the
enforce-mode policies, and layer T, all policies as if enforced; ``combine``
joins the two answers, resolved at each entry, so the kernel needs one lookup.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from guard.errors import Code, Diagnostic, Location, PolicyError
from guard.layout import MAX_PORT_LINES
from guard.policy.model import (
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
from guard.policy.plan import (
    PORT_MAX,
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
    parent_dirs,
)
from guard.policy.text import decision_text, pattern_text, port_text, rule_text, verdict_word
from guard.policy.units import cgroup_contains, check_unit_name, normalize_cgroup, resolve_unit

PROTO_OF = {Protocol.ANY: Proto.ANY, Protocol.TCP: Proto.TCP, Protocol.UDP: Proto.UDP}

RuleKey = tuple[str, str, int]  # (policy, section, index); index -1 for the default


# --- verdicts ------------------------------------------------------------------

NO_RULE = Decision(Verdict.ALLOW, 0)  # nothing matched and no default


def rule_verdict(action: Action) -> Verdict:
    """allow -> ALLOW, audit -> AUDIT, deny -> DENY (plan.py rule 4; modes come in at rule 5)."""
    if action is Action.ALLOW:
        return Verdict.ALLOW
    if action is Action.AUDIT:
        return Verdict.AUDIT
    return Verdict.DENY


def default_verdict(default: Default) -> Verdict:
    return Verdict.DENY if default is Default.DENY else Verdict.ALLOW


def stronger(current: Decision | None, candidate: Decision) -> Decision:
    """The tie-break of plan.py rule 3: the stronger verdict, then the lower rule id."""
    if current is None:
        return candidate
    if (candidate.verdict, -candidate.rule) > (current.verdict, -current.rule):
        return candidate
    return current


def combine(enforced: Decision, trial: Decision) -> Decision:
    """plan.py rule 5: E decides what is blocked; T can only add a report."""
    if enforced.verdict is Verdict.DENY:
        return enforced
    if trial.verdict is Verdict.DENY:
        return Decision(Verdict.WOULD_DENY, trial.rule)
    if enforced.verdict is Verdict.AUDIT:
        return enforced
    if trial.verdict is Verdict.AUDIT:
        return trial
    return enforced if enforced.rule else trial


@dataclass(frozen=True)
class Layers:
    """A ruleset's two views (plan.py rule 5): E, its enforce-mode policies; T, all of them."""

    enforced: tuple[Policy, ...]
    trial: tuple[Policy, ...]


def layers(ruleset: Ruleset, by_name: Mapping[str, Policy]) -> Layers:
    members = tuple(by_name[name] for name in ruleset.policies)
    return Layers(tuple(p for p in members if p.mode is Mode.ENFORCE), members)


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
        raise PolicyError([Diagnostic(Location("<host-cgroup>", 1, 1), Code.SCOPE_CGROUP,
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
                diagnostics.append(Diagnostic(policy.location, Code.SCOPE_CGROUP, str(error)))
        for unit in policy.scope.units:
            problem = None if unit in unit_cgroups else check_unit_name(unit)
            if problem is not None:
                diagnostics.append(Diagnostic(policy.location, Code.SCOPE_UNIT, problem))
                continue
            try:
                paths.add(resolve_unit(unit, unit_cgroups))
            except ValueError as error:
                diagnostics.append(Diagnostic(policy.location, Code.SCOPE_UNIT, str(error)))
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

PathKey = tuple[str, bool]  # (path, subtree)


def resolve_path(decisions: Mapping[PathKey, Decision], key: PathKey) -> Decision | None:
    """The decision one layer gives an access that lands on ``key``: the key's own, else
    the nearest subtree above it (the kernel's walk), else None."""
    if key in decisions:
        return decisions[key]
    for directory in parent_dirs(key[0]):  # for DIR/** too: what is below DIR is below them
        if (directory, True) in decisions:
            return decisions[(directory, True)]
    return None


def _exec_layer(policies: Iterable[Policy], ids: Mapping[RuleKey, int]
                ) -> tuple[dict[PathKey, Decision], Decision | None]:
    """Per (path, subtree) the strongest decision of one layer, and its strongest default."""
    merged: dict[PathKey, Decision] = {}
    default: Decision | None = None
    for policy in policies:
        if policy.exec is None:
            continue
        default = stronger(default, Decision(default_verdict(policy.exec.default),
                                             ids[(policy.name, "exec", -1)]))
        for rule in policy.exec.rules:
            decision = Decision(rule_verdict(rule.action), ids[(policy.name, "exec", rule.index)])
            for pattern in rule.paths:
                key = (pattern.path, pattern.subtree)
                merged[key] = stronger(merged.get(key), decision)
    return merged, default


def exec_entries(
    sets: Iterable[Ruleset], by_name: Mapping[str, Policy], ids: Mapping[RuleKey, int]
) -> tuple[ExecEntry, ...]:
    """Per (ruleset, path, subtree) named by a rule: E and T resolved there, combined."""
    entries: list[ExecEntry] = []
    for ruleset in sets:
        both = layers(ruleset, by_name)
        enforced, enforced_default = _exec_layer(both.enforced, ids)
        trial, trial_default = _exec_layer(both.trial, ids)
        for key in trial:  # T names every key E names
            decision = combine(resolve_path(enforced, key) or enforced_default or NO_RULE,
                               resolve_path(trial, key) or trial_default or NO_RULE)
            entries.append(ExecEntry(ruleset.id, key[0], key[1], decision))
    return tuple(sorted(entries))


def _files_layer(policies: Iterable[Policy], ids: Mapping[RuleKey, int], access: Access
                 ) -> dict[PathKey, Decision]:
    merged: dict[PathKey, Decision] = {}
    for policy in policies:
        if policy.files is None:
            continue
        for rule in policy.files.rules:
            if access not in rule.access:
                continue
            decision = Decision(rule_verdict(rule.action), ids[(policy.name, "files", rule.index)])
            for pattern in rule.paths:
                key = (pattern.path, pattern.subtree)
                merged[key] = stronger(merged.get(key), decision)
    return merged


def file_entries(
    sets: Iterable[Ruleset], by_name: Mapping[str, Policy], ids: Mapping[RuleKey, int]
) -> tuple[FileEntry, ...]:
    """Per (ruleset, path, subtree): read and write decided on their own, as for exec.

    An access no rule at a path names stays None there, so the kernel walks on
    upward, where it finds what resolving here would have found.
    """
    entries: list[FileEntry] = []
    for ruleset in sets:
        both = layers(ruleset, by_name)
        per_access: dict[Access, dict[PathKey, Decision]] = {}
        for access in (Access.READ, Access.WRITE):
            enforced = _files_layer(both.enforced, ids, access)
            trial = _files_layer(both.trial, ids, access)
            per_access[access] = {
                key: combine(resolve_path(enforced, key) or NO_RULE,
                             resolve_path(trial, key) or NO_RULE)
                for key in trial
            }
        reads, writes = per_access[Access.READ], per_access[Access.WRITE]
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


def _egress_layer(policies: Iterable[Policy], ids: Mapping[RuleKey, int]
                  ) -> tuple[dict[IPNetwork, list[_Line]], Decision | None]:
    """One layer's port lines per named network, and its strongest egress default."""
    by_network: dict[IPNetwork, list[_Line]] = {}
    default: Decision | None = None
    for policy in policies:
        if policy.egress is None:
            continue
        default = stronger(default, Decision(default_verdict(policy.egress.default),
                                             ids[(policy.name, "egress", -1)]))
        for rule in policy.egress.rules:
            decision = Decision(rule_verdict(rule.action),
                                ids[(policy.name, "egress", rule.index)])
            for network in rule.to:
                by_network.setdefault(network, []).extend(rule_lines(rule, network, decision))
    return by_network, default


def prefix_lengths(networks: Iterable[IPNetwork]) -> dict[int, list[int]]:
    """Sorted distinct prefix lengths per IP version."""
    lengths: dict[int, set[int]] = {}
    for net in networks:
        lengths.setdefault(net.version, set()).add(net.prefixlen)
    return {version: sorted(found) for version, found in lengths.items()}


def _containing(by_network: Mapping[IPNetwork, list[_Line]], lengths: Mapping[int, list[int]],
                network: IPNetwork) -> list[IPNetwork]:
    """The prefixes of ``by_network`` equal to or containing ``network``.

    Probes one masked address per prefix length present instead of testing
    every prefix, so a rule naming 100,000 CIDRs does not cost 100,000**2 tests.
    """
    address = int(network.network_address)
    width = network.max_prefixlen
    found: list[IPNetwork] = []
    for length in lengths.get(network.version, ()):
        if length > network.prefixlen:
            break
        mask = ((1 << length) - 1) << (width - length)
        candidate = type(network)((address & mask, length))
        if candidate in by_network:
            found.append(candidate)
    return found


def _complete(by_network: Mapping[IPNetwork, list[_Line]], lengths: Mapping[int, list[int]],
              network: IPNetwork, default: Decision) -> list[PortMatch]:
    """The lines for ``network``: its own and those of every shorter prefix containing it,
    in specificity order, then the default; cut after the first catch-all."""
    found = sorted(
        line for other in _containing(by_network, lengths, network) for line in by_network[other]
    )
    # dict.fromkeys: a rule naming one prefix twice must not cost two lines.
    lines = list(dict.fromkeys(item.line for item in found))
    lines.append(PortMatch(Proto.ANY, 0, PORT_MAX, default))
    return _cut(lines)


def _cut(lines: list[PortMatch]) -> list[PortMatch]:
    """Drop the lines no connection can reach: those an earlier line covers entirely,
    which includes everything after the first catch-all."""
    kept: list[PortMatch] = []
    for line in lines:
        if not any(_covers(earlier, line) for earlier in kept):
            kept.append(line)
    return kept


def _overlap(a: PortMatch, b: PortMatch) -> tuple[Proto, int, int] | None:
    """What both lines match, or None."""
    if a.proto is Proto.ANY:
        proto = b.proto
    elif b.proto is Proto.ANY or b.proto is a.proto:
        proto = a.proto
    else:
        return None
    first, last = max(a.first, b.first), min(a.last, b.last)
    return (proto, first, last) if first <= last else None


def _covers(outer: PortMatch, inner: PortMatch) -> bool:
    return (outer.proto is Proto.ANY or outer.proto is inner.proto) and \
        outer.first <= inner.first and inner.last <= outer.last


def combine_tables(enforced: list[PortMatch], trial: list[PortMatch]) -> list[PortMatch]:
    """One first-match table deciding like ``combine(first E match, first T match)``.

    For each E line in order, the T lines that overlap it, in order, each cut to the
    overlap: the first line matching a connection then pairs the first E line and the
    first T line that match it. A DENY line of E needs no split (T cannot change it),
    nor does a line whose pieces would all decide as it does. Both lists end with a
    catch-all, so every connection finds its pair.
    """
    out: list[PortMatch] = []
    for line in enforced:
        if line.decision.verdict is Verdict.DENY:
            out.append(line)
            continue
        pieces: list[PortMatch] = []
        for other in trial:
            both = _overlap(line, other)
            if both is None:
                continue
            pieces.append(PortMatch(*both, combine(line.decision, other.decision)))
            if _covers(other, line):
                break  # every connection this E line matches has found its T line
        if all(piece.decision == line.decision for piece in pieces):
            out.append(line)
        else:
            out += pieces
    return _cut(out)


def _ruleset_tables(
    ruleset: Ruleset, by_name: Mapping[str, Policy], ids: Mapping[RuleKey, int],
    by_id: Mapping[int, RuleRef], problems: dict[int, list[str]],
) -> list[_Table]:
    both = layers(ruleset, by_name)
    enforced, enforced_default = _egress_layer(both.enforced, ids)
    trial, trial_default = _egress_layer(both.trial, ids)
    if trial_default is None:  # no policy of this ruleset has an egress section
        return []
    trial_differs = any(p.egress is not None for p in both.trial if p.mode is Mode.AUDIT)
    networks = set(trial) | {ZERO_V4, ZERO_V6}
    enforced_lengths, trial_lengths = prefix_lengths(enforced), prefix_lengths(trial)
    tables: list[_Table] = []
    for network in sorted(networks, key=_network_order):
        lines = _complete(enforced, enforced_lengths, network, enforced_default or NO_RULE)
        if trial_differs:
            lines = combine_tables(
                lines, _complete(trial, trial_lengths, network, trial_default))
        if len(lines) > MAX_PORT_LINES:
            problems.setdefault(_blame(lines, by_id), []).append(
                f"the port table for {network} in the ruleset of policies "
                f"[{', '.join(ruleset.policies)}] needs {len(lines)} lines")
        tables.append(_Table(ruleset.id, network, tuple(lines)))
    return tables


def _blame(lines: list[PortMatch], by_id: Mapping[int, RuleRef]) -> int:
    """The rule whose line is the first that does not fit; when that is a default,
    the last rule line before it (what pushed the default out)."""
    for line in reversed(lines[: MAX_PORT_LINES + 1]):
        ref = by_id.get(line.decision.rule)
        if ref is not None and ref.index >= 0:
            return ref.id
    return next(line.decision.rule for line in lines if line.decision.rule in by_id)


def egress_entries(
    sets: Iterable[Ruleset], by_name: Mapping[str, Policy], ids: Mapping[RuleKey, int],
    rules: tuple[RuleRef, ...],
) -> tuple[tuple[NetEntry, ...], tuple[PortTable, ...]]:
    """Per ruleset and named prefix, a complete port table; tables deduplicated by content."""
    by_id = {r.id: r for r in rules}
    problems: dict[int, list[str]] = {}
    tables: list[_Table] = []
    for ruleset in sets:
        tables += _ruleset_tables(ruleset, by_name, ids, by_id, problems)
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
        rule.location, Code.PORT_TABLE_LIMIT,
        f"{found[0]}{more}, but the kernel scans at most {MAX_PORT_LINES}, and this rule's "
        f"port lines are where it overflows. A table holds one line per port range of every "
        f"rule at that prefix or a shorter one containing it, plus the default: merge port "
        f"ranges, drop a protocol split, or move rules into a narrower scope",
    )


# --- stage 7: defaults ---------------------------------------------------------


def ruleset_defaults(
    sets: Iterable[Ruleset], by_name: Mapping[str, Policy], ids: Mapping[RuleKey, int]
) -> tuple[RulesetDefaults, ...]:
    """Per ruleset, the exec and egress defaults (None: no policy there has the section).

    Each layer's default is its strongest; the two combine by plan.py rule 5.
    """
    result: list[RulesetDefaults] = []
    for ruleset in sets:
        both = layers(ruleset, by_name)
        exec_e, exec_t = _exec_layer(both.enforced, ids)[1], _exec_layer(both.trial, ids)[1]
        net_e, net_t = _egress_layer(both.enforced, ids)[1], _egress_layer(both.trial, ids)[1]
        result.append(RulesetDefaults(
            ruleset.id,
            None if exec_t is None else combine(exec_e or NO_RULE, exec_t),
            None if net_t is None else combine(net_e or NO_RULE, net_t),
        ))
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
    net, port_tables = egress_entries(sets, by_name, ids, rules)
    return Plan(
        rules=rules,
        rulesets=sets,
        scopes=scopes,
        defaults=ruleset_defaults(sets, by_name, ids),
        exec=exec_entries(sets, by_name, ids),
        files=file_entries(sets, by_name, ids),
        net=net,
        port_tables=port_tables,
    )


# --- a listing for people ------------------------------------------------------


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
