"""Where systemd puts a unit's processes in the cgroup v2 tree, by convention alone.

Pure: no D-Bus, no file system. The compiler uses this for ``scope.units`` when
no explicit mapping is given (``--unit-cgroup UNIT=CGROUP`` or the daemon's own
lookup overrides it), so a unit whose ``Slice=`` is customised must be mapped.

The convention (system manager, as systemd places units without ``Slice=``):

- ``a-b-c.slice``        -> ``/a.slice/a-b.slice/a-b-c.slice``; ``-.slice`` is ``/``
- ``foo.service``        -> ``/system.slice/foo.service``
  (likewise ``.socket``, ``.mount``, ``.swap`` and ``.scope``: a system scope made
  with ``systemd-run --scope`` lands in system.slice; login session scopes live
  under ``/user.slice/user-UID.slice`` and need the explicit mapping)
- ``getty@tty1.service`` -> ``/system.slice/system-getty.slice/getty@tty1.service``
  (template instances get a per-template slice; ``-`` in the template name is
  escaped as ``\\x2d``, as systemd does)

Each path component is escaped as systemd does for cgroup directory names: a
name that could clash with a kernel file (``tasks``, ``cgroup.*``,
``cpu.service``: a controller name before the last dot) or that starts with
``_`` or ``.`` gets one leading ``_``.

Units of types that have no cgroup (target, timer, path, device, automount)
are rejected with ValueError.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping

# Unit types systemd gives a cgroup; slices are handled on their own.
CGROUP_UNIT_TYPES = frozenset({"service", "socket", "mount", "swap", "scope", "slice"})
ALL_UNIT_TYPES = CGROUP_UNIT_TYPES | {"target", "timer", "path", "device", "automount"}

UNIT_NAME_MAX = 255
_VALID_CHARS = frozenset(string.ascii_letters + string.digits + ":-_.\\")
# Controller names systemd checks in its cgroup name escaping.
_CONTROLLERS = frozenset({
    "cpu", "cpuacct", "cpuset", "io", "blkio", "memory", "devices", "pids",
    "bpf-firewall", "bpf-devices", "bpf-foreign", "bpf-socket-bind",
    "bpf-restrict-network-interfaces",
})
_KERNEL_NAMES = frozenset({"notify_on_release", "release_agent", "tasks"})
_UNIT_RE = re.compile(r"^(?P<prefix>[^@]+)(?:@(?P<instance>[^@]*))?\.(?P<type>[a-z]+)$")


def check_unit_name(unit: str) -> str | None:
    """Why ``unit`` is not a unit name that has a cgroup, or None when it is fine."""
    if not unit or len(unit) > UNIT_NAME_MAX:
        return f"unit name {unit!r} is empty or longer than {UNIT_NAME_MAX} characters"
    match = _UNIT_RE.match(unit)
    if match is None:
        return f"{unit!r} is not a systemd unit name (NAME.TYPE or TEMPLATE@INSTANCE.TYPE)"
    kind = match["type"]
    if kind not in ALL_UNIT_TYPES:
        return f"{unit!r} has unknown unit type {kind!r}"
    if kind not in CGROUP_UNIT_TYPES:
        return f"{unit!r}: a .{kind} unit has no cgroup of its own; name its service instead"
    body = unit[: -len(kind) - 1]
    if any(c not in _VALID_CHARS and c != "@" for c in body):
        return f"{unit!r} contains characters systemd does not allow in unit names"
    if kind == "slice":
        if match["instance"] is not None:
            return f"{unit!r}: a slice cannot be a template instance"
        if body != "-" and (body.startswith("-") or body.endswith("-") or "--" in body):
            return f"{unit!r}: a slice name cannot start or end with '-' or contain '--'"
    elif match["instance"] == "":
        return f"{unit!r} is a template, not a unit that runs; name an instance"
    return None


def cg_escape(name: str) -> str:
    """One cgroup directory name for a unit name, as systemd escapes it."""
    clash = (
        name == ""
        or name[0] in "_."
        or name in _KERNEL_NAMES
        or name.startswith("cgroup.")
        or ("." in name and name[: name.rindex(".")] in _CONTROLLERS)
    )
    return "_" + name if clash else name


def unit_name_escape(text: str) -> str:
    """systemd's escaping of a string into one unit-name component (``-`` -> ``\\x2d``)."""
    out: list[str] = []
    for i, char in enumerate(text):
        if char == "/":
            out.append("-")
        elif char in "-\\" or char not in _VALID_CHARS or (i == 0 and char == "."):
            out.append("".join(f"\\x{b:02x}" for b in char.encode()))
        else:
            out.append(char)
    return "".join(out)


def slice_path(slice_unit: str) -> str:
    """``a-b.slice`` -> ``/a.slice/a-b.slice``; ``-.slice`` -> ``/``."""
    body = slice_unit.removesuffix(".slice")
    if body == "-":
        return "/"
    parts = body.split("-")
    names = ["-".join(parts[: i + 1]) + ".slice" for i in range(len(parts))]
    return "/" + "/".join(cg_escape(n) for n in names)


def unit_cgroup(unit: str) -> str:
    """The cgroup v2 path (relative to the cgroup2 mount) systemd uses for ``unit``."""
    problem = check_unit_name(unit)
    if problem is not None:
        raise ValueError(problem)
    if unit.endswith(".slice"):
        return slice_path(unit)
    if "@" in unit:
        template = unit.split("@", 1)[0]
        parent = slice_path(f"system-{unit_name_escape(template)}.slice")
    else:
        parent = slice_path("system.slice")
    return f"{parent}/{cg_escape(unit)}"


def resolve_unit(unit: str, mapping: Mapping[str, str] | None = None) -> str:
    """The mapping's cgroup for ``unit`` when it has one, else the convention."""
    if mapping and unit in mapping:
        return normalize_cgroup(mapping[unit])
    return unit_cgroup(unit)


def normalize_cgroup(path: str) -> str:
    """``/a//b/`` -> ``/a/b``; ``""`` -> ``/``. Rejects ``.`` and ``..`` components."""
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"cgroup path {path!r} may not contain '.' or '..'")
    return "/" + "/".join(parts)


def cgroup_parts(path: str) -> tuple[str, ...]:
    """Components of a normalized cgroup path; the root has none."""
    return tuple(p for p in path.split("/") if p)


def cgroup_contains(ancestor: str, path: str) -> bool:
    """True when ``path`` is ``ancestor`` or below it, component-wise (/a/bc is not under /a/b)."""
    top = cgroup_parts(ancestor)
    return cgroup_parts(path)[: len(top)] == top
