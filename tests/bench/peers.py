"""The bench's rule set for the netfilter peers: iptables chains, nftables chains and sets.

The same k denials guard gets (TCP to k /32 destinations the tested one never
matches, so that every rule is evaluated), as egress (OUTPUT) rules, in the
bench's client network namespace only. Each peer jumps to its rules only for
packets of its own cgroup (iptables ``-m cgroup --path``, nftables ``socket
cgroupv2``), so clients of other engines cross one non-matching cgroup test.

Text generation is pure; ``install``/``remove`` run iptables-restore / nft in
the namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.lab import in_netns
from bench.plans import blocked_address

CGROUP_V1_STYLE_ROOT = Path("/sys/fs/cgroup")  # where nft looks cgroupv2 paths up
IPT_CHAIN = "GBENCH"
NFT_CHAIN_TABLE = "guard_bench_chain"
NFT_SET_TABLE = "guard_bench_set"


class PeerError(RuntimeError):
    pass


def iptables_rules(cgroup: str, k: int) -> str:
    """iptables-restore input: replaces the (namespace's) filter table."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             f":{IPT_CHAIN} - [0:0]", f"-A OUTPUT -m cgroup --path {cgroup} -j {IPT_CHAIN}"]
    lines += [f"-A {IPT_CHAIN} -d {blocked_address(i)}/32 -p tcp -j DROP" for i in range(k)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def nft_cgroup(cgroup_dir: Path, mount: Path) -> tuple[str, int]:
    """(path as nft wants it, level) for ``socket cgroupv2``.

    nft resolves the path below /sys/fs/cgroup at load time (to the cgroup's
    id); the level is the cgroup's depth in the cgroup2 hierarchy.
    """
    try:
        for_nft = cgroup_dir.relative_to(CGROUP_V1_STYLE_ROOT)
    except ValueError:
        raise PeerError(f"nft cannot name {cgroup_dir}: not below {CGROUP_V1_STYLE_ROOT}") \
            from None
    level = len(cgroup_dir.relative_to(mount).parts)
    return str(for_nft), level


def _replace(table: str) -> list[str]:
    # declare then delete: an atomic "replace if present" that nft 1.0 accepts
    return [f"table inet {table}", f"delete table inet {table}"]


def nft_chain_rules(cgroup: str, level: int, k: int) -> str:
    lines = [*_replace(NFT_CHAIN_TABLE), f"table inet {NFT_CHAIN_TABLE} {{",
             "  chain out {", "    type filter hook output priority 0; policy accept;",
             f'    socket cgroupv2 level {level} "{cgroup}" jump bench_rules', "  }",
             "  chain bench_rules {"]
    lines += [f"    ip daddr {blocked_address(i)} meta l4proto tcp drop" for i in range(k)]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def nft_set_rules(cgroup: str, level: int, k: int) -> str:
    lines = [*_replace(NFT_SET_TABLE), f"table inet {NFT_SET_TABLE} {{",
             "  set blocked {", "    type ipv4_addr; flags interval;"]
    if k:
        elements = ",\n      ".join(f"{blocked_address(i)}/32" for i in range(k))
        lines.append(f"    elements = {{\n      {elements}\n    }}")
    lines += ["  }", "  chain out {", "    type filter hook output priority 0; policy accept;",
              f'    socket cgroupv2 level {level} "{cgroup}" ip daddr @blocked '
              "meta l4proto tcp drop", "  }", "}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Installed:
    engine: str
    rules: int
    seconds: float


def install_iptables(netns: str, text: str) -> None:
    done = in_netns(netns, ["iptables-restore"], stdin=text)
    if done.returncode != 0:
        raise PeerError(f"iptables-restore: {done.stderr.strip()[-400:]}")


def install_nft(netns: str, text: str) -> None:
    done = in_netns(netns, ["nft", "-f", "-"], stdin=text)
    if done.returncode != 0:
        raise PeerError(f"nft -f: {done.stderr.strip()[-400:]}")


def remove_all(netns: str) -> list[str]:
    """Flush every peer rule from the namespace; the problems, if any (never raises)."""
    problems = []
    for argv in (["iptables", "-F"], ["iptables", "-X"],
                 ["nft", "delete", "table", "inet", NFT_CHAIN_TABLE],
                 ["nft", "delete", "table", "inet", NFT_SET_TABLE]):
        try:
            done = in_netns(netns, argv, timeout=120)
        except Exception as error:  # keep removing the others
            problems.append(f"{' '.join(argv)}: {error}")
            continue
        if done.returncode != 0 and "No such file" not in done.stderr:
            problems.append(f"{' '.join(argv)}: {done.stderr.strip()}")
    return problems


def tool_versions() -> dict[str, str]:
    import subprocess

    out: dict[str, str] = {}
    for name, argv in (("iptables", ["iptables", "--version"]), ("nft", ["nft", "--version"])):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            out[name] = done.stdout.strip() or done.stderr.strip()
        except OSError as error:
            out[name] = f"missing ({error})"
    return out
