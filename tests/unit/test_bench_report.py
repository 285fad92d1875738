"""The benchmark's pure parts on fake numbers: statistics, targets, tables, plot, plans.

The benchmark itself (./scripts/bench) is not part of the test suite; this checks
that what it prints and draws from its numbers is right, and that the plans it
loads into the kernel are the compiler's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bench import peers, plans, report, stats
from bench.results import (
    ApplyTime,
    AuditRun,
    DaemonStart,
    Overhead,
    ReloadLatency,
    Results,
)


def fake() -> Results:
    r = Results(meta={"host_kernel": "6.18-test", "nproc": 2, "mode": "full"})
    for k, g, ipt in ((0, 1.01, 1.00), (1_000, 1.02, 1.30), (100_000, 1.03, 90.0)):
        r.overhead.append(Overhead("connect", "guard", k, 25.0 * g, 25.0, g, 5))
        r.overhead.append(Overhead("connect", "iptables", k, 25.0 * ipt, 25.0, ipt, 5))
        r.overhead.append(Overhead("throughput", "guard", k, 10.0 / g, 10.0, g, 5))
    r.overhead.append(Overhead("connect", "landlock", 100_000,
                               status="not expressible: one rule per port"))
    r.overhead.append(Overhead("exec", "guard", 10_000, 1030.0, 1000.0, 1.03, 5))
    r.overhead.append(Overhead("open", "guard", 100_000, status="not yet available: no program"))
    r.apply.append(ApplyTime(10_000, 10_006, 40.0, 35.0, 60.0, 90.0, 10))
    r.reload.append(ReloadLatency(10, "watcher", 30, 150.0, 400.0, 420.0))
    r.daemon.append(DaemonStart(100_000, 12.0, 80.0, 120.0))
    r.audit.append(AuditRun("distinct", 50_000, 100_000, 2.0, 4.0, 60_000, 60_000, 40_000,
                            0, 0, 0))
    r.audit.append(AuditRun("distinct", 10_000, 20_000, 2.0, 2.0, 20_000, 20_000, 0, 0, 0, 0))
    return r


def by_target(results: Results) -> dict[str, report.TargetResult]:
    return {t.target: t for t in report.targets(results)}


def test_stats() -> None:
    assert stats.median([3, 1, 2]) == 2
    assert stats.median([4, 1, 2, 3]) == 2.5
    assert stats.percentile([1, 2, 3, 4, 5], 50) == 3
    assert stats.percentile([0, 10], 99) == pytest.approx(9.9)
    assert stats.cost_ratio(30, 25, higher_is_better=False) == pytest.approx(1.2)
    assert stats.cost_ratio(8, 10, higher_is_better=True) == pytest.approx(1.25)
    with pytest.raises(ValueError):
        stats.median([])


def test_targets_pass_fail_and_not_measured() -> None:
    t = by_target(fake())
    connect = t["connect overhead within 5% of no enforcement at 100,000 rules"]
    assert connect.passed is True and "+3.0% at 100,000 rules" in connect.measured
    flat = t["connect overhead flat in rule count (spread <= 5 points)"]
    assert flat.passed is True and "spread 2.0 points" in flat.measured
    ahead = t["connect ahead of iptables chains from 1,000 rules on"]
    assert ahead.passed is True and "100,000: guard +3.0% vs iptables +8900.0%" in ahead.measured
    assert t["exec overhead within 2% of no enforcement at 10,000 rules"].passed is False
    opened = t["open overhead (non-matching path) within 5% at 100,000 rules"]
    assert opened.passed is None and opened.measured.startswith("not yet available")
    assert t["apply of 10,000 rules under 100 ms"].passed is True
    assert t["save-to-enforced p99 under 1 s"].passed is True
    audit = t[">= 50,000 audit events/s to syslog, every event delivered or counted"]
    # 60,000 events in lines over 4 s: 15,000/s delivered; 40,000 counted lost
    assert audit.passed is False and "15,000 events/s" in audit.measured
    assert "without any drop: 10,000/s" in audit.measured
    memory = t["under 100 MB resident memory with 100,000 rules"]
    assert memory.passed is False and "VmHWM 120 MB" in memory.measured


def test_unaccounted_events_fail_the_audit_target() -> None:
    r = fake()
    r.audit = [AuditRun("distinct", 0, 200_000, 1.0, 2.0, 150_000, 150_000, 0, 0, 0, 50_000)]
    audit = by_target(r)[">= 50,000 audit events/s to syslog, every event delivered or counted"]
    assert audit.passed is False and "unaccounted events over all runs: 50000" in audit.measured


def test_tables_show_values_ratios_and_reasons() -> None:
    text = report.render_text(fake())
    assert "host_kernel: 6.18-test" in text
    assert "25.75 (+3.0%)" in text  # guard connect at 100,000 rules
    assert "2,250 (+8900.0%)" in text  # iptables
    assert "not expressible: one rule per port" in text
    assert "not yet available: no program" in text
    assert "FAIL" in text and "PASS" in text and "n/a" in text
    md = report.render_markdown(fake())
    assert "| rules | none (us) | guard | iptables chain | Landlock |" in md


def test_results_round_trip(tmp_path: Path) -> None:
    r = fake()
    r.write(tmp_path / "r.json")
    again = Results.from_json((tmp_path / "r.json").read_text())
    assert again == r


def test_plot_writes_a_png(tmp_path: Path) -> None:
    path = report.plot(fake(), tmp_path / "plot.png", "fake numbers")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    series = report.plot_series(fake())
    assert series["connect"]["guard"] == [(0, 1.01), (1_000, 1.02), (100_000, 1.03)]
    assert "open" not in series  # nothing measured there: no line drawn


def test_bench_plans_are_the_compilers() -> None:
    assert plans.check_shape(sizes=(0, 1, 7, 100)) == []


def test_policy_files_stay_under_the_size_limit() -> None:
    files = plans.policy_files(100_000)
    assert len(files) == 4
    assert all(len(text.encode()) < plans.FILE_LIMIT_BYTES for text in files.values())
    assert sum(text.count("/32") for text in files.values()) == 100_000


def test_peer_rule_texts() -> None:
    ipt = peers.iptables_rules("/guard-bench-x/iptables", 3)
    assert "-A OUTPUT -m cgroup --path /guard-bench-x/iptables -j GBENCH" in ipt
    assert ipt.count("-A GBENCH -d 198.18.0.") == 3
    chain = peers.nft_chain_rules("unified/guard-bench-x/nft-chain", 2, 2)
    assert 'socket cgroupv2 level 2 "unified/guard-bench-x/nft-chain" jump bench_rules' in chain
    assert chain.count("meta l4proto tcp drop") == 2
    empty_set = peers.nft_set_rules("unified/x", 1, 0)
    assert "elements" not in empty_set
    assert "198.18.0.1/32" in peers.nft_set_rules("unified/x", 1, 2)
    assert peers.nft_cgroup(Path("/sys/fs/cgroup/unified/a/b"), Path("/sys/fs/cgroup/unified")) \
        == ("unified/a/b", 2)


def test_combine_takes_the_later_run_of_each_measurement() -> None:
    from bench.results import combine

    first, second = fake(), Results(meta={"started": "B", "guest_kernel": "6.12-test"})
    first.meta["started"] = "A"
    first.apply = [ApplyTime(100_000, 0, None, None, None, None, status="failed: bench bug")]
    second.apply = [ApplyTime(100_000, 100_006, 400.0, 300.0, 350.0, 500.0, 10)]
    second.notes = ["guest note"]
    both = combine([first, second])
    assert both.meta["runs"] == ["A", "B"] and both.meta["guest_kernel"] == "6.12-test"
    assert [a.status for a in both.apply] == ["ok"]
    assert len(both.overhead) == len(first.overhead)
    assert "[run B] guest note" in both.notes
