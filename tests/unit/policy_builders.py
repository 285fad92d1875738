"""Compact constructors for policy model values, so unit tests need no parser.

Each rule gets a distinct, predictable location: file ``NAME.yaml``, line
``10 * section + index``, so labels and ``file:line`` in output are checkable.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from guard.errors import Location
from guard.policy.model import (
    Access,
    Action,
    Default,
    EgressSection,
    ExecRule,
    ExecSection,
    FileRule,
    FilesSection,
    IPNetwork,
    Mode,
    NetRule,
    PathPattern,
    Policy,
    PolicySet,
    PortRange,
    Protocol,
    Scope,
)

SECTION_LINE = {"exec": 100, "files": 200, "egress": 300}

ExecSpec = tuple[str, Sequence[str]]  # (action, paths)
FileSpec = tuple[str, str, Sequence[str]]  # (action, "r" | "w" | "rw", paths)
Port = int | tuple[int, int]
NetSpec = tuple[str, Sequence[str], Sequence[Port], str]  # (action, to, ports, protocol)


def loc(policy: str, section: str, index: int) -> Location:
    return Location(f"{policy}.yaml", SECTION_LINE[section] + index + 1, 9)


def pattern(text: str, where: Location) -> PathPattern:
    if text == "/**":
        return PathPattern("/", True, where)
    if text.endswith("/**"):
        return PathPattern(text[:-3], True, where)
    return PathPattern(text, False, where)


def network(text: str) -> IPNetwork:
    net = ipaddress.ip_network(text)
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None \
            and net.prefixlen >= 96:
        # the model stores IPv4-mapped IPv6 networks as IPv4
        return ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    return net


def policy(
    name: str,
    *,
    mode: str = "enforce",
    cgroups: Iterable[str] = (),
    units: Iterable[str] = (),
    exec_default: str | None = None,
    exec_rules: Sequence[ExecSpec] = (),
    files: Sequence[FileSpec] | None = None,
    egress_default: str | None = None,
    egress: Sequence[NetSpec] = (),
) -> Policy:
    """A policy; a section exists when its default (exec, egress) or its rules (files) are given."""
    exec_section = None
    if exec_default is not None:
        exec_section = ExecSection(
            Default(exec_default),
            tuple(
                ExecRule(i, Action(action), tuple(pattern(p, loc(name, "exec", i)) for p in paths),
                         loc(name, "exec", i))
                for i, (action, paths) in enumerate(exec_rules)
            ),
            Location(f"{name}.yaml", SECTION_LINE["exec"], 3),
        )
    files_section = None
    if files is not None:
        files_section = FilesSection(
            tuple(
                FileRule(
                    i, Action(action),
                    frozenset(a for flag, a in (("r", Access.READ), ("w", Access.WRITE))
                              if flag in access),
                    tuple(pattern(p, loc(name, "files", i)) for p in paths),
                    loc(name, "files", i),
                )
                for i, (action, access, paths) in enumerate(files)
            ),
            Location(f"{name}.yaml", SECTION_LINE["files"], 3),
        )
    egress_section = None
    if egress_default is not None:
        egress_section = EgressSection(
            Default(egress_default),
            tuple(
                NetRule(
                    i, Action(action), tuple(network(t) for t in to),
                    tuple(PortRange(p, p, loc(name, "egress", i)) if isinstance(p, int)
                          else PortRange(p[0], p[1], loc(name, "egress", i)) for p in ports),
                    Protocol(protocol), loc(name, "egress", i),
                )
                for i, (action, to, ports, protocol) in enumerate(egress)
            ),
            Location(f"{name}.yaml", SECTION_LINE["egress"], 3),
        )
    return Policy(
        name=name, description="", mode=Mode(mode),
        scope=Scope(tuple(cgroups), tuple(units)),
        exec=exec_section, files=files_section, egress=egress_section,
        location=Location(f"{name}.yaml", 1, 1),
    )


def policy_set(*policies: Policy) -> PolicySet:
    return PolicySet(tuple(sorted(policies, key=lambda p: p.name)))
