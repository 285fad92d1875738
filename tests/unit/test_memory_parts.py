"""guard.service.memory without a daemon: reading /proc, choosing the compiler's mappings, each
step's failure as a reported no-op, and MADV_PAGEOUT really emptying a file mapping.

The daemon's own release, measured from outside while it enforces, is in
tests/host/test_memory.py.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
from pathlib import Path

from bench import report
from bench.results import DaemonStart, Results
from support import need

from guard.service import memory
from guard.service.memory import MADV_PAGEOUT, Region, Usage

STATUS = """\
Name:\tpython3
VmPeak:\t  400000 kB
VmHWM:\t  166912 kB
VmRSS:\t   58368 kB
RssAnon:\t   33280 kB
RssFile:\t   25088 kB
RssShmem:\t       0 kB
Threads:\t4
"""

ROLLUP = """\
55d0c0000000-7ffd00000000 ---p 00000000 00:00 0                          [rollup]
Rss:               58368 kB
Pss:               45312 kB
Pss_Anon:          33280 kB
Pss_File:          12032 kB
Shared_Clean:      18432 kB
Shared_Dirty:          0 kB
Private_Clean:      6144 kB
Private_Dirty:     33792 kB
"""

MAPS = """\
55d0c1a00000-55d0c1c00000 r--p 00000000 fe:01 1000  /usr/bin/python3.11
7f0000000000-7f0001000000 r--p 00000000 fe:01 2000  /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0001000000-7f0004000000 r-xp 01000000 fe:01 2000  /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0004000000-7f0004100000 rw-p 04000000 fe:01 2000  /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f0005000000-7f0006000000 r-xp 00400000 fe:01 3000  /usr/lib/llvm-14/lib/libclang-cpp.so.14
7f0006000000-7f0006100000 r-xp 00000000 fe:01 4000  /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
7f0007000000-7f0007100000 r-xp 00000000 fe:01 5000  /opt/libLLVMish/libpython3.11.so
7f0008000000-7f0008100000 rw-p 00000000 00:00 0
7f0009000000-7f0009800000 rw-s 00000000 00:0e 60    anon_inode:bpf-map
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0     [stack]
"""


def test_usage_from_status_and_rollup() -> None:
    usage = memory.usage_of(STATUS, ROLLUP)
    assert usage == Usage(rss_kb=58368, hwm_kb=166912, anon_kb=33280, file_kb=25088,
                          pss_kb=45312, private_kb=6144 + 33792, private_dirty_kb=33792)
    assert usage.as_mb() == {"rss": 57.0, "hwm": 163.0, "anon": 32.5, "file": 24.5,
                             "pss": 44.2, "private": 39.0, "private_dirty": 33.0}


def test_usage_without_smaps_rollup_has_no_pss() -> None:
    usage = memory.usage_of(STATUS, None)
    assert usage.rss_kb == 58368 and usage.pss_kb is None and usage.private_kb is None


def test_read_usage_of_this_process_is_consistent() -> None:
    usage = memory.read_usage()
    # the kernel's counters are per-CPU caches: RssAnon + RssFile equals VmRSS up to a
    # few pages, and what this process maps alone is never more than what it maps
    assert abs(usage.rss_kb - usage.anon_kb - usage.file_kb) < 4096
    assert usage.hwm_kb >= usage.rss_kb > 0
    assert usage.pss_kb is not None and usage.private_kb is not None
    assert usage.private_kb <= usage.pss_kb <= usage.rss_kb + 4096


def test_compiler_regions_are_the_read_only_mappings_of_llvm_and_clang() -> None:
    regions = memory.parse_maps(MAPS)
    assert len(regions) == 10 and regions[7].path == "" and regions[8].perms == "rw-s"
    chosen = memory.compiler_regions(regions)
    assert [(hex(r.start), r.perms, os.path.basename(r.path)) for r in chosen] == [
        ("0x7f0000000000", "r--p", "libLLVM-14.so.1"),
        ("0x7f0001000000", "r-xp", "libLLVM-14.so.1"),
        ("0x7f0005000000", "r-xp", "libclang-cpp.so.14"),
    ]  # not the writable one (relocations), not libbcc (the ring buffer, map calls)
    assert chosen[1].size == 0x3000000


def test_page_out_reports_what_it_advised() -> None:
    calls: list[tuple[int, int, int]] = []

    def madvise(start: int, length: int, advice: int) -> int:
        calls.append((start, length, advice))
        return errno.ENOMEM if start == 0x3000 else 0

    step = memory.page_out([Region(0x1000, 0x2000, "r-xp", "/l"),
                            Region(0x3000, 0x5000, "r--p", "/l")], madvise)
    assert calls == [(0x1000, 0x1000, MADV_PAGEOUT), (0x3000, 0x2000, MADV_PAGEOUT)]
    assert step.ok and "1 mappings" in step.detail and "1 failed (ENOMEM)" in step.detail
    assert memory.page_out([], madvise).detail == "no compiler library mapped"


def test_a_kernel_without_madv_pageout_is_a_no_op() -> None:
    calls: list[int] = []

    def old_kernel(start: int, length: int, advice: int) -> int:
        calls.append(start)
        return errno.EINVAL

    step = memory.page_out([Region(0x1000, 0x2000, "r-xp", "/l"),
                            Region(0x3000, 0x4000, "r-xp", "/l")], old_kernel)
    assert not step.ok and "EINVAL" in step.detail and calls == [0x1000]  # stops at once


class FakeLibc:
    def __init__(self, trim: int | None, madvise_error: int = 0) -> None:
        self.trims = 0
        self.trim = trim
        self.advised: list[int] = []
        self.madvise_error = madvise_error

    def malloc_trim(self) -> int | None:
        self.trims += 1
        return self.trim

    def madvise(self, start: int, length: int, advice: int) -> int:
        self.advised.append(start)
        return self.madvise_error


def test_release_runs_every_step_and_measures_around_them() -> None:
    readings = iter([memory.usage_of(STATUS.replace("58368", "166912"), ROLLUP),
                     memory.usage_of(STATUS, ROLLUP)])
    libc = FakeLibc(trim=1)
    done = memory.release(libc=libc, maps=lambda: MAPS, measure=lambda: next(readings))
    assert [s.name for s in done.steps] == ["gc", "malloc_trim", "pageout"]
    assert all(s.ok for s in done.steps) and libc.trims == 1
    assert libc.advised == [0x7f0000000000, 0x7f0001000000, 0x7f0005000000]
    assert done.released_kb == 166912 - 58368
    line = done.summary()
    assert line.startswith("memory after load: resident 163.0 MB -> 57.0 MB") and "pss 44.2" \
        in line and "3 mappings of the compiler libraries" in line


def test_release_never_raises() -> None:
    def broken_maps() -> str:
        raise PermissionError("no /proc")

    def unreadable() -> Usage:
        raise OSError("gone")

    done = memory.release(libc=FakeLibc(trim=None), maps=broken_maps, measure=unreadable)
    by_name = {s.name: s for s in done.steps}
    assert not by_name["malloc_trim"].ok and "no malloc_trim" in by_name["malloc_trim"].detail
    assert not by_name["pageout"].ok and "PermissionError" in by_name["pageout"].detail
    assert done.before is None and done.released_kb is None
    assert "could not be measured" in done.summary()


def test_status_body_and_line() -> None:
    done = memory.Release(memory.usage_of(STATUS.replace("58368", "166912"), ROLLUP),
                          memory.usage_of(STATUS, ROLLUP), (), 0.05)
    body = memory.status_body(done)
    assert body["release"]["released_mb"] == 106.0 and body["release"]["ms"] == 50.0
    assert set(body["now_mb"]) == {"rss", "hwm", "anon", "file", "pss", "private",
                                   "private_dirty"}
    line = memory.status_line(body)
    assert line is not None and re.fullmatch(
        r"memory: resident [\d.]+ MB, own share \(pss\) [\d.]+ MB, private [\d.]+ MB, "
        r"peak [\d.]+ MB; 106.0 MB given back after load", line), line
    assert memory.status_body(None)["release"] is None
    assert memory.status_line({}) is None


def _fs_type(directory: Path) -> str:
    """The file system type of the mount holding ``directory`` (/proc/self/mountinfo)."""
    best, kind = "", ""
    real = str(directory.resolve())
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point, fstype = fields[4], fields[fields.index("-") + 1]
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, fstype
    return kind


def _resident_kb(start: int) -> int:
    """Rss of the mapping starting at ``start``, from /proc/self/smaps."""
    text = Path("/proc/self/smaps").read_text()
    head = re.search(rf"^0*{start:x}-[0-9a-f]+ .*\n((?:[A-Z]\w*:.*\n)+)", text, re.MULTILINE)
    assert head, "mapping not found"
    found = re.search(r"^Rss:\s+(\d+) kB", head.group(1), re.MULTILINE)
    assert found
    return int(found.group(1))


def test_madv_pageout_really_empties_a_file_mapping(tmp_path: Path) -> None:
    """The real system call on a file of ours, read through a read-only mapping as the
    loader maps a library: its pages leave the resident set, and read back the same."""
    data = os.urandom(4 * 2**20)
    # a file in memory (tmpfs) has nowhere to be paged out to without swap
    directory = next((d for d in (tmp_path, Path("/var/tmp")) if _fs_type(d) not in
                      ("tmpfs", "ramfs")), None)
    need(directory is not None, "no disk-backed directory to map a file from (tmp_path and "
         "/var/tmp are in memory)")
    assert directory is not None
    path = directory / f"libLLVM-test-{os.getpid()}.so.1"
    try:
        _page_out_file(path, data)
    finally:
        path.unlink(missing_ok=True)


def _page_out_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert mapped[:] == data  # every page touched
        regions = [r for r in memory.compiler_regions(memory.parse_maps(
            Path("/proc/self/maps").read_text())) if r.path == str(path.resolve())]
        assert len(regions) == 1 and regions[0].size == len(data)
        start = regions[0].start
        assert _resident_kb(start) >= 4096 - 64
        step = memory.page_out(regions, memory._Libc().madvise)
        need(step.ok or "EINVAL" not in step.detail,
             f"this kernel has no MADV_PAGEOUT ({os.uname().release})")
        assert step.ok, step.detail
        assert _resident_kb(start) < 256
        assert mapped[:] == data  # read back from the file, unchanged
        assert _resident_kb(start) >= 4096 - 64


def test_bench_report_shows_the_own_share_next_to_vmrss() -> None:
    r = Results()
    r.daemon.append(DaemonStart(100_000, 3.0, 60.0, 180.0, rssanon_mb=35.0, pss_mb=45.0,
                                private_mb=40.0))
    text = report.render_text(r)
    assert "RssAnon (MB)" in text and "PSS (MB)" in text and "private (MB)" in text
    target = {t.target: t for t in report.targets(r)}[
        "under 100 MB resident memory with 100,000 rules"]
    assert "VmRSS 60 MB, peak VmHWM 180 MB; own share: PSS 45 MB, private 40 MB" in \
        target.measured
    assert target.passed is False  # still judged on the peak, as before
    old = Results.from_json('{"daemon": [{"rules": 10, "ready_s": 1.0, "vmrss_mb": 160.0, '
                            '"vmhwm_mb": 160.0, "status": "ok"}]}')
    assert old.daemon[0].pss_mb is None and "-" in report.render_text(old)
