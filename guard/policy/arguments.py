"""Command-line values checked before any work: cgroup paths and unit mappings.

Pure (no kernel, no file system): each function returns the normalized value
or raises ValueError with a message that says what to write instead, so that
``--host-cgroup /sys/fs/cgroup/x`` is refused at once, not after a compile.
"""

from __future__ import annotations

from collections.abc import Iterable

from guard.policy.units import check_unit_name, normalize_cgroup

# where the cgroup2 file system is usually mounted; a cgroup path is written
# relative to the mount (as in /proc/PID/cgroup), never with it
MOUNT_PREFIXES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")


def cgroup_argument(text: str, option: str = "--host-cgroup") -> str:
    """A cgroup v2 path as written in /proc/PID/cgroup (``/system.slice/x.service``)."""
    if not text.startswith("/"):
        raise ValueError(f"{option} {text!r}: a cgroup path starts with / (as in "
                         f"/proc/self/cgroup), e.g. /system.slice/nginx.service")
    for prefix in MOUNT_PREFIXES:
        if text == prefix or text.startswith(prefix + "/"):
            inside = text[len(prefix):] or "/"
            raise ValueError(f"{option} {text!r}: cgroup paths are relative to the cgroup2 "
                             f"mount; write {inside!r}, not {text!r}")
    try:
        return normalize_cgroup(text)
    except ValueError as error:
        raise ValueError(f"{option} {text!r}: {error}") from None


def unit_cgroup_argument(text: str) -> tuple[str, str]:
    """``UNIT=CGROUP``: a systemd unit name and the cgroup path it resolves to."""
    unit, sep, cgroup = text.partition("=")
    if not sep or not unit or not cgroup:
        raise ValueError(f"--unit-cgroup {text!r}: write UNIT=CGROUP, e.g. "
                         "nginx.service=/system.slice/nginx.service")
    problem = check_unit_name(unit)
    if problem is not None:
        raise ValueError(f"--unit-cgroup {text!r}: {problem}")
    return unit, cgroup_argument(cgroup, "--unit-cgroup")


def unit_cgroups(items: Iterable[str]) -> dict[str, str]:
    return dict(unit_cgroup_argument(item) for item in items)


__all__ = ["MOUNT_PREFIXES", "cgroup_argument", "unit_cgroup_argument", "unit_cgroups"]
