"""A policy directory as it is on disk, or as it was at a git revision.

``guard diff OLD NEW`` takes either: a path that exists is read as it is; any
other word is a git revision (``HEAD~1``, a branch, a commit) of the policy
directory (``--policies``, default ``policies``), whose files are taken with
``git ls-tree`` and ``git cat-file`` into a private temporary directory and read from there by the
same loader as any directory, so it is judged exactly as ``guard check`` and
the daemon judge a checkout. Names in messages are given back as
``REV:PATH`` (``HEAD~1:policies/web.yaml:12:9``), never as the temporary path.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class SourceError(ValueError):
    """OLD or NEW is neither a path nor a revision git knows."""


@dataclass(frozen=True)
class Source:
    """One side of a diff: what to load, and how to name it."""

    name: str  # as given: a path or a revision
    path: str  # the directory (or file) to load
    tmp: str = ""  # the temporary directory a revision was archived into

    def relabel(self, text: str) -> str:
        """``text`` with the temporary directory named as the revision."""
        if not self.tmp:
            return text
        return text.replace(self.tmp + "/", f"{self.name}:")


def _git(cwd: Path, *args: str) -> bytes:
    try:
        out = subprocess.run(["git", "--no-optional-locks", "-C", str(cwd), *args],
                             capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SourceError(f"git {' '.join(args)}: {error}") from None
    if out.returncode != 0:
        message = out.stderr.decode(errors="replace").strip().splitlines()
        raise SourceError(f"git {' '.join(args)}: {message[-1] if message else 'failed'}")
    return out.stdout


@contextlib.contextmanager
def open_source(spec: str, policies: str) -> Iterator[Source]:
    """``spec`` as a loadable path, for as long as the context lasts; SourceError when it is
    neither a path nor a revision of the git work tree ``policies`` is in."""
    if Path(spec).exists():
        yield Source(spec, spec)
        return
    where = Path(policies)
    if not where.is_dir():
        raise SourceError(f"{spec!r} is not a path, and {policies!r} (--policies) is not a "
                          f"directory whose git revisions it could name")
    try:
        top = Path(_git(where, "rev-parse", "--show-toplevel").decode().strip())
        prefix = _git(where, "rev-parse", "--show-prefix").decode().strip()
        _git(top, "rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
    except SourceError:
        raise SourceError(f"{spec!r} is neither a path nor a git revision of the "
                          f"repository holding {policies}") from None
    with tempfile.TemporaryDirectory(prefix="guard-diff-") as tmp:
        _checkout(top, spec, prefix, Path(tmp))
        path = Path(tmp) / prefix
        path.mkdir(parents=True, exist_ok=True)  # the directory did not exist then: empty
        yield Source(spec, str(path).rstrip("/"), tmp)


def _checkout(top: Path, revision: str, prefix: str, into: Path) -> None:
    """The regular files under ``prefix`` at ``revision``, written below ``into`` (symbolic
    links and submodules are left out: a policy directory holds files)."""
    listing = _git(top, "ls-tree", "-r", "-z", "--full-tree", revision, "--", prefix or ".")
    for item in listing.split(b"\0"):
        if not item:
            continue
        meta, _, name = item.partition(b"\t")
        mode, kind, blob = meta.decode().split()
        parts = name.decode("utf-8", "surrogateescape").split("/")
        if kind != "blob" or mode not in ("100644", "100755") or any(
                p in ("", ".", "..") for p in parts):
            continue
        target = into.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_git(top, "cat-file", "blob", blob))
