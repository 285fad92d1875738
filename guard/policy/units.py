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

Which names are units a policy can be scoped to is decided once, by
``check_unit_name``: ``guard check`` reports its answer as ``bad-unit``, and a
name it rejects is a ValueError here (units of types that have no cgroup, such
as target, timer, path, device and automount, among them).
"""

from __future__ import annotations

import string
from collections.abc import Mapping

from guard.policy.text import quoted

# Unit types whose processes live in a cgroup of their own (slices: of their units),
# in the order messages list them; the others run nothing to scope a policy to.
CGROUP_UNIT_TYPES = ("service", "scope", "slice", "socket", "mount", "swap")
UNIT_TYPES_WITHOUT_CGROUP = ("target", "timer", "path", "device", "automount")

UNIT_NAME_MAX = 255  # characters (systemd's UNIT_NAME_MAX, 256, counts the NUL)
_VALID_CHARS = frozenset(string.ascii_letters + string.digits + ":-_.\\")
# Controller names systemd checks in its cgroup name escaping.
_CONTROLLERS = frozenset({
    "cpu", "cpuacct", "cpuset", "io", "blkio", "memory", "devices", "pids",
    "bpf-firewall", "bpf-devices", "bpf-foreign", "bpf-socket-bind",
    "bpf-restrict-network-interfaces",
})
_KERNEL_NAMES = frozenset({"notify_on_release", "release_agent", "tasks"})


def check_unit_name(unit: str) -> str | None:
    """Why ``unit`` is not the name of a systemd unit with a cgroup of its own, or None.

    The one rule for unit names in guard: systemd's (unit_name_is_valid and
    slice_name_is_valid) for the unit types that have a cgroup, with at most one
    '@' and no bare template (``getty@.service``), since a template runs nothing.
    """
    if any(c in unit for c in "*?["):
        return f"unit {quoted(unit)}: patterns are not supported; name each unit"
    stem, dot, kind = unit.rpartition(".")
    if not dot or kind not in CGROUP_UNIT_TYPES:
        if dot and kind in UNIT_TYPES_WITHOUT_CGROUP:
            return (f"a .{kind} unit runs no processes of its own: name the unit that does "
                    f"(e.g. the .service it starts)")
        return (f"unit {quoted(unit)} has no unit type suffix; did you mean "
                f"{unit + '.service'!r}? (valid: "
                + ", ".join("." + t for t in CGROUP_UNIT_TYPES) + ")")
    prefix, at, instance = stem.partition("@")
    if not _unit_chars(prefix) or (at and instance and not _unit_chars(instance)):
        return (f"invalid unit name {quoted(unit)}: use letters, digits and ':_.\\-' "
                "(and '@' before an instance)")
    if kind == "slice":
        if at:
            return f"{quoted(unit)}: a slice cannot be a template instance"
        if stem != "-" and (stem.startswith("-") or stem.endswith("-") or "--" in stem):
            return f"{quoted(unit)}: a slice name cannot start or end with '-' or contain '--'"
    if at and not instance:
        return f"{quoted(unit)} is a template: name an instance, e.g. {prefix + '@1.' + kind!r}"
    if len(unit) > UNIT_NAME_MAX:
        return f"unit name is longer than {UNIT_NAME_MAX} characters"
    return None


def _unit_chars(text: str) -> bool:
    return bool(text) and all(c in _VALID_CHARS for c in text)


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
