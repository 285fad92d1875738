"""Why BPF-LSM programs cannot run on this machine, and the exact change that fixes it.

guard's exec, files and tamper families are LSM programs. Most distributions
(Debian, Ubuntu, RHEL, Amazon Linux) build their kernels with CONFIG_BPF_LSM=y
but leave ``bpf`` out of the active LSM list, so an operator needs the one
boot-time change, worded for this machine. ``diagnose`` checks, in order:

1. the kernel's build configuration (/proc/config.gz, else
   /boot/config-RELEASE): without CONFIG_BPF_LSM no boot option helps;
2. the active LSM list (/sys/kernel/security/lsm): without ``bpf`` the fix is
   ``lsm=`` on the kernel command line, listing the LSMs active now followed
   by ``bpf`` (an ``lsm=`` list replaces the built-in one, so leaving one out
   would switch it off), then the boot loader's update command and a reboot;
3. lockdown (/sys/kernel/security/lockdown) in ``confidentiality`` mode, which
   forbids the kernel-memory reads guard's programs make;
4. otherwise, when the probe program was still refused (EPERM with ``bpf``
   active), the kernel cannot attach BPF trampolines here (a nested or
   restricted virtual machine, or a kernel without
   CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS): no command-line change fixes that.

Reads files only; every path can be pointed elsewhere for tests.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

LSM_FILE = Path("/sys/kernel/security/lsm")
LOCKDOWN_FILE = Path("/sys/kernel/security/lockdown")
PROC_CONFIG = Path("/proc/config.gz")
CMDLINE = Path("/proc/cmdline")
GRUB_DEFAULT = Path("/etc/default/grub")
BPF_ACTIVE = "bpf is in the active LSM list (no boot option is missing)"


@dataclass(frozen=True)
class LsmReport:
    """Which reasons hold (each once), and the steps that fix them, in order."""

    reasons: tuple[str, ...]
    remedy: tuple[str, ...] = ()
    lsm_list: str = ""  # the lsm= value to boot with, when that is the fix

    def as_dict(self) -> dict[str, object]:
        return {"reasons": list(self.reasons), "remedy": list(self.remedy),
                "lsm": self.lsm_list}

    def lines(self) -> list[str]:
        """For stderr and ``guard status``: the reasons, then 'fix:' and the steps."""
        out = [f"BPF-LSM is off: {reason}" for reason in self.reasons]
        out += [f"  fix: {step}" for step in self.remedy]
        return out


@dataclass(frozen=True)
class Machine:
    """Where the facts are read from (the real machine by default)."""

    lsm_file: Path = LSM_FILE
    lockdown_file: Path = LOCKDOWN_FILE
    proc_config: Path = PROC_CONFIG
    boot_dir: Path = Path("/boot")
    cmdline: Path = CMDLINE
    grub_default: Path = GRUB_DEFAULT
    release: str = field(default_factory=lambda: os.uname().release)
    which: object = shutil.which  # (name) -> path or None


def kernel_config(machine: Machine) -> str | None:
    """The running kernel's build configuration text, or None when unreadable."""
    try:
        return gzip.decompress(machine.proc_config.read_bytes()).decode(errors="replace")
    except OSError:
        pass
    try:
        return (machine.boot_dir / f"config-{machine.release}").read_text(errors="replace")
    except OSError:
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def lsm_value(active: list[str]) -> str:
    """The lsm= list that adds bpf and keeps every LSM active now, in order."""
    kept = [name for name in active if name and name != "bpf"]
    return ",".join([*kept, "bpf"])


def boot_steps(machine: Machine, value: str) -> list[str]:
    """How to put lsm=VALUE on this machine's kernel command line, and reboot."""
    current = _read(machine.cmdline) or ""
    replaces = any(arg.startswith("lsm=") for arg in current.split())
    edit = (f"replace the lsm=... argument with lsm={value}" if replaces
            else f"add lsm={value}")
    which = machine.which
    assert callable(which)
    if which("grubby"):
        steps = [f'grubby --update-kernel=ALL --args="lsm={value}"']
    elif machine.grub_default.exists() or which("update-grub"):
        update = ("update-grub" if which("update-grub") or not which("grub2-mkconfig")
                  else "grub2-mkconfig -o /boot/grub2/grub.cfg")
        steps = [f"in {machine.grub_default}, {edit} inside GRUB_CMDLINE_LINUX=\"...\"",
                 f"run {update}"]
    else:
        steps = [f"{edit} on the kernel command line of your boot loader"]
    return [*steps, "reboot (the LSM list is fixed at boot); then check that "
            "/sys/kernel/security/lsm ends in ,bpf"]


def diagnose(machine: Machine | None = None, probe_refused: bool = False) -> LsmReport:
    """Why BPF-LSM programs cannot run here and how to fix it; ``probe_refused``:
    the probe program was refused by the kernel (EPERM) even though bpf may be
    listed."""
    m = machine or Machine()
    config = kernel_config(m)
    if config is not None and "CONFIG_BPF_LSM=y" not in config:
        return LsmReport(("the kernel was built without CONFIG_BPF_LSM",),
                         ("boot a kernel built with CONFIG_BPF_LSM=y (Debian, Ubuntu, "
                          "RHEL 9 and Amazon Linux 2023 kernels are)",))
    lsm = _read(m.lsm_file)
    if lsm is None:
        return LsmReport((f"{m.lsm_file} cannot be read (securityfs not mounted?)",),
                         ("mount -t securityfs securityfs /sys/kernel/security, "
                          "then start guard again",))
    active = [name for name in lsm.split(",") if name]
    if "bpf" not in active:
        value = lsm_value(active)
        return LsmReport((f"bpf is not in the active LSM list ({','.join(active)})",),
                         tuple(boot_steps(m, value)), value)
    lockdown = _read(m.lockdown_file) or ""
    if "[confidentiality]" in lockdown:
        return LsmReport(("kernel lockdown is in confidentiality mode, which forbids "
                          "the kernel reads guard's LSM programs make",),
                         ("boot with lockdown=integrity (or without lockdown=confidentiality"
                          "), then reboot",))
    if probe_refused:
        return LsmReport(("bpf is active, but the kernel refused the LSM program (EPERM): "
                          "it cannot attach BPF trampolines here (a nested or restricted "
                          "virtual machine, or a kernel without "
                          "CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS)",),
                         ("no boot option fixes this: run guard where the kernel attaches "
                          "trampolines (bare metal or an ordinary VM); the network family "
                          "is enforced meanwhile",))
    return LsmReport((BPF_ACTIVE,))


_GRUB_LINE = re.compile(r'^(GRUB_CMDLINE_LINUX(?:_DEFAULT)?)="(.*)"\s*$')


def grub_with_lsm(text: str, value: str) -> str:
    """/etc/default/grub's text with ``lsm=VALUE`` in GRUB_CMDLINE_LINUX, and no
    other lsm= argument in it or in GRUB_CMDLINE_LINUX_DEFAULT (the kernel would
    take the last one). Pure; ``./scripts/setup --enable-bpf-lsm`` writes it."""
    lines = text.splitlines()
    found = False
    for number, line in enumerate(lines):
        match = _GRUB_LINE.match(line)
        if match is None:
            continue
        name, args = match[1], [a for a in match[2].split() if not a.startswith("lsm=")]
        if name == "GRUB_CMDLINE_LINUX":
            args.append(f"lsm={value}")
            found = True
        lines[number] = f'{name}="{" ".join(args)}"'
    if not found:
        lines.append(f'GRUB_CMDLINE_LINUX="lsm={value}"')
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``python -m guard.kernel.lsm value``: the lsm= value that fixes this machine
    (exit 1 and the reasons on stderr when no boot option does); ``... grub FILE
    VALUE``: FILE's text with that value, on stdout. Used by scripts/setup."""
    import sys

    if argv[:1] == ["value"]:
        report = diagnose(probe_refused=False)
        if report.lsm_list:
            print(report.lsm_list)
            return 0
        for reason in report.reasons:
            print(f"guard: {reason}", file=sys.stderr)
        return 1
    if len(argv) == 3 and argv[0] == "grub":
        sys.stdout.write(grub_with_lsm(Path(argv[1]).read_text(), argv[2]))
        return 0
    print("usage: python -m guard.kernel.lsm value | grub FILE VALUE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))


__all__ = ["LsmReport", "Machine", "boot_steps", "diagnose", "grub_with_lsm", "kernel_config",
           "lsm_value"]
