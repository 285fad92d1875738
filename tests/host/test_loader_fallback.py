"""A program family that fails to compile or load does not stop the others.

``guard.kernel.loader.Kernel`` compiles the requested families as one bcc unit; when
that fails it names the family at fault (``attribute``), compiles again
without it and records why (``Kernel.dropped``), and the daemon reports it
like a family the feature probe rejected.

The host kernel runs only the network family, so the kernel tests here work
on a copy of bpf/ with one file broken on purpose:

- exec.bpf.c with a C syntax error next to the real net.bpf.c: net loads and a
  real connect() from the test's cgroup is refused by a plan applied through
  guard.kernel.apply; exec is reported with clang's error line (Kernel and daemon);
- the real exec.bpf.c, which this host refuses at load time (EPERM for LSM
  programs, raised inside bcc's constructor without a program name): exec is
  left out, net loads, no program of the failed attempt stays attached;
- net.bpf.c whose guard_egress dereferences a map lookup unchecked: it
  compiles, the verifier rejects it; net is the only family, so loading fails
  with an error naming guard_egress and the verifier's verdict, and the
  programs attached before it are detached.

The first tests are pure: ``attribute`` on error texts captured from bcc.
"""

from __future__ import annotations

import errno
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import need, need_root
from support.cgroup import TestCgroup
from support.daemon import ConnectProbe, attached_total
from support.policies import egress, exec_section, policy_text, tcp_rule

from guard.errors import ExitCode
from guard.events.transports import Sink, parse_target
from guard.kernel import loader
from guard.kernel.apply import Applier
from guard.kernel.loader import Kernel, LoadError, attribute, family_owners, probe_family
from guard.layout import BPF_DIR
from guard.policy.load import PolicyLoad, load_policies
from guard.service.control import format_status
from guard.service.daemon import Daemon

pytestmark = pytest.mark.host

OWNERS = loader.read_owners(loader.FAMILIES, BPF_DIR)

# --- attribution, on texts bcc printed (captured on the development host) ----------------

# exec.bpf.c with "int x = ;" in a net+exec unit (kernel-header warnings come first)
CLANG_ERROR = """\
arch/x86/include/asm/ibt.h:78:8: warning: 'nocf_check' attribute ignored; use -fcf-protection \
to enable the attribute [-Wignored-attributes]
extern __noendbr void ibt_restore(u64 save);
       ^
arch/x86/include/asm/ibt.h:32:34: note: expanded from macro '__noendbr'
#define __noendbr       __attribute__((nocf_check))
                                       ^
exec.bpf.c:2:9: error: expected expression
int x = ;
        ^
2 warnings and 1 error generated.
"""

# an error in a header exec.bpf.c includes, and one in tamper.bpf.c, in one unit
CLANG_ERRORS_TWO_FAMILIES = """\
In file included from include/linux/linkage.h:8:
In file included from arch/x86/include/asm/linkage.h:6:
arch/x86/include/asm/ibt.h:78:8: warning: 'nocf_check' attribute ignored [-Wignored-attributes]
extern __noendbr void ibt_restore(u64 save);
       ^
In file included from exec.bpf.c:2:
/tmp/x/bpf/broken.h:1:34: error: use of undeclared identifier 'undeclared_thing'
static int broken(void) { return undeclared_thing; }
                                 ^
tamper.bpf.c:2:29: error: use of undeclared identifier 'also_undeclared'
static int y(void) { return also_undeclared; }
                            ^
2 warnings and 2 errors generated.
"""

CLANG_ERROR_SHARED = """\
guard_maps.h:15:10: fatal error: 'guard.h' file not found
#include "guard.h"
         ^~~~~~~~~
1 error generated.
"""

# the verifier rejecting an unchecked map lookup (the log as libbcc prints it)
VERIFIER = """\
2 warnings generated.
bpf: Failed to load program: Permission denied
0: R1=ctx() R10=fp0
;  @ files.bpf.c:470
0: (bf) r6 = r1                       ; R1=ctx() R6=ctx()
8: (85) call bpf_map_lookup_elem#1    ; R0=map_value_or_null(id=1,map=guard_scopes,ks=16,vs=4)
;  @ files.bpf.c:475
9: (61) r1 = *(u32 *)(r0 +0)
R0 invalid mem access 'map_value_or_null'
processed 9 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0

HINT: The 'map_value_or_null' error can happen if you dereference a pointer value from a \
map lookup without first checking if that pointer is NULL.

"""

EPERM = "2 warnings generated.\nbpf: Failed to load program: Operation not permitted\n\n"


def test_owners_are_read_from_the_sources() -> None:
    programs, maps, files = OWNERS.programs, OWNERS.maps, OWNERS.files
    assert programs["lsm__file_open"] == "files" and programs["lsm__path_unlink"] == "files"
    assert programs["lsm__bprm_check_security"] == "exec" and programs["lsm__bpf"] == "tamper"
    assert programs["guard_egress"] == "net" and programs["guard_connect6"] == "net"
    assert maps["guard_net_folds"] == "net" and maps["guard_files_scratches"] == "files"
    assert maps["guard_tamper"] == "tamper"
    # the shared headers' maps are everyone's: guard_maps.h, guard_scope.h, guard_inode.h
    for shared in ("guard_scopes", "guard_inodes", "guard_scope_cache", "guard_inode_names"):
        assert shared not in maps, shared
    assert files == {"net.bpf.c": "net", "exec.bpf.c": "exec", "files.bpf.c": "files",
                     "tamper.bpf.c": "tamper"}
    # multi-line and table-style declarations
    other = family_owners({"x": 'BPF_F_TABLE("hash", struct k, struct v, x_map,\n 8, 0);\n'
                                'LSM_PROBE(  task_alloc, struct task_struct *t)'})
    assert other.maps == {"x_map": "x"} and other.programs == {"lsm__task_alloc": "x"}


def test_a_clang_error_names_its_family_by_the_line_file_name() -> None:
    fault = attribute("Failed to compile BPF module <text>", CLANG_ERROR, OWNERS)
    assert fault.culprits == {"exec": "compiling failed: exec.bpf.c:2:9: error: expected "
                                      "expression"}


def test_every_family_with_a_clang_error_is_named_at_once_even_through_a_header() -> None:
    fault = attribute("Failed to compile BPF module <text>", CLANG_ERRORS_TWO_FAMILIES, OWNERS)
    assert sorted(fault.culprits) == ["exec", "tamper"]
    assert "broken.h:1:34: error: use of undeclared identifier" in fault.culprits["exec"]
    assert fault.culprits["tamper"].endswith("tamper.bpf.c:2:29: error: use of undeclared "
                                             "identifier 'also_undeclared'")


def test_an_error_in_the_shared_header_names_no_family() -> None:
    fault = attribute("Failed to compile BPF module <text>", CLANG_ERROR + CLANG_ERROR_SHARED,
                      OWNERS)
    assert fault.culprits == {}  # dropping exec would not help: fail as a whole
    assert fault.reason == "guard_maps.h:15:10: fatal error: 'guard.h' file not found"


def test_a_verifier_rejection_names_the_program_and_the_verdict() -> None:
    fault = attribute("Failed to load BPF program b'lsm__file_open': Permission denied",
                      VERIFIER, OWNERS)
    assert fault.culprits == {"files": "loading lsm__file_open failed (Permission denied): "
                                       "R0 invalid mem access 'map_value_or_null'"}


def test_a_cut_short_verifier_log_gives_its_last_line() -> None:
    log = VERIFIER.split("processed")[0].rstrip() + "\nbpf: log_buf size may be insufficient\n"
    fault = attribute("Failed to load BPF program b'guard_egress': Permission denied", log,
                      OWNERS)
    assert fault.culprits == {"net": "loading guard_egress failed (Permission denied): "
                                     "R0 invalid mem access 'map_value_or_null'"}


def test_eperm_names_no_program_so_the_caller_s_hint_is_used() -> None:
    fault = attribute("Need super-user privileges to run", EPERM, OWNERS,
                      program="lsm__bprm_check_security")
    assert fault.culprits == {"exec": "loading lsm__bprm_check_security failed "
                                      "(EPERM: the kernel refused it)"}
    assert attribute("Need super-user privileges to run", EPERM, OWNERS).culprits == {}


def test_a_map_that_cannot_be_created_names_its_family() -> None:
    output = "could not open bpf map: guard_net_owners, error: Invalid argument\n"
    fault = attribute("Failed to compile BPF module <text>", output, OWNERS)
    assert fault.culprits == {"net": "creating map guard_net_owners failed: Invalid argument"}
    shared = "could not open bpf map: guard_events, error: Cannot allocate memory\n"
    assert attribute("Failed to compile BPF module <text>", shared, OWNERS).culprits == {}


def test_an_unknown_failure_names_no_family() -> None:
    fault = attribute("Failed to compile BPF module <text>", "", OWNERS)
    assert fault.culprits == {} and fault.reason == "Failed to compile BPF module <text>"


# --- the kernel ---------------------------------------------------------------------------

BROKEN_C = '#include "guard_maps.h"\n\nint guard_broken = ;\n'
UNCHECKED_LOOKUP = """\
	struct guard_scope_key unchecked_key = {};
	__u32 *unchecked = guard_scopes.lookup(&unchecked_key);

	if (*unchecked == 7)  /* no NULL check: the verifier refuses this */
		return 0;
"""


def bpf_copy(where: Path, **files: str) -> Path:
    """bpf/ copied to ``where/bpf``, with ``files`` (name without .bpf.c -> text) replaced."""
    copy = where / "bpf"
    shutil.copytree(BPF_DIR, copy)
    for family, text in files.items():
        (copy / f"{family}.bpf.c").write_text(text)
    return copy


def net_with_unchecked_lookup() -> str:
    text = (BPF_DIR / "net.bpf.c").read_text()
    head = "int guard_egress(struct __sk_buff *skb)\n{\n"
    assert text.count(head) == 1
    return text.replace(head, head + UNCHECKED_LOOKUP)


def egress_policy(name: str, scope: str, port: int, exec_rule: bool = False) -> str:
    body = egress(tcp_rule("deny", port))
    if exec_rule:
        body += exec_section("{action: deny, paths: [/usr/bin/true]}", default=None)
    return policy_text(name, body, scope=scope)


@pytest.fixture
def top() -> Iterator[TestCgroup]:
    need_root()
    feature = probe_family("net")
    need(feature.available, f"cgroup network programs: {feature.reason}")
    with TestCgroup.create() as cg:
        try:
            yield cg
        finally:
            # whatever happened, nothing may stay attached to the test's cgroup
            assert attached_total(cg.directory) == 0


def test_a_family_that_does_not_compile_is_left_out_and_net_still_enforces(
        top: TestCgroup, tmp_path: Path) -> None:
    bpf_dir = bpf_copy(tmp_path, exec=BROKEN_C)
    inside = top.child("in")
    probe = ConnectProbe.start(inside, 2)
    try:
        denied, allowed = probe.ports
        policies = tmp_path / "policies"
        policies.mkdir()
        (policies / "p.yaml").write_text(egress_policy("p", inside.path, denied))
        loaded = load_policies(str(policies), top.path, unit_lookup=lambda units: {})
        assert isinstance(loaded, PolicyLoad), loaded
        with Kernel(families={"net", "exec"}, host_cgroup=top.path, bpf_dir=bpf_dir) as kernel:
            assert kernel.families == {"net"} and kernel.attempts == 2
            assert kernel.dropped == {"exec": "compiling failed: exec.bpf.c:3:20: error: "
                                              "expected expression"}
            assert attached_total(top.directory) == 5
            assert probe.verdicts() == {denied: 0, allowed: 0}  # nothing applied yet
            Applier(kernel).apply(loaded.plan)
            assert probe.verdicts() == {denied: errno.EPERM, allowed: 0}
        assert attached_total(top.directory) == 0
        assert probe.verdicts() == {denied: 0, allowed: 0}
    finally:
        probe.close()


def test_every_family_with_a_clang_error_goes_in_one_attempt_and_a_shared_error_fails_at_once(
        top: TestCgroup, tmp_path: Path) -> None:
    bpf_dir = bpf_copy(tmp_path, exec=BROKEN_C, tamper=BROKEN_C.replace("broken", "other"))
    families = {"net", "exec", "tamper"}
    with Kernel(families=families, host_cgroup=top.path, bpf_dir=bpf_dir) as kernel:
        assert kernel.families == {"net"} and kernel.attempts == 2
        assert sorted(kernel.dropped) == ["exec", "tamper"]
        assert kernel.dropped["tamper"].startswith("compiling failed: tamper.bpf.c:3:")
    maps = bpf_dir / "guard_maps.h"
    maps.write_text(maps.read_text() + "\nint guard_shared_broken = ;\n")
    with pytest.raises(LoadError) as failed:
        Kernel(families={"net"}, host_cgroup=top.path, bpf_dir=bpf_dir)
    # a fault no family owns: no retry, the whole load fails with the compiler's line
    assert str(failed.value).startswith("compiling/loading ['net'] failed: guard_maps.h:")
    assert "error: expected expression" in str(failed.value) and failed.value.reasons == {}


def test_a_family_the_kernel_refuses_at_load_is_left_out_and_nothing_of_it_stays(
        top: TestCgroup, tmp_path: Path) -> None:
    need(not probe_family("exec").available,
         "this kernel loads LSM programs: the refusal this test uses does not happen")
    with Kernel(families={"net", "exec"}, host_cgroup=top.path) as kernel:
        assert kernel.families == {"net"} and kernel.attempts == 2
        why = kernel.dropped["exec"]
        # bcc's EPERM message names no program: the first LSM program of exec.bpf.c
        assert why.startswith("loading lsm__") and "EPERM" in why, why
        assert loader.read_owners(["exec"]).programs[why.split()[1]] == "exec"
        assert set(kernel.links()) == {p.function for p in loader.NET_PROGRAMS}
        assert attached_total(top.directory) == 5


def test_a_verifier_rejection_of_the_only_family_fails_naming_the_program(
        top: TestCgroup, tmp_path: Path) -> None:
    from bcc import BPF

    bpf_dir = bpf_copy(tmp_path, net=net_with_unchecked_lookup())
    # It compiles; the kernel's verifier is what refuses it.
    bpf = BPF(text=loader.program_text(["net"], bpf_dir).encode(), cflags=loader.cflags(bpf_dir))
    try:
        bpf.load_func(b"guard_connect4", loader.PROG_CGROUP_SOCK_ADDR,
                      attach_type=loader.ATTACH_INET4_CONNECT)
        with pytest.raises(Exception, match="Failed to load BPF program b'guard_egress'"):
            bpf.load_func(b"guard_egress", loader.PROG_CGROUP_SKB,
                          attach_type=loader.ATTACH_INET_EGRESS)
    finally:
        bpf.cleanup()
    with pytest.raises(LoadError) as failed:
        Kernel(families={"net"}, host_cgroup=top.path, bpf_dir=bpf_dir)
    message = str(failed.value)
    assert message.startswith("no program family could be loaded: net: loading guard_egress "
                              "failed"), message
    assert "invalid mem access 'map_value_or_null'" in message
    assert set(failed.value.reasons) == {"net"}
    # the four programs attached before guard_egress were detached
    assert attached_total(top.directory) == 0


# --- the daemon ---------------------------------------------------------------------------


class ExecClaimedDaemon(Daemon):
    """The feature probe says exec can run, so its (broken) source gets compiled: on
    this host the real probe rejects every LSM family before the loader sees it."""

    def _probe(self) -> dict[str, tuple[bool, str]]:
        found = super()._probe()
        found["exec"] = (True, "claimed by the test")
        return found


def make_daemon(cls: type[Daemon], tmp_path: Path, top: TestCgroup, bpf_dir: Path,
                ) -> tuple[Daemon, io.StringIO, Path]:
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    stderr, lines = io.StringIO(), tmp_path / "syslog.jsonl"
    daemon = cls(str(policies), top.path, str(tmp_path / "state"),
                 Sink(parse_target(f"file:{lines}")), stderr=stderr, watch=False)
    daemon.bpf_dir = bpf_dir
    return daemon, stderr, lines


def test_the_daemon_reports_a_family_that_failed_to_load_and_enforces_the_rest(
        top: TestCgroup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from guard.service.control import query

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    inside = top.child("in")
    probe = ConnectProbe.start(inside, 2)
    daemon, stderr, lines = make_daemon(ExecClaimedDaemon, tmp_path, top,
                                        bpf_copy(tmp_path, exec=BROKEN_C))
    policy = Path(daemon.policies) / "web.yaml"
    denied, allowed = probe.ports
    policy.write_text(egress_policy("web", inside.path, denied, exec_rule=True))
    try:
        assert daemon.start() == ExitCode.OK, stderr.getvalue()
        assert probe.verdicts() == {denied: errno.EPERM, allowed: 0}
        why = "compiling failed: exec.bpf.c:3:20: error: expected expression"
        assert daemon.enforced == ["net"] and daemon.unavailable["exec"] == why
        assert daemon.unenforced == [
            f"the kernel cannot run the exec programs ({why}); NOT ENFORCED: policy web "
            f"section exec at {policy}:15:5"]
        said = stderr.getvalue()
        assert f"guard: error: the exec programs failed to load and are left out: {why}" in said
        assert f"guard: error: {daemon.unenforced[0]}" in said
        status = query(str(daemon.state_dir))["status"]
        shown = format_status(status)
        assert "enforced: net\n" in shown and f"not available [R1]: exec: {why}\n" in shown
        assert "exec: NOT enforced [R1]; egress: enforced" in shown
        assert shown.count(why) == 1  # the reason once, the table refers to it
        # a reload keeps the reduced set, and says again what is left unenforced
        policy.write_text(egress_policy("web", inside.path, allowed, exec_rule=True))
        assert daemon.reload("test")
        assert probe.verdicts() == {denied: 0, allowed: errno.EPERM}
        assert stderr.getvalue().count(f"guard: error: {daemon.unenforced[0]}") == 2
    finally:
        daemon.shutdown()
        probe.close()
    logged = [json.loads(line) for line in lines.read_text().splitlines()]
    assert any("NOT ENFORCED: policy web section exec" in json.dumps(m) for m in logged)
    assert any("the exec programs failed to load" in json.dumps(m) for m in logged)


def test_the_daemon_exits_when_no_family_loads(top: TestCgroup, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    daemon, stderr, _lines = make_daemon(Daemon, tmp_path, top,
                                         bpf_copy(tmp_path, net=net_with_unchecked_lookup()))
    (Path(daemon.policies) / "p.yaml").write_text(egress_policy("p", top.path, 9))
    try:
        assert daemon.start() == ExitCode.RUNTIME
    finally:
        daemon.abort()
    said = stderr.getvalue()
    assert ("guard: error: loading the programs failed: no program family could be loaded: "
            "net: loading guard_egress failed (Permission denied): R0 invalid mem access "
            "'map_value_or_null'") in said, said
