"""The applied policy set is named by its git commit, or by a content hash."""

from __future__ import annotations

import subprocess
from pathlib import Path

from guard.revision import content_hash, revision_of


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    ).stdout.strip()


def test_content_hash_changes_exactly_with_content(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("one")
    first = content_hash([a])
    assert content_hash([a]) == first
    a.write_text("two")
    assert content_hash([a]) != first


def test_outside_git_the_revision_is_the_content(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("one")
    rev = revision_of(tmp_path, [a])
    assert rev.kind == "content"
    assert rev.id == content_hash([a])
    assert str(rev).startswith("sha256:")


def test_in_git_the_revision_is_the_commit_and_dirtiness(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    a = tmp_path / "a.yaml"
    a.write_text("one")
    git(tmp_path, "add", "a.yaml")
    git(tmp_path, "commit", "-qm", "first")
    head = git(tmp_path, "rev-parse", "HEAD")
    rev = revision_of(tmp_path, [a])
    assert (rev.kind, rev.id, rev.dirty) == ("git", head, False)
    a.write_text("two")
    assert revision_of(tmp_path, [a]).dirty
    assert str(revision_of(tmp_path, [a])).endswith("+dirty")
