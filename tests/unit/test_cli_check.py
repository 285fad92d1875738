"""``guard check`` over the fixture directories: every diagnostic at its exact place, in one run.

Each file in tests/fixtures/broken/ carries its expected diagnostics, as trailing
comment lines ``# expect: LINE:COL [warning] [CODE] MESSAGE`` or, for files that
cannot hold comments where they would not move the positions (binary garbage,
problems at the end of the stream), in a sidecar ``NAME.expected`` with the same
lines without the ``# expect:`` prefix. MESSAGE is matched as a fragment of the
reported message; ``...`` in it stands for any text. The run must report exactly
the expected diagnostics: nothing missing, nothing extra.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from support import need

import guard.policy.yamlnodes
from guard.cli import main
from guard.errors import Code, Diagnostic, Stage
from guard.policy.parse import load_policy_paths

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
BROKEN = FIXTURES / "broken"
VALID = FIXTURES / "valid"
POLICIES = REPO / "policies"

EXPECT_RE = re.compile(
    r"(?P<line>\d+):(?P<col>\d+)\s+(?:(?P<severity>warning|error)\s+)?"
    r"\[(?P<code>[a-z-]+)\]\s+(?P<fragment>.+)")
OUTPUT_RE = re.compile(r"(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<severity>error|warning): "
                       r"(?P<message>.*)")
CHECK_CODES = {code.value for code in Code if code.stage is Stage.CHECK}
# Codes that need a situation a fixture directory cannot hold; test_parse covers them,
# and test_check_shadow covers shadowed-rule (found only in a valid policy set).
CODES_TESTED_ELSEWHERE = {"path-not-found", "read-error", "file-too-large", "too-many-errors",
                          "shadowed-rule"}


@pytest.fixture(params=["libyaml", "python"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each YAML parser guard can use: positions must not differ."""
    if request.param == "libyaml":
        need(yaml.__with_libyaml__, "PyYAML without libyaml (Debian's python3-yaml has it)")
    monkeypatch.setattr(guard.policy.yamlnodes, "USE_LIBYAML", request.param == "libyaml")
    return str(request.param)


@dataclass(frozen=True)
class Expected:
    file: str  # base name
    line: int
    col: int
    severity: str
    code: str
    fragment: str

    def matches(self, file: str, line: int, col: int, severity: str, message: str,
                code: str | None) -> bool:
        if (Path(file).name, line, col, severity) != (self.file, self.line, self.col,
                                                      self.severity):
            return False
        if code is not None and code != self.code:
            return False
        position = 0
        for part in self.fragment.split("..."):
            found = message.find(part, position)
            if found < 0:
                return False
            position = found + len(part)
        return True


def _policy_files(directory: Path) -> list[Path]:
    """What the directory walk must read: *.yaml/*.yml below, no dot-names anywhere."""
    return sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml")
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def _expectations(path: Path) -> list[Expected]:
    sidecar = path.with_name(path.name + ".expected")
    if sidecar.exists():
        lines = sidecar.read_text().splitlines()
    else:
        text = path.read_bytes().decode("utf-8", errors="replace")
        lines = [line.split("# expect:", 1)[1] for line in text.splitlines()
                 if line.startswith("# expect:")]
    found = []
    for line in lines:
        match = EXPECT_RE.fullmatch(line.strip())
        assert match, f"{path.name}: malformed expectation {line!r}"
        found.append(Expected(path.name, int(match["line"]), int(match["col"]),
                              match["severity"] or "error", match["code"], match["fragment"]))
    return found


def _all_expectations() -> list[Expected]:
    return [e for path in _policy_files(BROKEN) for e in _expectations(path)]


def _match_all(actual: list[tuple[str, int, int, str, str, str | None]],
               expected: list[Expected]) -> None:
    """Pair every actual diagnostic with one expectation; fail on anything left over."""
    unmatched = list(expected)
    extra = []
    for file, line, col, severity, message, code in actual:
        for candidate in unmatched:
            if candidate.matches(file, line, col, severity, message, code):
                unmatched.remove(candidate)
                break
        else:
            extra.append(f"{Path(file).name}:{line}:{col}: {severity}: [{code}] {message}")
    missing = [f"{e.file}:{e.line}:{e.col}: {e.severity}: [{e.code}] {e.fragment}"
               for e in unmatched]
    assert not extra and not missing, (
        "unexpected:\n  " + "\n  ".join(extra) + "\nmissing:\n  " + "\n  ".join(missing))


def _parse_output(stderr: str) -> list[tuple[str, int, int, str, str, str | None]]:
    found: list[tuple[str, int, int, str, str, str | None]] = []
    for line in stderr.splitlines():
        if line.startswith("guard check:"):
            continue
        match = OUTPUT_RE.fullmatch(line)
        assert match, f"not a FILE:LINE:COL diagnostic: {line!r}"
        found.append((match["file"], int(match["line"]), int(match["col"]), match["severity"],
                      match["message"], None))
    return found


def _assert_sorted(rows: list[tuple[str, int, int, str, str, str | None]]) -> None:
    keys = [(file, line, col) for file, line, col, *_ in rows]
    assert keys == sorted(keys)


def test_every_broken_fixture_says_what_it_expects() -> None:
    files = _policy_files(BROKEN)
    assert len(files) >= 20
    for path in files:
        assert _expectations(path), f"{path.name} has no expectations"
        if path.name != "empty-file.yaml" and path.name != "empty-document.yaml":
            assert any(e.severity == "error" for e in _expectations(path)), path.name


def test_every_code_has_a_broken_fixture() -> None:
    covered = {e.code for e in _all_expectations()}
    assert covered <= CHECK_CODES
    missing = CHECK_CODES - CODES_TESTED_ELSEWHERE - covered
    assert not missing, f"no fixture for {sorted(missing)}"
    assert all(e.severity == Code(e.code).severity for e in _all_expectations())


def test_load_reports_exactly_the_expected_diagnostics_with_codes(backend: str) -> None:
    result = load_policy_paths([str(BROKEN)])
    assert result.policy_set is None
    assert [Path(f).name for f in result.files] == [p.name for p in _policy_files(BROKEN)]
    rows = [(d.location.file, d.location.line, d.location.col, d.severity, d.message, d.code)
            for d in result.diagnostics]
    _match_all(rows, _all_expectations())
    assert list(result.diagnostics) == sorted(result.diagnostics)
    assert all(isinstance(d, Diagnostic) for d in result.errors)


def test_check_reports_every_error_in_one_run(backend: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(BROKEN)]) == 1
    captured = capsys.readouterr()
    rows = _parse_output(captured.err)
    _match_all(rows, _all_expectations())
    _assert_sorted(rows)
    errors = sum(1 for e in _all_expectations() if e.severity == "error")
    assert f"guard check: {errors} error(s) in {len(_policy_files(BROKEN))} file(s)" in captured.err
    assert captured.out == ""


def test_check_as_a_subprocess() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "guard", "check", "tests/fixtures/broken"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    rows = _parse_output(done.stderr)
    assert all(file.startswith("tests/fixtures/broken/") for file, *_ in rows)
    _match_all(rows, _all_expectations())
    _assert_sorted(rows)


def test_valid_fixtures_pass(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    files = _policy_files(VALID)
    assert len(files) >= 5
    # The walk reads exactly these (recursively; dot-names and editor backups, which are
    # broken on purpose, skipped), in sorted order.
    assert load_policy_paths([str(VALID)]).files == tuple(str(p) for p in files)
    assert main(["check", str(VALID)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert f"in {len(files)} file(s) are valid" in captured.out
    for path in files:
        assert main(["check", str(path)]) == 0, path.name
        assert capsys.readouterr().err == "", path.name


def test_shipped_example_policies_are_valid(capsys: pytest.CaptureFixture[str]) -> None:
    # policies/ is what users start from: it must hold examples, and every one must pass
    # without even a warning.
    files = load_policy_paths([str(POLICIES)]).files
    assert files, "policies/ holds no example policy"
    assert main(["check", str(POLICIES)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert f"in {len(files)} file(s) are valid" in captured.out


def test_a_missing_path_is_an_error_at_its_first_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["check", str(VALID), str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"{missing}:1:1: error: no such file or directory" in err.splitlines()


def test_valid_and_broken_together_still_fail(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(VALID), str(BROKEN / "bad-ports.yaml")]) == 1
    rows = _parse_output(capsys.readouterr().err)
    _match_all(rows, _expectations(BROKEN / "bad-ports.yaml"))
