"""What ``guard status`` says about the policies: per policy and section, enforced or not, and why.

``policy_rows`` is pure: given the policy set, the host cgroup, the families
loaded and those unavailable (with why), and a test for whether a cgroup
exists, it says for every section of every policy one of

- ``enforced``: its program family is loaded and its scope exists (for
  ``mode: audit`` this means "audited": logged, never blocked);
- ``not enforced``: its family cannot run on this kernel (``reason`` says why,
  the same text for every section it affects, and once in ``reasons``);
- ``waiting``: its family is loaded but none of its scope cgroups exists yet;
  the entries are in the maps and apply as soon as the cgroup is made and guard
  resolves it at the next reload.

Rules are counted as written in the file (a section's ``default`` is not a rule).
A policy without a scope covers the host cgroup, shown by its path.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from guard import layout
from guard.kernel.cgroups import CgroupError, cgroup_dir
from guard.kernel.loader import SECTION_FAMILY
from guard.policy.model import Policy, PolicySet
from guard.service import memory

ENFORCED, NOT_ENFORCED, WAITING = "enforced", "not enforced", "waiting"


def written_rules(policy: Policy) -> int:
    """The rules the policy's file lists, over its sections (defaults are not rules)."""
    return sum(len(section.rules) for section in (policy.exec, policy.files, policy.egress)
               if section is not None)


def scope_of(policy: Policy, host_cgroup: str) -> list[str]:
    return [*policy.scope.cgroups, *policy.scope.units] or [host_cgroup]


def policy_rows(policy_set: PolicySet | None, host_cgroup: str, loaded: Sequence[str],
                unavailable: Mapping[str, str],
                exists: Callable[[str], bool]) -> list[dict[str, Any]]:
    """One dict per policy for ``guard status`` (see the module docstring)."""
    if policy_set is None:
        return []
    rows = []
    for policy in policy_set.policies:
        cgroups = list(policy.scope.cgroups)
        # units are resolved to cgroups when the policies are compiled: they exist
        missing = [c for c in cgroups if not exists(c)]
        waiting = bool(cgroups) and len(missing) == len(cgroups) and not policy.scope.units
        sections = []
        for name in ("exec", "files", "egress"):
            if getattr(policy, name) is None:
                continue
            family = SECTION_FAMILY[name]
            if family not in loaded:
                state = NOT_ENFORCED
                reason = unavailable.get(family, f"the {family} programs are not loaded")
            elif waiting:
                state, reason = WAITING, f"waiting for its scope: {', '.join(missing)} " \
                    "does not exist yet"
            else:
                state, reason = ENFORCED, ""
            sections.append({"section": name, "family": family, "state": state,
                             "enforced": state == ENFORCED, "reason": reason})
        rows.append({
            "name": policy.name,
            "mode": str(policy.mode),
            "file": policy.location.file,
            "sections": [s["section"] for s in sections],
            "enforcement": sections,
            "enforced": bool(sections) and all(s["enforced"] for s in sections),
            "scope": scope_of(policy, host_cgroup),
            "host_wide": not (policy.scope.cgroups or policy.scope.units),
            "missing_scope": missing,
            "rules": written_rules(policy),
        })
    return rows


def reason_tags(unavailable: Mapping[str, str]) -> dict[str, tuple[str, list[str]]]:
    """Each distinct reason a family is unavailable, once: reason -> (tag, families)."""
    found: dict[str, tuple[str, list[str]]] = {}
    for family, why in sorted(unavailable.items()):
        if why not in found:
            found[why] = (f"R{len(found) + 1}", [])
        found[why][1].append(family)
    return found


def section_cell(section: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    """``exec: enforced`` / ``exec: NOT enforced [R1]`` / ``egress: waiting for scope``."""
    name, state = section["section"], section["state"]
    if state == ENFORCED:
        return f"{name}: enforced"
    if state == WAITING:
        return f"{name}: waiting for scope"
    return f"{name}: NOT enforced [{tags.get(section['reason'], '?')}]"


def format_families(body: Mapping[str, Any]) -> list[str]:
    """What is loaded, and each reason a family is not, once, with its tag."""
    fam = body["families"]
    lines = [f"enforced: {', '.join(fam['enforced']) or 'nothing'}"]
    for why, (tag, families) in reason_tags(fam["unavailable"]).items():
        lines.append(f"not available [{tag}]: {', '.join(families)}: {why}")
    lsm = body.get("lsm")
    if lsm:
        lines.extend(f"BPF-LSM is off: {reason}" for reason in lsm["reasons"])
        lines.extend(f"  fix: {step}" for step in lsm["remedy"])
    return lines


def format_policies(body: Mapping[str, Any]) -> list[str]:
    """The policy table of ``guard status``: per section, enforced or not ([tag]: the
    reason, listed once above) or waiting for its scope."""
    rows = body.get("policies") or []
    if not rows:
        return []
    tags = {why: tag for why, (tag, _f) in
            reason_tags(body["families"]["unavailable"]).items()}
    width = max(len(p["name"]) for p in rows)
    lines = ["policies:"]
    for p in rows:
        enforcement = p.get("enforcement")
        if enforcement is None:  # a daemon of an earlier guard
            cells = ",".join(p["sections"]) or "-"
        else:
            cells = "; ".join(section_cell(s, tags) for s in enforcement) or "no sections"
        scope = ",".join(p["scope"]) + (" (whole host)" if p.get("host_wide") else "")
        lines.append(f"  {p['name']:<{width}}  {p['mode']:<7}  rules {p['rules']:<3}  "
                     f"{cells}  scope {scope}  ({p['file']})")
        for cgroup in p.get("missing_scope") or []:
            lines.append(f"  {'':<{width}}  scope cgroup {cgroup} does not exist yet")
    return lines


def iso(time_ns: int) -> str:
    return datetime.datetime.fromtimestamp(time_ns / 1e9, datetime.UTC).isoformat(
        timespec="seconds").replace("+00:00", "Z")


def outcome_body(outcome: Any) -> dict[str, Any] | None:
    """A reload outcome (guard.service.daemon.ReloadOutcome) as status shows it."""
    if outcome is None:
        return None
    body = asdict(outcome)
    body["time"] = iso(body.pop("time_ns"))
    return body


def cgroup_exists(path: str) -> bool:
    try:
        return cgroup_dir(path).is_dir()
    except (CgroupError, OSError, ValueError):
        return False


def _watch_body(daemon: Any) -> dict[str, Any]:
    watcher = daemon.watcher
    return {
        "enabled": watcher is not None,
        "error": daemon.watch_error,
        "bursts": watcher.bursts if watcher is not None else 0,
        "rearms": watcher.rearms if watcher is not None else 0,
    }


def daemon_status(d: Any, exists: Callable[[str], bool] = cgroup_exists) -> dict[str, Any]:
    """Everything ``guard status`` shows, from a guard.service.daemon.Daemon ``d``
    (the caller holds its lock)."""
    current = d.current
    rows = policy_rows(current.policy_set if current else None, d.host_cgroup, d.enforced,
                       d.unavailable, exists)
    reader = d.events
    agg = reader.folder.stats()
    sink = d.sink.stats()
    kernel = {name: d.kernel_stat(index) for name, index in (
        ("events", layout.STAT_EVENTS), ("lost", layout.STAT_EVENTS_LOST),
        ("undecided", layout.STAT_UNDECIDED), ("denied", layout.STAT_DENIED),
        ("audited", layout.STAT_AUDITED), ("suppressed", layout.STAT_SUPPRESSED),
        ("tamper", layout.STAT_TAMPER), ("scope_lost", layout.STAT_SCOPE_LOST))}
    return {
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - d.started, 3),
        "started": iso(d.started_ns),
        "policies_dir": d.policies,
        "host_cgroup": d.host_cgroup,
        "revision": str(current.revision) if current else None,
        "revision_detail": current.revision.as_dict() if current else None,
        "generation": d.generation,
        "active_slot": d.active_slot,
        "policies": rows,
        "rules": sum(row["rules"] for row in rows),
        "families": {"enforced": d.enforced, "unavailable": d.unavailable,
                     "unenforced": d.unenforced},
        "lsm": d.lsm_report.as_dict() if d.lsm_report is not None else None,
        "events": {
            "received": reader.received,
            "lines": reader.lines,
            "aggregated": agg.aggregated,
            "pending": agg.pending,
            "delivered": sink.delivered,
            "lost": {"ringbuf": reader.losses.kernel_lost,
                     "reader": reader.losses.reader_lost,
                     "malformed": reader.malformed,
                     "sink": sink.overflow},
        },
        "kernel": kernel,
        "sink": asdict(sink),
        "reloads": d.reloads,
        "last_reload": outcome_body(d.last_reload),
        "last_reload_error": outcome_body(d.last_reload_error),
        "watch": _watch_body(d),
        "pins": d.persistence.status(),
        "paths": d.paths,
        "tamper": {"enabled": "tamper" in d.enforced, "error": d.tamper_error,
                   "denied": kernel["tamper"]},
        "rule_hits": dict(sorted(reader.rule_hits.items())),
        "memory": memory.status_body(d.memory_release),
        "tail": d.hub.stats(),
    }


__all__ = [
    "ENFORCED",
    "NOT_ENFORCED",
    "WAITING",
    "daemon_status",
    "format_policies",
    "iso",
    "outcome_body",
    "policy_rows",
    "reason_tags",
    "written_rules",
]
