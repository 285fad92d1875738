"""The policy model: what a validated policy file says, as frozen values.

The parser (guard.policy.parse) is the only producer; the compiler (guard.policy.compile) the
only consumer. Every element keeps the Location of the YAML it came from so a
problem found later (at compile or apply time) still points at the file.

Path patterns are deliberately narrow, because the kernel matches identities,
not strings (see docs/semantics.md):

- ``/usr/bin/curl``  an exact file (matched by inode and by its name in its
  parent directory, so symlinks, hard links and bind mounts lead to it);
- ``/tmp/**``        everything below the directory ``/tmp`` (not ``/tmp`` itself).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum

from guard.errors import Location

API_VERSION = "guard/v1"
KIND = "Policy"
TEST_KIND = "PolicyTest"  # a document of policy tests (guard.policy.policytest)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Mode(StrEnum):
    ENFORCE = "enforce"
    AUDIT = "audit"  # log what would be denied, never block


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    AUDIT = "audit"  # allow and log


class Default(StrEnum):
    ALLOW = "allow"
    DENY = "deny"  # allowlist: what no rule allows is denied


class Access(StrEnum):
    READ = "read"
    WRITE = "write"  # open for write, create, truncate, rename, unlink, link


class Protocol(StrEnum):
    ANY = "any"
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True)
class PathPattern:
    """An absolute, normalized path; ``subtree`` when written as ``DIR/**``."""

    path: str
    subtree: bool
    location: Location = field(compare=False)

    def __str__(self) -> str:
        if not self.subtree:
            return self.path
        return "/**" if self.path == "/" else f"{self.path}/**"


@dataclass(frozen=True)
class PortRange:
    """Inclusive port range; a single port has ``first == last``."""

    first: int
    last: int
    location: Location = field(compare=False)

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class ExecRule:
    index: int  # position in the policy's exec.rules list, 0-based
    action: Action
    paths: tuple[PathPattern, ...]
    location: Location = field(compare=False)


@dataclass(frozen=True)
class ExecSection:
    default: Default
    rules: tuple[ExecRule, ...]
    location: Location = field(compare=False)


@dataclass(frozen=True)
class FileRule:
    index: int
    action: Action
    access: frozenset[Access]
    paths: tuple[PathPattern, ...]
    location: Location = field(compare=False)


@dataclass(frozen=True)
class FilesSection:
    rules: tuple[FileRule, ...]
    location: Location = field(compare=False)


@dataclass(frozen=True)
class NetRule:
    index: int
    action: Action
    to: tuple[IPNetwork, ...]  # IPv4-mapped IPv6 networks are stored as IPv4
    ports: tuple[PortRange, ...]  # empty: any port
    protocol: Protocol
    location: Location = field(compare=False)


@dataclass(frozen=True)
class EgressSection:
    default: Default
    rules: tuple[NetRule, ...]
    location: Location = field(compare=False)


@dataclass(frozen=True)
class Scope:
    """Where a policy applies. Both empty: the whole host."""

    cgroups: tuple[str, ...] = ()  # cgroup v2 paths, relative to the cgroup2 mount
    units: tuple[str, ...] = ()  # systemd unit names, resolved to cgroups

    @property
    def whole_host(self) -> bool:
        return not self.cgroups and not self.units


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    mode: Mode
    scope: Scope
    exec: ExecSection | None
    files: FilesSection | None
    egress: EgressSection | None
    location: Location = field(compare=False)  # the document's start


@dataclass(frozen=True)
class PolicySet:
    """Every policy of a directory, sorted by name (names are unique)."""

    policies: tuple[Policy, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.policies]
        if names != sorted(names) or len(set(names)) != len(names):
            raise ValueError("PolicySet wants unique policies sorted by name")
