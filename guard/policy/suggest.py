"""Learning mode: an allowlist policy for one scope, proposed from a recording.

The recording is what the daemon wrote while the scope ran under an audit-mode
policy (``default: deny`` in ``mode: audit`` reports every exec and connection
as would-deny; a files rule such as ``deny write /**`` in audit mode reports
every write). ``suggest`` reads the operations of processes in the scope that
*ran* (recorded as audit or would-deny) and writes a policy that allows exactly
those, collapsed where that is sensible, and denies the rest of what it learned:

- exec: ``default: deny``; each program run, exactly; a directory becomes
  ``DIR/**`` when at least ``MIN_EXEC_FILES`` programs of it ran, unless it is a
  shared system directory (``BROAD``), a world-writable place (``WRITABLE``), or
  holds a program that was denied. Mappings (op=map) teach nothing: the exec
  default never refuses a mapping.
- files, per access seen: ``deny`` on the narrowest directory holding every
  parent directory seen, and ``allow`` for each file, or its directory as a
  subtree when at least ``MIN_FILE_FILES`` files of it were opened (same limits).
- egress: ``default: deny``; per protocol the destinations seen: addresses of one
  /24 (IPv6: /64) merge into the smallest network holding them when at least
  ``MIN_ADDRESSES`` of them were seen and no denied destination is inside;
  consecutive ports merge into ranges, and more than ``MAX_PORT_RANGES`` ranges of
  one network merge across the smallest gaps (the port table the kernel scans is
  16 lines).

Operations recorded as denied stay denied: nothing is allowed for them, and they
are listed in the header. A section is written only for the operations the
recording holds (no exec events: no exec section). Every choice is said in a
comment next to it, for the reviewer. The result is checked by the caller with
the parser and the compiler, and ``guard replay`` of the same recording under
it shows no operation newly blocked (tests/unit/test_suggest.py).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from guard.policy.parse import NAME_LEN, NAME_RE
from guard.policy.plan import parent_dirs
from guard.policy.recording import Recorded, Recording
from guard.policy.units import cgroup_contains, normalize_cgroup

MIN_EXEC_FILES = 3
MIN_FILE_FILES = 2
MIN_ADDRESSES = 3
MAX_PORT_RANGES = 5  # per network and protocol: leaves room in the 16-line port table
# never collapsed into DIR/**: shared by every program on the machine
BROAD = frozenset({
    "/", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/usr", "/usr/bin", "/usr/sbin",
    "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libexec", "/usr/local", "/usr/local/bin",
    "/usr/local/sbin", "/usr/local/lib", "/usr/share", "/etc", "/home", "/root", "/opt",
    "/srv", "/var", "/var/lib", "/var/log", "/var/cache", "/var/spool", "/run", "/proc",
    "/sys", "/dev", "/boot", "/mnt", "/media",
})
# nothing below these is collapsed: anyone can put a file there
WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/user", "/run/lock", "/var/crash")
RAN = ("audit", "would-deny")


@dataclass(frozen=True)
class Scope:
    """Whom the suggestion is for: the cgroup events are taken from, and how the
    policy names it (a unit, or that cgroup)."""

    cgroup: str
    unit: str = ""


def default_name(scope: Scope) -> str:
    """``nginx.service`` -> ``nginx-allowlist``; ``/batch.slice`` -> ``batch-allowlist``."""
    base = scope.unit or scope.cgroup.rstrip("/").rsplit("/", 1)[-1] or "host"
    stem = base.rsplit(".", 1)[0] if "." in base else base
    word = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "scope"
    suffix = "-allowlist"
    return word[: NAME_LEN - len(suffix)].strip("-") + suffix


def valid_name(name: str) -> bool:
    return len(name) <= NAME_LEN and NAME_RE.fullmatch(name) is not None


def _writable(path: str) -> bool:
    return any(path == w or path.startswith(w + "/") for w in WRITABLE)


def expressible(path: str) -> bool:
    """Whether a recorded path can be written as a policy path (the parser's rules)."""
    if any(c in path for c in "*?[") or any(ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF
                                            for c in path):
        return False
    return path.startswith("/") and "//" not in path and not path.endswith("/") and all(
        part not in (".", "..") for part in path.split("/"))


def _under(path: str, directory: str) -> bool:
    return directory == "/" or path.startswith(directory + "/")


@dataclass(frozen=True)
class PathChoice:
    """One allowed path pattern and why."""

    path: str
    subtree: bool
    note: str

    @property
    def pattern(self) -> str:
        if not self.subtree:
            return self.path
        return "/**" if self.path == "/" else f"{self.path}/**"


def collapse_paths(seen: Counter[str], denied: Iterable[str], min_files: int,
                   root: str | None = None) -> list[PathChoice]:
    """Exact paths, and ``DIR/**`` for a directory with at least ``min_files`` of them
    (never BROAD, WRITABLE, ``root``, nor one holding a denied path)."""
    denied = set(denied)
    by_dir: dict[str, list[str]] = defaultdict(list)
    for path in seen:
        by_dir[parent_dirs(path)[0]].append(path)
    choices: list[PathChoice] = []
    for directory, paths in sorted(by_dir.items()):
        if (len(paths) >= min_files and directory not in BROAD and directory != root
                and not _writable(directory)
                and not any(_under(d, directory) for d in denied)):
            names = ", ".join(sorted(p.rsplit("/", 1)[1] for p in paths))
            choices.append(PathChoice(directory, True, f"{len(paths)} seen: {names}"))
        else:
            choices += [PathChoice(p, False, f"seen {seen[p]}x") for p in sorted(paths)]
    subtrees = [c.path for c in choices if c.subtree]
    # a pattern inside a (shallower) chosen subtree says nothing more
    return [c for c in choices
            if not any(_under(c.path, s) and c.path != s for s in subtrees)]


def common_root(paths: Iterable[str]) -> str:
    """The deepest directory holding the parent directory of every path."""
    parents = [parent_dirs(p)[0].split("/")[1:] if parent_dirs(p)[0] != "/" else []
               for p in paths]
    common: list[str] = []
    for parts in zip(*parents, strict=False) if parents else ():
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    # zip stops at the shortest: that is as deep as every parent goes
    return "/" + "/".join(common)


# --- networks ------------------------------------------------------------------------

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> Address:
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _smallest_network(addrs: list[Address]) -> Network:
    first = addrs[0]
    bits = first.max_prefixlen
    values = [int(a) for a in addrs]
    prefix: int = bits
    while prefix > 0 and len({v >> (bits - prefix) for v in values}) > 1:
        prefix -= 1
    return ipaddress.ip_network(f"{first}/{prefix}", strict=False)


def collapse_addresses(seen: Iterable[Address], denied: Iterable[Address]) -> list[Network]:
    """Host networks, merged per /24 (IPv6: /64) when MIN_ADDRESSES share one and no
    denied address falls in the merged network."""
    denied = list(denied)
    groups: dict[Network, list[Address]] = defaultdict(list)
    for addr in sorted(set(seen), key=lambda a: (a.version, int(a))):
        group = ipaddress.ip_network(f"{addr}/{24 if addr.version == 4 else 64}", strict=False)
        groups[group].append(addr)
    out: list[Network] = []
    for addrs in groups.values():
        merged = _smallest_network(addrs) if len(addrs) >= MIN_ADDRESSES else None
        if merged is not None and not any(d.version == merged.version and d in merged
                                          for d in denied):
            out.append(merged)
        else:
            out += [ipaddress.ip_network(a) for a in addrs]
    return out


def port_ranges(ports: Iterable[int], limit: int = MAX_PORT_RANGES) -> list[tuple[int, int]]:
    """Consecutive ports as ranges; past ``limit`` ranges, the two closest merge."""
    ranges: list[list[int]] = []
    for port in sorted(set(ports)):
        if ranges and port == ranges[-1][1] + 1:
            ranges[-1][1] = port
        else:
            ranges.append([port, port])
    while len(ranges) > limit:
        gap = min(range(len(ranges) - 1), key=lambda i: ranges[i + 1][0] - ranges[i][1])
        ranges[gap][1] = ranges[gap + 1][1]
        del ranges[gap + 1]
    return [(a, b) for a, b in ranges]


# --- the policy ------------------------------------------------------------------------


def _q(text: str) -> str:
    return json.dumps(text)  # a YAML double-quoted scalar


def _range_text(first: int, last: int) -> str:
    return str(first) if first == last else _q(f"{first}-{last}")


@dataclass(frozen=True)
class Suggestion:
    text: str  # the policy file
    learned: int  # operations allowed by it (folded repeats counted)
    denied: int  # operations of the scope recorded as denied: left denied


def suggest(recording: Recording, scope: Scope, name: str) -> Suggestion:
    """The allowlist policy text for ``scope`` from ``recording``; ValueError when the
    recording holds nothing of the scope to learn from."""
    cgroup = normalize_cgroup(scope.cgroup)
    mine = [op for op in recording.operations if cgroup_contains(cgroup, op.cgroup)]
    ran = [op for op in mine if op.action in RAN]
    denied = [op for op in mine if op.action not in RAN]
    if not ran:
        raise ValueError(f"the recording holds no operation that ran in {cgroup} "
                         f"(audit or would-deny events): nothing to learn from")
    skipped: list[str] = []
    sections = [s for s in (_exec_section(ran, denied, skipped),
                            _files_section(ran, denied, skipped),
                            _egress_section(ran, denied)) if s]
    if not sections:
        raise ValueError(f"no operation of {cgroup} can be written as a rule")
    times = sorted(op.time for op in mine if op.time)
    head = [
        f"# An allowlist for {scope.unit or cgroup}, proposed by guard suggest from",
        f"# {sum(op.count for op in ran)} operation(s) that ran there, recorded in "
        f"{', '.join(recording.files)}",
    ]
    if times:
        head.append(f"# between {times[0]} and {times[-1]}.")
    head += [
        "# It allows what the recording shows and denies the rest of each section it",
        "# has: review every line (a collapsed directory or network allows more than",
        "# was seen; the comment beside it says why), then compare it with what is",
        "# enforced now: guard diff OLD NEW --events RECORDING.",
    ]
    if denied:
        shown = sorted({f"{op.op} {op.target}" for op in denied})
        head.append(f"# Left denied ({sum(op.count for op in denied)} operation(s) were denied "
                    f"when recorded): {'; '.join(shown[:10])}"
                    + (f"; ... {len(shown) - 10} more" if len(shown) > 10 else ""))
    head += [f"# Not expressible as a policy path, left out: {p}" for p in skipped]
    if recording.lost:
        head.append(f"# The recording reports {recording.lost} lost event(s): what they were "
                    f"is not in it.")
    where = (f"    units: [{_q(scope.unit)}]" if scope.unit else f"    cgroups: [{_q(cgroup)}]")
    body = [
        "apiVersion: guard/v1",
        "kind: Policy",
        "metadata:",
        f"  name: {name}",
        f"  description: {_q('allowlist learned by guard suggest from ' + recording.files[0])}",
        "spec:",
        "  mode: enforce",
        "  scope:",
        where,
    ]
    text = "\n".join(head + body + [line for s in sections for line in s]) + "\n"
    return Suggestion(text, sum(op.count for op in ran), sum(op.count for op in denied))


def _paths_of(ops: Iterable[Recorded], skipped: list[str]) -> Counter[str]:
    seen: Counter[str] = Counter()
    for op in ops:
        if expressible(op.path):
            seen[op.path] += op.count
        elif repr(op.path) not in skipped:
            skipped.append(repr(op.path))
    return seen


def _exec_section(ran: list[Recorded], denied: list[Recorded], skipped: list[str]) -> list[str]:
    seen = _paths_of((op for op in ran if op.op == "exec"), skipped)
    if not seen:
        return []
    choices = collapse_paths(seen, (op.path for op in denied if op.op == "exec"),
                             MIN_EXEC_FILES)
    out = ["  exec:", "    default: deny        # what is not listed below may not run",
           "    rules:", "      - action: allow", "        paths:"]
    out += [f"          - {_q(c.pattern)}  # {c.note}" for c in choices]
    writable = sorted({c.pattern for c in choices if _writable(c.path)})
    if writable:
        out.insert(3, f"      # beware: programs ran from world-writable places: "
                      f"{', '.join(writable)}")
    return out


def _files_section(ran: list[Recorded], denied: list[Recorded], skipped: list[str]
                   ) -> list[str]:
    out: list[str] = []
    for access in ("read", "write"):
        seen = _paths_of((op for op in ran if op.op == "open" and access in op.access),
                         skipped)
        if not seen:
            continue
        root = common_root(seen)
        choices = collapse_paths(
            seen, (op.path for op in denied if op.op == "open" and access in op.access),
            MIN_FILE_FILES, root=root)
        deny_pattern = "/**" if root == "/" else f"{root}/**"
        out += [
            f"      # {access}: the narrowest directory holding every {access} seen is "
            f"denied, what was seen allowed",
            "      - action: deny",
            f"        access: [{access}]",
            f"        paths: [{_q(deny_pattern)}]",
            "      - action: allow",
            f"        access: [{access}]",
            "        paths:",
        ]
        out += [f"          - {_q(c.pattern)}  # {c.note}" for c in choices]
    return ["  files:", "    rules:", *out] if out else []


def _egress_section(ran: list[Recorded], denied: list[Recorded]) -> list[str]:
    conns = [op for op in ran if op.op == "connect"]
    if not conns:
        return []
    blocked = [_address(op.addr) for op in denied if op.op == "connect"]
    by_proto: dict[str, list[tuple[Address, int]]] = defaultdict(list)
    for op in conns:
        by_proto[op.proto].append((_address(op.addr), op.port))
    out = ["  network:", "    egress:",
           "      default: deny      # no destination but those below", "      rules:"]
    for proto in sorted(by_proto):
        seen = by_proto[proto]
        networks = collapse_addresses((a for a, _ in seen), blocked)
        # per network, its ports; networks with the same ports share a rule
        rules: dict[tuple[tuple[int, int], ...], list[tuple[Network, int]]] = defaultdict(list)
        for network in networks:
            inside = [(a, p) for a, p in seen if a.version == network.version and a in network]
            ports = {p for _, p in inside}
            key = () if 0 in ports else tuple(port_ranges(ports))
            rules[key].append((network, len({a for a, _ in inside})))
        for ports_key, nets in sorted(rules.items(), key=lambda kv: str(kv[1][0][0])):
            out.append("        - action: allow")
            out.append("          to:")
            for network, count in nets:
                note = ("one address" if network.num_addresses == 1
                        else f"{count} addresses seen, merged")
                out.append(f"            - {_q(str(network))}  # {note}")
            if ports_key:
                ranges = ", ".join(_range_text(a, b) for a, b in ports_key)
                seen_ports = {p for a, p in seen for n, _ in nets
                              if a.version == n.version and a in n}
                merged = (f"  # {len(seen_ports)} ports seen, merged across the smallest gaps"
                          if len(port_ranges(seen_ports, limit=65536)) > len(ports_key) else "")
                out.append(f"          ports: [{ranges}]{merged}")
            else:
                out.append("          # any port: a connection without a port (0) was seen")
            if proto != "any":
                out.append(f"          protocol: {proto}")
    return out
