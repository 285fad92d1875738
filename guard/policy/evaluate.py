"""Answers from a Plan alone, by the kernel programs' own algorithm, step by step.

The kernel programs are tested against these functions, and ``guard explain``
prints their answers, so what explain says is what the kernel does:

- scope: walk the cgroup's ancestors from the deepest; the first scope entry
  found names the ruleset (guard_scope_walk in bpf/guard_scope.h);
- exec: the file's exact entry, else the nearest ancestor directory with a
  subtree entry, else the ruleset's exec default, else allow;
- open: the same walk over file entries, skipping entries that have no
  decision for the access asked about; files have no default;
- connect: IPv4-mapped IPv6 is IPv4; the longest-prefix net entry of the
  ruleset, then the first line of its port table that matches.

The kernel matches inodes, the evaluator paths. Alone, a path is taken as
given and normalized lexically (``.``, ``..``, ``//``). A caller on a machine
(``guard explain``) resolves it as apply resolves rules and passes what it
found as a ``ResolvedPath`` of plain values: then the file's entries are
those whose EXACT or NAME identity is the file's, and the subtree entries
those whose directory is one of the file's real parent directories, as the
kernel finds them; evaluate itself never touches the file system.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from guard.layout import MAX_CGROUP_DEPTH, MAX_PATH_DEPTH
from guard.policy.plan import (
    Decision,
    ExecEntry,
    FileEntry,
    NetEntry,
    Plan,
    PortMatch,
    Proto,
    RuleRef,
    Ruleset,
    RulesetDefaults,
    ScopeEntry,
    Verdict,
    parent_dirs,
)
from guard.policy.text import decision_text, pattern_text, port_text, rule_text, verdict_word
from guard.policy.units import cgroup_contains, cgroup_parts, normalize_cgroup

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
PROTOCOLS = {"any": Proto.ANY, "tcp": Proto.TCP, "udp": Proto.UDP}


@dataclass(frozen=True)
class Explanation:
    """One decision and how it came about."""

    operation: str  # "exec" | "open" | "connect"
    target: str  # what was asked about, as text
    cgroup: str  # the acting process's cgroup
    verdict: Verdict
    rule: RuleRef | None  # the deciding rule or default; None: no rule applied
    ruleset: Ruleset | None  # None: no policy covers the cgroup
    scope: ScopeEntry | None  # the scope entry that named the ruleset
    entry: ExecEntry | FileEntry | NetEntry | None  # the matched entry, None for a default
    line: PortMatch | None  # connect: the matched line of the entry's port table
    matched: str  # the matched pattern / prefix and ports, or "default"
    why: str  # one sentence: why this and not something else
    notes: tuple[str, ...] = ()

    def render(self) -> str:
        out = [f"{verdict_word(self.verdict)}: {self.operation} {self.target} from {self.cgroup}"]
        if self.rule is not None:
            what = (f"default {verdict_word(self.verdict)}" if self.matched == "default"
                    else f"{verdict_word(self.verdict)} {self.matched}")
            out.append(f"  decided by {self.rule.label} ({self.rule.location}): {what}")
        else:
            out.append("  decided by no rule: allowed")
        out.append(f"  why: {self.why}")
        if self.ruleset is not None and self.scope is not None:
            out.append(f"  scope: {self.scope.cgroup} -> ruleset {self.ruleset.id} "
                       f"(policies: {', '.join(self.ruleset.policies)})")
        out += [f"  note: {note}" for note in self.notes]
        if self.verdict.reported:
            effect = "blocked" if self.verdict.blocks else "allowed"
            out.append(f"  effect: {effect}, and reported as an event")
        return "\n".join(out) + "\n"


# --- scope ---------------------------------------------------------------------


def ruleset_for(plan: Plan, cgroup: str) -> tuple[Ruleset, ScopeEntry] | None:
    """The ruleset of the deepest scope path that is ``cgroup`` or an ancestor of it."""
    path = normalize_cgroup(cgroup)
    best: ScopeEntry | None = None
    for scope in plan.scopes:
        if cgroup_contains(scope.cgroup, path) and (
            best is None or len(cgroup_parts(scope.cgroup)) > len(cgroup_parts(best.cgroup))
        ):
            best = scope
    if best is None:
        return None
    return next(r for r in plan.rulesets if r.id == best.ruleset), best


def _scope_notes(cgroup: str) -> tuple[str, ...]:
    if len(cgroup_parts(cgroup)) >= MAX_CGROUP_DEPTH:
        return (f"the kernel looks at {MAX_CGROUP_DEPTH} cgroup levels; a scope deeper than "
                f"that is not seen there",)
    return ()


def _unscoped(operation: str, target: str, cgroup: str, plan: Plan) -> Explanation:
    scopes = ", ".join(s.cgroup for s in plan.scopes) or "none"
    return Explanation(
        operation, target, cgroup, Verdict.ALLOW, None, None, None, None, None, "",
        f"no policy covers {cgroup} (scope cgroups: {scopes}), so nothing is checked",
        _scope_notes(cgroup))


# --- paths ---------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedPath:
    """How the kernel would see an asked path on one machine, worked out by the caller
    (guard.kernel.identity) with apply's own resolution of the plan's paths.

    ``real`` is None when no file exists at the path: the decision is then by the
    path as written (what a file created there later would meet, by its NAME key).
    """

    real: str | None  # the file's path with every symlink resolved
    same_file: frozenset[str] = frozenset()  # exact plan paths whose identity is the file's
    # per real parent directory, nearest first: the subtree plan paths that are it
    parents: tuple[frozenset[str], ...] = ()


def normalize_path(path: str) -> str:
    """Lexical normalization of an absolute path; ValueError for a relative one."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


@dataclass(frozen=True)
class _PathHit:
    pattern: str
    decision: Decision | None  # None: the entry says nothing about this access
    entry: ExecEntry | FileEntry
    depth: int  # parent directories walked to reach it (0 for the exact entry)


PathEntry = ExecEntry | FileEntry


def _walk(path: str, entries: list[PathEntry], access: str | None,
          resolved: ResolvedPath | None = None) -> list[_PathHit]:
    """Every entry on the kernel's walk for ``path``: the file's, then subtrees nearest first.

    ``access`` picks a FileEntry's read or write decision; None for exec entries.
    With a ``resolved`` file, entries are matched by identity: several exact
    paths can name the file (a symlink and its target), and the kernel takes the
    strongest of their decisions, as for any tie.
    """
    exact = {e.path: e for e in entries if not e.subtree}
    subtree = {e.path: e for e in entries if e.subtree}
    found: list[tuple[str, PathEntry, int]] = []
    if resolved is None or resolved.real is None:
        if path in exact:
            found.append((path, exact[path], 0))
        directories = [frozenset({d}) for d in parent_dirs(path)]
    else:
        same = [exact[p] for p in sorted(resolved.same_file) if p in exact]
        decided = [e for e in same if _decision_of(e, access) is not None]
        if decided or same:
            best = max(decided or same, key=lambda e: _strength(_decision_of(e, access)))
            found.append((best.path, best, 0))
        directories = list(resolved.parents)
    for depth, names in enumerate(directories, start=1):
        there = [subtree[d] for d in names if d in subtree]
        if there:  # two plan directories that are one: the deeper one's key, then the stronger
            entry = max(there, key=lambda e: (len(parent_dirs(e.path)),
                                              _strength(_decision_of(e, access))))
            found.append((pattern_text(entry.path, True), entry, depth))
    return [_PathHit(pattern, _decision_of(entry, access), entry, depth)
            for pattern, entry, depth in found]


def _strength(decision: Decision | None) -> tuple[int, int]:
    """The tie-break of plan.py rule 3 as a sort key: the stronger verdict, the lower rule."""
    return (-1, 0) if decision is None else (int(decision.verdict), -decision.rule)


def _resolved_notes(asked: str, resolved: ResolvedPath | None, hit: str | None) -> list[str]:
    if resolved is None:
        return []
    if resolved.real is None:
        return [f"{asked} does not exist here: decided by the path as written (the kernel "
                f"matches a file created there later by its name)"]
    notes = []
    if resolved.real != asked:
        notes.append(f"{asked} resolves to {resolved.real}: decided by that file's identity, "
                     f"as the kernel does")
    if hit is not None and hit not in (asked, resolved.real):
        notes.append(f"{hit} names the same file (matched by identity)")
    return notes


def _decision_of(entry: PathEntry, access: str | None) -> Decision | None:
    if isinstance(entry, ExecEntry):
        return entry.decision
    return entry.read if access == "read" else entry.write


def _path_explanation(
    plan: Plan, operation: str, target: str, cgroup: str, ruleset: Ruleset, scope: ScopeEntry,
    walk: list[_PathHit], default: Decision | None, what: str, path_notes: list[str],
) -> Explanation:
    notes = list(_scope_notes(cgroup)) + path_notes
    hits = [h for h in walk if h.decision is not None]
    passed = [h.pattern for h in walk[: walk.index(hits[0]) if hits else len(walk)]]
    if passed:
        notes.append(f"nearer entries with no decision for this access were passed over: "
                     f"{', '.join(passed)}")
    if hits:
        hit = hits[0]
        assert hit.decision is not None
        kind = "exact path match" if hit.depth == 0 else f"subtree match on {hit.pattern}"
        if len(hits) > 1:
            other = hits[1]
            assert other.decision is not None
            runner = (f"more specific than {'subtree' if other.depth else 'exact'} "
                      f"{other.pattern} ({decision_text(plan, other.decision)})")
        elif default is not None:
            runner = f"more specific than the ruleset's default ({decision_text(plan, default)})"
        else:
            runner = "no other entry matches"
        rule = plan.rule(hit.decision.rule)
        matched = hit.pattern
        if rule is not None and rule.index < 0:
            # Only plan.py rule 5 puts a default on an entry: an audit-mode policy named
            # this path, and the enforcing policies have no rule for it.
            matched = "default"
            kind += (" (an entry only audit-mode policies name; the enforcing policies' "
                     "default decides, as audit mode never changes what is blocked)")
        if hit.depth > MAX_PATH_DEPTH:
            notes.append(f"the kernel walks at most {MAX_PATH_DEPTH} parent directories; it "
                         f"cannot reach {hit.pattern} and reports the access as undecided")
        return Explanation(
            operation, target, cgroup, hit.decision.verdict, rule, ruleset, scope, hit.entry,
            None, matched, f"{kind}; {runner}", tuple(notes))
    if default is not None:
        return Explanation(
            operation, target, cgroup, default.verdict, plan.rule(default.rule), ruleset, scope,
            None, None, "default",
            f"no {what} rule of ruleset {ruleset.id} matches {target}, so the ruleset's "
            f"default applied", tuple(notes))
    tail = ("no policy there has an exec default" if what == "exec"
            else "file rules have no default")
    return Explanation(
        operation, target, cgroup, Verdict.ALLOW, None, ruleset, scope, None, None, "",
        f"no {what} rule of ruleset {ruleset.id} matches {target} and {tail}, so it is allowed",
        tuple(notes))


def _walk_notes(path: str, entries: list[PathEntry], access: str | None,
                resolved: ResolvedPath | None) -> tuple[list[_PathHit], list[str]]:
    walk = _walk(path, entries, access, resolved)
    file_hit = next((h.entry.path for h in walk if h.depth == 0), None)
    return walk, _resolved_notes(path, resolved, file_hit)


def decide_exec(plan: Plan, cgroup: str, path: str,
                resolved: ResolvedPath | None = None) -> Explanation:
    """Running the file ``path`` from a process in ``cgroup``; by identity when ``resolved``."""
    cgroup = normalize_cgroup(cgroup)
    path = normalize_path(path)
    found = ruleset_for(plan, cgroup)
    if found is None:
        return _unscoped("exec", path, cgroup, plan)
    ruleset, scope = found
    entries: list[PathEntry] = [e for e in plan.exec if e.ruleset == ruleset.id]
    walk, notes = _walk_notes(path, entries, None, resolved)
    return _path_explanation(plan, "exec", path, cgroup, ruleset, scope, walk,
                             _defaults(plan, ruleset).exec, "exec", notes)


def decide_open(plan: Plan, cgroup: str, path: str, access: str,
                resolved: ResolvedPath | None = None) -> Explanation:
    """Opening ``path`` for ``access`` ("read" or "write") from a process in ``cgroup``;
    by identity when ``resolved``."""
    if access not in ("read", "write"):
        raise ValueError(f"access must be read or write, not {access!r}")
    cgroup = normalize_cgroup(cgroup)
    path = normalize_path(path)
    target = f"{path} for {access}"
    found = ruleset_for(plan, cgroup)
    if found is None:
        return _unscoped("open", target, cgroup, plan)
    ruleset, scope = found
    entries: list[PathEntry] = [e for e in plan.files if e.ruleset == ruleset.id]
    walk, notes = _walk_notes(path, entries, access, resolved)
    return _path_explanation(plan, "open", target, cgroup, ruleset, scope, walk, None,
                             "files", notes)


def _defaults(plan: Plan, ruleset: Ruleset) -> RulesetDefaults:
    return next(d for d in plan.defaults if d.ruleset == ruleset.id)


# --- connect -------------------------------------------------------------------


def parse_address(address: str | Address) -> Address:
    """An IP address; an IPv4-mapped IPv6 address becomes its IPv4 address."""
    parsed = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


def _proto(protocol: str | Proto) -> Proto:
    if isinstance(protocol, Proto):
        return protocol
    if protocol.lower() not in PROTOCOLS:
        raise ValueError(f"protocol must be tcp or udp, not {protocol!r}")
    return PROTOCOLS[protocol.lower()]


def line_matches(line: PortMatch, port: int, proto: Proto) -> bool:
    return (line.proto is Proto.ANY or line.proto is proto) and line.first <= port <= line.last


def decide_connect(
    plan: Plan, cgroup: str, address: str | Address, port: int, protocol: str | Proto,
) -> Explanation:
    """An outbound connection (or datagram) to ``address``:``port`` over ``protocol``."""
    cgroup = normalize_cgroup(cgroup)
    addr = parse_address(address)
    proto = _proto(protocol)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0-65535")
    shown = f"[{addr}]" if addr.version == 6 else str(addr)
    target = f"{shown}:{port}/{proto.name.lower()}"
    notes: list[str] = []
    original = ipaddress.ip_address(address) if isinstance(address, str) else address
    if original.version != addr.version:
        shown_original = address if isinstance(address, str) else original
        notes.append(f"{shown_original} is an IPv4-mapped IPv6 address: decided as IPv4 {addr}")
    found = ruleset_for(plan, cgroup)
    if found is None:
        return _unscoped("connect", target, cgroup, plan)
    ruleset, scope = found
    best: NetEntry | None = None
    for entry in plan.net:
        if entry.ruleset != ruleset.id:
            continue
        network = entry.ip_network
        if network.version == addr.version and addr in network and (
            best is None or network.prefixlen > best.ip_network.prefixlen
        ):
            best = entry
    if best is None:
        return Explanation(
            "connect", target, cgroup, Verdict.ALLOW, None, ruleset, scope, None, None, "",
            f"no policy of ruleset {ruleset.id} has an egress section, so it is allowed",
            tuple(notes))
    table = next(t for t in plan.port_tables if t.id == best.table)
    matching = [line for line in table.lines if line_matches(line, port, proto)]
    if not matching:  # the compiler ends every table with a catch-all; kept for safety
        return Explanation(
            "connect", target, cgroup, Verdict.ALLOW, None, ruleset, scope, best, None, "",
            f"no line of the port table for {best.network} matches, so it is allowed",
            tuple(notes))
    line = matching[0]
    rule = plan.rule(line.decision.rule)
    if rule is not None and rule.index < 0:
        return Explanation(
            "connect", target, cgroup, line.decision.verdict, rule, ruleset, scope, best, line,
            "default",
            f"no egress rule of ruleset {ruleset.id} matches {target} (longest prefix: "
            f"{best.network}), so the ruleset's default applied", tuple(notes))
    origin = _line_origin(plan, ruleset, addr, line) or best
    why = f"longest matching prefix {best.network}; first matching line of its port table"
    if origin.network != best.network:
        why += f" (inherited from the shorter prefix {origin.network})"
    if len(matching) > 1:
        after = matching[1]
        why += (f"; next matching line: {verdict_word(after.decision.verdict)} "
                f"{port_text(after)} by {rule_text(plan, after.decision.rule)}")
    return Explanation("connect", target, cgroup, line.decision.verdict, rule, ruleset, scope,
                       best, line, f"to {origin.network} {port_text(line)}", why, tuple(notes))


def _line_origin(plan: Plan, ruleset: Ruleset, addr: Address, line: PortMatch) -> NetEntry | None:
    """The shortest prefix containing ``addr`` whose table holds ``line``: where its rule sits.

    Tables are complete, so a rule's line appears in the table of its own prefix
    and of every longer one; the shortest is the prefix the rule names.
    """
    tables = {t.id: t for t in plan.port_tables}
    found: NetEntry | None = None
    for entry in plan.net:
        network = entry.ip_network
        if (entry.ruleset == ruleset.id and network.version == addr.version and addr in network
                and line in tables[entry.table].lines
                and (found is None or network.prefixlen < found.ip_network.prefixlen)):
            found = entry
    return found


__all__ = [
    "Explanation",
    "ResolvedPath",
    "decide_connect",
    "decide_exec",
    "decide_open",
    "ruleset_for",
]
