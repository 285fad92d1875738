"""Policy YAML the tests write, built in one place.

    policy_text("lock", egress(tcp_rule("deny", 7000)), scope=inside.path)

gives the document a user would write (apiVersion, kind, metadata.name, spec.mode,
spec.scope.cgroups when a scope is given, then the sections), line for line the
same every time: tests assert FILE:LINE locations in it, so the layout of what
these functions return is part of those tests (``policy_text`` puts the first line
of ``body`` on line 7, or on line 9 with a scope; a description moves both down
one).

``compile_dir`` writes one policy into a directory and compiles it the way
``guard run`` does, for the tests that drive guard.kernel.apply directly.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from guard.policy.compile import compile_policies
from guard.policy.parse import load_policy_paths
from guard.policy.plan import Plan


def policy_text(name: str, body: str, *, scope: str | None = None, mode: str = "enforce",
           description: str | None = None) -> str:
    """One policy document. ``body`` is the spec's sections (``network:``, ``exec:``)
    as YAML starting at column 0; it is indented here under ``spec``."""
    text = f"apiVersion: guard/v1\nkind: Policy\nmetadata:\n  name: {name}\n"
    if description is not None:
        text += f"  description: {description}\n"
    text += f"spec:\n  mode: {mode}\n"
    if scope is not None:
        text += f"  scope:\n    cgroups: [{scope}]\n"
    return text + textwrap.indent(body, "  ")


def egress_section(body: str) -> str:
    """``network: egress:`` around ``body``, the egress mapping (default, rules) at any
    common indentation."""
    return "network:\n  egress:\n" + textwrap.indent(textwrap.dedent(body), "    ")


def egress(*rules: str, default: str = "allow") -> str:
    """An egress section with ``default`` and one flow-mapping rule a line
    (``rules: []`` when there is none)."""
    listed = "".join(f"\n  - {rule}" for rule in rules) or " []"
    return egress_section(f"default: {default}\nrules:{listed}\n")


def exec_section(*rules: str, default: str | None = "allow") -> str:
    """An ``exec:`` section: ``default`` (left out when None) and one rule a line."""
    text = "exec:\n" + (f"  default: {default}\n" if default is not None else "")
    return text + "  rules:\n" + "".join(f"    - {rule}\n" for rule in rules)


def tcp_rule(action: str, ports: int | str, to: str = "127.0.0.1/32") -> str:
    """One TCP egress rule as a flow mapping; ``ports`` is written as given (a number,
    or a quoted range such as '"7000-7010"')."""
    return f"{{action: {action}, to: [{to}], ports: [{ports}], protocol: tcp}}"


def compile_dir(directory: Path, name: str, text: str, host_cgroup: str) -> Plan:
    """Make ``text`` the only policy file in ``directory`` (``name``.yaml), load and
    compile it like ``guard run`` with ``host_cgroup``; a policy error fails the test."""
    for old in directory.glob("*.yaml"):
        old.unlink()
    (directory / f"{name}.yaml").write_text(text)
    loaded = load_policy_paths([str(directory)])
    assert not loaded.errors, [str(d) for d in loaded.diagnostics]
    assert loaded.policy_set is not None
    return compile_policies(loaded.policy_set, host_cgroup=host_cgroup, unit_cgroups={})
