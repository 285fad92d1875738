"""Name the policy set that is applied: a git commit, or a hash of the content.

Operators review policies as pull requests, so the first question about a
running guard is "which commit is it enforcing?". When the policy directory is
inside a git work tree the revision is ``HEAD``'s commit, marked dirty when the
files guard read differ from it; otherwise it is a hash of the files' names and
bytes, which still changes exactly when the policy set does.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Revision:
    kind: str  # "git" | "content"
    id: str  # commit hash, or sha256 of the content
    dirty: bool = False
    content: str = ""  # sha256 of the content, always set

    def __str__(self) -> str:
        if self.kind == "git":
            return f"git:{self.id[:12]}" + ("+dirty" if self.dirty else "")
        return f"sha256:{self.id[:16]}"


def content_hash(files: Sequence[str | Path]) -> str:
    digest = hashlib.sha256()
    for name in sorted(str(f) for f in files):
        try:
            data = Path(name).read_bytes()
        except OSError:
            data = b"\0missing"
        digest.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return digest.hexdigest()


def _git(directory: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-c", "core.fsmonitor=false", "-C", str(directory), *args],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def revision_of(directory: Path, files: Sequence[str | Path]) -> Revision:
    content = content_hash(files)
    commit = _git(directory, "rev-parse", "--verify", "HEAD")
    if commit:
        status = _git(directory, "status", "--porcelain", "--untracked-files=all", "--", ".")
        return Revision("git", commit, dirty=bool(status), content=content)
    return Revision("content", content, content=content)
