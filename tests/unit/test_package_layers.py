"""The package's shape is the architecture (docs/architecture.md): each layer
imports only the layers below it, the pure policy layer nothing of the kernel,
no import cycle, no module past the size a reader takes in at once.

Read from the source (every import statement, function-level ones included),
not from a hand-kept list of modules."""

from __future__ import annotations

import ast
from pathlib import Path

GUARD = Path(__file__).resolve().parents[2] / "guard"

# layer -> the layers it may import (its own included)
ALLOWED = {
    "base": {"base"},
    "policy": {"base", "policy"},
    "kernel": {"base", "policy", "kernel"},
    "events": {"base", "policy", "events"},
    "service": {"base", "policy", "kernel", "events", "service"},
    "cli": {"base", "policy", "kernel", "events", "service", "cli"},
}
BASE_MODULES = {"guard", "guard.errors", "guard.layout"}
CLI_MODULES = {"guard.cli", "guard.__main__"}
MAX_LINES = 850  # "about 800": past it, a module holds more than one thing


def module_name(path: Path) -> str:
    parts = path.relative_to(GUARD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    if module in BASE_MODULES:
        return "base"
    if module in CLI_MODULES:
        return "cli"
    layer = module.split(".")[1]
    assert layer in ALLOWED, f"{module}: not in a known layer (guard/{layer}/)"
    return layer


def guard_imports(path: Path) -> set[str]:
    """Every guard module ``path`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "guard")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "guard":
                continue
            for alias in node.names:  # "from guard.kernel import pin" names a module
                sub = f"{node.module}.{alias.name}"
                is_module = (GUARD.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                found.add(sub if is_module else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): guard_imports(p) for p in GUARD.rglob("*.py")}


def test_every_module_is_in_a_layer_and_imports_only_below_it() -> None:
    wrong = []
    for module, imports in sorted(graph().items()):
        for imported in sorted(imports):
            if layer_of(imported) not in ALLOWED[layer_of(module)]:
                wrong.append(f"{module} ({layer_of(module)}) imports {imported} "
                             f"({layer_of(imported)})")
    assert not wrong, "\n".join(wrong)


def test_the_policy_layer_never_reaches_the_kernel() -> None:
    for path in (GUARD / "policy").rglob("*.py"):
        text = path.read_text()
        assert "bcc" not in guard_imports(path) and "import bcc" not in text, path


def test_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(edges.get(module, ())):
            if nxt == module:
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, module, nxt]))
            if state.get(nxt) is None:
                visit(nxt, [*path, module])
        state[module] = 2

    for module in sorted(edges):
        if state.get(module) is None:
            visit(module, [])


def test_no_module_is_too_long() -> None:
    long = {module_name(p): n for p in GUARD.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_guard_import_anywhere_in_the_tests_resolves() -> None:
    """Function-level imports run only when their test does (some only in the
    guest): an import of a moved module must fail here, on every machine."""
    import importlib

    tests = GUARD.parent / "tests"
    broken = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] == "guard":
                module = importlib.import_module(node.module)
                broken += [f"{path.relative_to(tests)}:{node.lineno}: {node.module}.{a.name}"
                           for a in node.names if not hasattr(module, a.name)
                           and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "guard" and \
                            importlib.util.find_spec(alias.name) is None:
                        broken.append(f"{path.relative_to(tests)}:{node.lineno}: {alias.name}")
    assert not broken, "\n".join(broken)
