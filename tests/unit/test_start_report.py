"""The start's lines (once, labelled once, timed), the BPF-LSM remedy, and status per section."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

from support.policies import egress, exec_section, policy_text, tcp_rule

from guard.events.formats import SEV_ERR, SEV_INFO, SEV_WARNING
from guard.kernel.loader import cflags, unenforced
from guard.kernel.lsm import Machine, diagnose, lsm_value
from guard.policy.load import PolicyLoad, load_policies
from guard.service.control import format_status
from guard.service.report import (
    ENFORCED,
    NOT_ENFORCED,
    WAITING,
    format_policies,
    policy_rows,
    reason_tags,
)
from guard.service.startup import Progress, stderr_line


def test_labels_are_never_doubled() -> None:
    assert stderr_line(SEV_ERR, "/p/a.yaml:3:5: error: bad") == "guard: /p/a.yaml:3:5: error: bad"
    assert stderr_line(SEV_WARNING, "/opt/x/**: warning: no dir") == \
        "guard: /opt/x/**: warning: no dir"
    assert stderr_line(SEV_ERR, "loading failed") == "guard: error: loading failed"
    assert stderr_line(SEV_WARNING, "not watching") == "guard: warning: not watching"
    assert stderr_line(SEV_INFO, "enforcing") == "guard: enforcing"


def test_progress_one_line_per_stage_with_its_time() -> None:
    out = io.StringIO()
    ticks = iter([10.0, 10.25, 20.0, 21.5])
    progress = Progress(out, clock=lambda: next(ticks))
    with progress.stage("compile") as done:
        done("2 policies")
    with progress.stage("load", "compiling") as done:
        done("net loaded")
    assert out.getvalue().splitlines() == [
        "guard: compile: 2 policies (250 ms)",
        "guard: load: compiling...",
        "guard: load: net loaded (1.5 s)",
    ]


def test_cflags_silence_kernel_header_warnings() -> None:
    flags = cflags()
    assert "-Wno-ignored-attributes" in flags  # 'nocf_check' attribute ignored
    assert not any(flag.startswith("-Werror") or flag == "-w" for flag in flags)


# --- the BPF-LSM remedy -------------------------------------------------------------


def machine(tmp_path: Path, lsm: str | None, config: str = "CONFIG_BPF_LSM=y\n",
            grub: bool = True, cmdline: str = "quiet", lockdown: str = "[none] integrity",
            tools: tuple[str, ...] = ("update-grub",)) -> Machine:
    (tmp_path / "config.gz").write_bytes(gzip.compress(config.encode()))
    if lsm is not None:
        (tmp_path / "lsm").write_text(lsm + "\n")
    (tmp_path / "lockdown").write_text(lockdown + "\n")
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    if grub:
        (tmp_path / "grub").write_text('GRUB_CMDLINE_LINUX=""\n')
    return Machine(lsm_file=tmp_path / "lsm", lockdown_file=tmp_path / "lockdown",
                   proc_config=tmp_path / "config.gz", boot_dir=tmp_path,
                   cmdline=tmp_path / "cmdline", grub_default=tmp_path / "grub",
                   release="6.1.0-test", which=lambda name: name if name in tools else None)


def test_lsm_list_keeps_the_active_ones_and_adds_bpf() -> None:
    assert lsm_value(["lockdown", "capability", "landlock", "yama", "apparmor"]) == \
        "lockdown,capability,landlock,yama,apparmor,bpf"
    assert lsm_value(["capability", "bpf", "selinux"]) == "capability,selinux,bpf"


def test_bpf_missing_from_the_lsm_list_gives_the_grub_edit(tmp_path: Path) -> None:
    report = diagnose(machine(tmp_path, "lockdown,capability,landlock,yama,apparmor"))
    assert report.reasons == ("bpf is not in the active LSM list "
                              "(lockdown,capability,landlock,yama,apparmor)",)
    assert report.lsm_list == "lockdown,capability,landlock,yama,apparmor,bpf"
    assert report.remedy[0] == (f"in {tmp_path / 'grub'}, add "
                                "lsm=lockdown,capability,landlock,yama,apparmor,bpf inside "
                                'GRUB_CMDLINE_LINUX="..."')
    assert report.remedy[1] == "run update-grub"
    assert report.remedy[2].startswith("reboot")
    assert report.lines()[0].startswith("BPF-LSM is off: bpf is not in")
    assert report.lines()[1].startswith("  fix: in ")


def test_an_lsm_argument_already_there_is_replaced(tmp_path: Path) -> None:
    report = diagnose(machine(tmp_path, "capability,selinux", cmdline="ro lsm=capability,selinux"))
    assert "replace the lsm=... argument with lsm=capability,selinux,bpf" in report.remedy[0]


def test_grubby_machines(tmp_path: Path) -> None:
    report = diagnose(machine(tmp_path, "capability,selinux", tools=("grubby",)))
    assert report.remedy[0] == 'grubby --update-kernel=ALL --args="lsm=capability,selinux,bpf"'


def test_kernel_without_bpf_lsm(tmp_path: Path) -> None:
    report = diagnose(machine(tmp_path, "capability", config="# CONFIG_BPF_LSM is not set\n"))
    assert report.reasons == ("the kernel was built without CONFIG_BPF_LSM",)
    assert not report.lsm_list


def test_lockdown_confidentiality(tmp_path: Path) -> None:
    report = diagnose(machine(tmp_path, "lockdown,bpf", lockdown="none integrity "
                              "[confidentiality]"))
    assert "confidentiality" in report.reasons[0]


def test_no_trampolines_when_bpf_is_active_and_still_refused(tmp_path: Path) -> None:
    report = diagnose(machine(tmp_path, "lockdown,capability,landlock,bpf"), probe_refused=True)
    assert "trampolines" in report.reasons[0]
    assert "no boot option" in report.remedy[0]


def test_no_securityfs(tmp_path: Path) -> None:
    report = diagnose(machine(tmp_path, None))
    assert "securityfs" in report.reasons[0]


# --- status per policy and section -------------------------------------------------------


def loaded(tmp_path: Path) -> PolicyLoad:
    (tmp_path / "a.yaml").write_text(policy_text(
        "a", egress(tcp_rule("deny", 25), tcp_rule("deny", 26)) + exec_section(
            '{action: deny, paths: ["/usr/bin/curl"]}')))
    (tmp_path / "b.yaml").write_text(policy_text("b", egress(tcp_rule("deny", 27)),
                                                 scope="/not-yet/made"))
    found = load_policies(str(tmp_path), "/", unit_lookup=lambda units: {})
    assert isinstance(found, PolicyLoad), found
    return found


def test_rows_say_per_section_what_holds(tmp_path: Path) -> None:
    unavailable = {"exec": "no BPF-LSM", "files": "no BPF-LSM", "tamper": "no BPF-LSM"}
    rows = policy_rows(loaded(tmp_path).policy_set, "/guard-host", ["net"], unavailable,
                       exists=lambda path: path != "/not-yet/made")
    a, b = rows
    assert a["rules"] == 3  # as written; the defaults are not rules
    assert a["scope"] == ["/guard-host"] and a["host_wide"]
    assert [(s["section"], s["state"], s["enforced"]) for s in a["enforcement"]] == [
        ("exec", NOT_ENFORCED, False), ("egress", ENFORCED, True)]
    assert a["enforcement"][0]["reason"] == "no BPF-LSM" and a["enforced"] is False
    assert [(s["section"], s["state"]) for s in b["enforcement"]] == [("egress", WAITING)]
    assert b["missing_scope"] == ["/not-yet/made"] and b["enforced"] is False

    body = {"families": {"enforced": ["net"], "unavailable": unavailable, "unenforced": []},
            "policies": rows}
    text = "\n".join(format_policies(body))
    assert "exec: NOT enforced [R1]; egress: enforced" in text
    assert "scope /guard-host (whole host)" in text
    assert "egress: waiting for scope" in text and "/not-yet/made does not exist yet" in text
    assert reason_tags(unavailable) == {"no BPF-LSM": ("R1", ["exec", "files", "tamper"])}


def test_a_shared_reason_is_said_once(tmp_path: Path) -> None:
    load = loaded(tmp_path)
    (tmp_path / "c.yaml").write_text(policy_text("c", "files:\n  rules:\n    - {action: audit, "
                                                 "access: [read], paths: [/etc/shadow]}\n"))
    load = load_policies(str(tmp_path), "/", unit_lookup=lambda units: {})
    assert isinstance(load, PolicyLoad)
    why = "BPF-LSM programs do not load: EPERM"
    [message] = unenforced(load.policy_set, {"exec": why, "files": why})
    assert message.count(why) == 1 and "exec and files programs" in message
    body = {
        "pid": 1, "uptime_s": 1, "revision": "r", "generation": 1, "rules": 0,
        "policies_dir": str(tmp_path), "host_cgroup": "/",
        "families": {"enforced": ["net"], "unavailable": {"exec": why, "files": why,
                                                          "tamper": why},
                     "unenforced": [message]},
        "lsm": {"reasons": ["bpf is not in the active LSM list (capability)"],
                "remedy": ["run update-grub"], "lsm": "capability,bpf"},
        "policies": policy_rows(load.policy_set, "/", ["net"], {"exec": why, "files": why},
                                exists=lambda _p: True),
        "events": {"received": 0, "lines": 0, "aggregated": 0, "pending": 0, "delivered": 0,
                   "lost": {"ringbuf": 0, "reader": 0, "malformed": 0, "sink": 0}},
        "sink": {"target": "file:/x", "connected": True, "delivered": 0, "queued": 0,
                 "last_error": ""},
    }
    text = format_status(body)
    assert text.count(why) == 1, text
    assert text.count("bpf is not in the active LSM list") == 1
    assert "  fix: run update-grub" in text


def test_a_label_inside_the_message_is_not_its_own() -> None:
    message = "the exec programs failed: compiling failed: exec.bpf.c:3:1: error: x"
    assert stderr_line(SEV_ERR, message) == f"guard: error: {message}"


def test_grub_gets_the_lsm_list_once() -> None:
    from guard.kernel.lsm import grub_with_lsm

    text = ('# a comment\nGRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="quiet lsm=old"\n'
            'GRUB_CMDLINE_LINUX="console=ttyS0 lsm=capability"\n')
    assert grub_with_lsm(text, "capability,apparmor,bpf") == (
        '# a comment\nGRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\n'
        'GRUB_CMDLINE_LINUX="console=ttyS0 lsm=capability,apparmor,bpf"\n')
    assert grub_with_lsm("GRUB_DEFAULT=0\n", "capability,bpf") == (
        'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX="lsm=capability,bpf"\n')
    assert grub_with_lsm('GRUB_CMDLINE_LINUX=""\n', "a,bpf") == 'GRUB_CMDLINE_LINUX="lsm=a,bpf"\n'


def test_bpf_already_active_needs_no_boot_change(tmp_path: Path) -> None:
    from guard.kernel.lsm import BPF_ACTIVE

    report = diagnose(machine(tmp_path, "lockdown,capability,bpf"))
    assert report.reasons == (BPF_ACTIVE,) and not report.lsm_list
