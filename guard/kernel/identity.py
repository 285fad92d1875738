"""The kernel's view of one path asked about: which plan paths it would match, by identity.

``guard explain`` asks the pure evaluator (guard.policy.evaluate) about a path;
the kernel does not match that path's text but the file it leads to. This
module works out, on this machine and with apply's own resolution of the plan's
paths (guard.kernel.resolve.path_keys), the keys the kernel meets for the file
and which plan paths registered them:

- the file's EXACT key (its inode) and NAME key (its real parent directory's
  inode + the hash of its real name): the exact plan paths with either key name
  this file (``/bin/sh`` and ``/usr/bin/dash`` when one is a symlink to the other);
- each real parent directory's SUBTREE key, nearest first: the subtree plan
  paths registered under it (a directory by another name, a mount root below one).

The answer is a ``ResolvedPath`` of plain values; when nothing exists at the
path it says so (``real`` None) and the evaluator decides by the text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from guard.kernel.resolve import Match, Resolver, fnv1a64, path_keys
from guard.policy.evaluate import ResolvedPath
from guard.policy.plan import Plan, parent_dirs

_Key = tuple[int, int, int, int]  # (match, ino, dev, name hash), ruleset left out


def plan_paths(plan: Plan) -> list[tuple[str, bool]]:
    """Every (path, subtree) the plan's exec and file entries name, once each."""
    named = {(e.path, e.subtree) for e in plan.exec}
    named |= {(e.path, e.subtree) for e in plan.files}
    return sorted(named)


def resolve_question(paths: Iterable[tuple[str, bool]], path: str,
                     resolver: Resolver | None = None) -> ResolvedPath:
    """How the kernel sees ``path`` (absolute) against the plan ``paths``."""
    resolver = resolver if resolver is not None else Resolver()
    found = resolver.identity(path)
    if found is None:
        return ResolvedPath(None)
    real = resolver.real_path(path)  # as path_keys resolves a rule's path
    file_keys: set[_Key] = {(int(Match.EXACT), found.ino, found.dev, 0)}
    parent, name = os.path.split(real)
    parent_id = resolver.identity(parent) if name else None
    if parent_id is not None:
        file_keys.add((int(Match.NAME), parent_id.ino, parent_id.dev,
                       fnv1a64(os.fsencode(name))))
    same: set[str] = set()
    directories: dict[tuple[int, int], set[str]] = {}
    for plan_path, subtree in paths:
        candidates, _warnings = path_keys(resolver, 0, plan_path, subtree)
        for candidate in candidates:
            key = candidate.key
            if subtree:
                directories.setdefault((key.ino, key.dev), set()).add(plan_path)
            elif (int(key.match), key.ino, key.dev, key.name_hash) in file_keys:
                same.add(plan_path)
    parents: list[frozenset[str]] = []
    for directory in parent_dirs(real):
        seen = resolver.identity(directory)
        names = directories.get((seen.ino, seen.dev), set()) if seen is not None else set()
        parents.append(frozenset(names))
    return ResolvedPath(real, frozenset(same), tuple(parents))
