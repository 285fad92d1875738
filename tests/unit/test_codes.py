"""The diagnostic code registry (guard.errors.Code) against the source and the docs.

The codes guard can report are found in guard/'s own source, not in a list kept
here: every argument given for a parameter named ``code`` of a guard callable
(``Diagnostic``, and the parser's helpers), and every ``Code.NAME`` used. A
string literal there must be a registered code; ``Code.NAME`` must be a member.
The docs' tables (docs/policy.md, "Diagnostic codes") must list exactly the
registered codes, each in the table of its stage, warnings marked as such.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from guard.errors import Code, Severity, Stage

REPO = Path(__file__).resolve().parents[2]
GUARD = REPO / "guard"
DOC = REPO / "docs" / "policy.md"


@dataclass(frozen=True)
class Use:
    """One place guard's source names a diagnostic code."""

    where: str  # FILE:LINE
    literal: str | None  # the code written as a string
    member: str | None  # the code written as Code.NAME


def _modules() -> list[tuple[str, ast.Module]]:
    return [(str(path.relative_to(REPO)), ast.parse(path.read_text(), str(path)))
            for path in sorted(GUARD.rglob("*.py"))]


@dataclass(frozen=True)
class _Takes:
    """A callable with a ``code`` parameter: where the code goes in a call to it."""

    module: str
    method: bool  # called as obj.NAME(...), and only from its own module
    position: int  # among the positional arguments of a call


def _code_parameters(modules: list[tuple[str, ast.Module]]) -> dict[str, list[_Takes]]:
    """Every guard function, method and class that takes a ``code``, by name."""
    found: dict[str, list[_Takes]] = {}

    def add(name: str, takes: _Takes) -> None:
        found.setdefault(name, []).append(takes)

    for module, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                fields = [s.target.id for s in node.body
                          if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
                init = next((s for s in node.body if isinstance(s, ast.FunctionDef)
                             and s.name == "__init__"), None)
                names = [a.arg for a in init.args.args[1:]] if init is not None else fields
                if "code" in names:
                    add(node.name, _Takes(module, False, names.index("code")))
                for method in node.body:
                    if isinstance(method, ast.FunctionDef) and method.name != "__init__":
                        params = [a.arg for a in method.args.args]
                        if "code" in params and params[:1] == ["self"]:
                            add(method.name, _Takes(module, True, params.index("code") - 1))
            elif isinstance(node, ast.Module):
                for function in node.body:
                    if isinstance(function, ast.FunctionDef):
                        params = [a.arg for a in function.args.args]
                        if "code" in params:
                            add(function.name, _Takes(module, False, params.index("code")))
    return found


def _is_code_class(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "Code") or (
        isinstance(node, ast.Attribute) and node.attr == "Code")


def _values(node: ast.expr) -> Iterator[ast.expr]:
    """What an argument can evaluate to, through conditional expressions."""
    if isinstance(node, ast.IfExp):
        yield from _values(node.body)
        yield from _values(node.orelse)
    else:
        yield node


def code_uses() -> list[Use]:
    modules = _modules()
    takes = _code_parameters(modules)
    uses: list[Use] = []
    for module, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_code_class(node.value) \
                    and node.attr.isupper():
                uses.append(Use(f"{module}:{node.lineno}", None, node.attr))
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else \
                func.attr if isinstance(func, ast.Attribute) else None
            for callee in takes.get(name or "", []):
                if callee.method != isinstance(func, ast.Attribute) or (
                        callee.method and callee.module != module):
                    continue
                argument = next((k.value for k in node.keywords if k.arg == "code"), None)
                if argument is None and len(node.args) > callee.position:
                    argument = node.args[callee.position]
                for value in _values(argument) if argument is not None else ():
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        uses.append(Use(f"{module}:{node.lineno}", value.value, None))
    return uses


def test_the_source_scan_finds_codes_in_every_layer_that_reports_them() -> None:
    where = {use.where.split(":")[0] for use in code_uses()}
    # the parser's helpers, the compiler, and the daemon's reload errors
    assert {"guard/policy/yamlnodes.py", "guard/policy/parse.py", "guard/policy/compile.py",
            "guard/service/daemon.py"} <= where


def test_every_code_guard_can_report_is_registered() -> None:
    unknown = [use for use in code_uses()
               if (use.literal is not None and use.literal not in set(Code))
               or (use.member is not None and use.member not in Code.__members__)]
    assert unknown == [], "register these codes in guard/errors.py (Code)"


def test_every_registered_code_is_reported_somewhere() -> None:
    used = {use.literal for use in code_uses()} | {
        Code[use.member].value for use in code_uses()
        if use.member is not None and use.member in Code.__members__}
    assert sorted(set(Code) - used) == [], "a registered code nothing reports"


def test_codes_are_stable_words() -> None:
    for code in Code:
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", code.value), code.value
        assert code.name == code.value.upper().replace("-", "_")
        assert code.meaning and "\n" not in code.meaning


# --- docs/policy.md ------------------------------------------------------------

ROW_RE = re.compile(r"\| `(?P<code>[^`]+)` \| (?P<meaning>.+) \|")


def documented_tables() -> list[dict[str, str]]:
    """The code tables of the "Diagnostic codes" section, in order: code -> meaning."""
    text = DOC.read_text()
    start = text.index("\n### Diagnostic codes\n")
    end = text.index("\n## ", start)
    tables: list[dict[str, str]] = []
    in_table = False
    for line in text[start:end].splitlines():
        if line.startswith("| code |"):
            tables.append({})
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and (row := ROW_RE.fullmatch(line)):
            assert row["code"] not in tables[-1], f"{row['code']} listed twice"
            tables[-1][row["code"]] = row["meaning"]
    return tables


def test_every_registered_code_is_documented_in_the_table_of_its_stage() -> None:
    tables = documented_tables()
    assert [set(table) for table in tables] == [
        {code.value for code in Code if code.stage is stage} for stage in Stage]


def test_documented_warnings_are_the_registered_warnings() -> None:
    documented = {code for table in documented_tables() for code, meaning in table.items()
                  if meaning.startswith("warning:")}
    assert documented == {code.value for code in Code if code.severity is Severity.WARNING}
