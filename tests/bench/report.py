"""Turn Results into the printed table, the targets' pass/fail, Markdown and a PNG plot.

Everything but ``plot`` is pure (Results in, text out), so it is unit-tested on
fake numbers (tests/unit/test_bench_report.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.results import ENGINES, METRICS, OK, AuditRun, Overhead, Results

FULL_RULES = 100_000


@dataclass(frozen=True)
class TargetResult:
    target: str  # issue 9's words
    measured: str  # what this run measured
    passed: bool | None  # None: not measured in this run


# --- helpers ------------------------------------------------------------------------


def _rows(results: Results, metric: str, engine: str) -> dict[int, Overhead]:
    return {r.rules: r for r in results.overhead
            if r.metric == metric and r.engine == engine and r.status == OK
            and r.ratio is not None}


def pct(ratio: float) -> str:
    """A cost ratio as an overhead: 1.034 -> '+3.4%'."""
    return f"{(ratio - 1) * 100:+.1f}%"


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def rules_text(n: int) -> str:
    return f"{n:,}"


# --- targets ------------------------------------------------------------------------


def _overhead_target(results: Results, metric: str, rules: int, limit: float,
                     words: str) -> TargetResult:
    rows = _rows(results, metric, "guard")
    row = rows.get(rules)
    if row is None or row.ratio is None:
        why = next((r.status for r in results.overhead
                    if r.metric == metric and r.engine == "guard" and r.rules == rules), None)
        return TargetResult(words, why or f"not measured at {rules_text(rules)} rules", None)
    measured = f"{pct(row.ratio)} at {rules_text(rules)} rules"
    return TargetResult(words, measured, row.ratio <= limit)


def _flat_target(results: Results, metric: str, spread: float, words: str) -> TargetResult:
    rows = _rows(results, metric, "guard")
    if len(rows) < 2:
        return TargetResult(words, "fewer than two rule counts measured", None)
    ratios = [rows[k].ratio for k in sorted(rows)]
    values = [r for r in ratios if r is not None]
    width = max(values) - min(values)
    measured = (f"overheads {', '.join(pct(r) for r in values)} over "
                f"{', '.join(rules_text(k) for k in sorted(rows))} rules (spread "
                f"{width * 100:.1f} points)")
    return TargetResult(words, measured, width <= spread)


def _ahead_target(results: Results, metric: str, from_rules: int, words: str) -> TargetResult:
    guard = _rows(results, metric, "guard")
    peer = _rows(results, metric, "iptables")
    counts = sorted(k for k in guard if k in peer and k >= from_rules)
    if not counts:
        return TargetResult(words, "no rule count >= "
                            f"{rules_text(from_rules)} measured for both", None)
    parts = []
    ahead = True
    for k in counts:
        g, p = guard[k].ratio, peer[k].ratio
        assert g is not None and p is not None
        parts.append(f"{rules_text(k)}: guard {pct(g)} vs iptables {pct(p)}")
        ahead = ahead and g < p
    return TargetResult(words, "; ".join(parts), ahead)


def _apply_target(results: Results) -> TargetResult:
    words = "apply of 10,000 rules under 100 ms"
    row = next((a for a in results.apply if a.rules == 10_000), None)
    if row is None or row.status != OK or row.to_enforced_ms is None:
        return TargetResult(words, row.status if row else "not measured", None)
    measured = (f"{row.to_enforced_ms:.1f} ms to enforced (median, p99 "
                f"{_num(row.to_enforced_p99_ms)} ms); whole call {_num(row.total_ms)} ms")
    return TargetResult(words, measured, row.to_enforced_ms < 100.0)


def _reload_target(results: Results) -> TargetResult:
    words = "save-to-enforced p99 under 1 s"
    rows = [r for r in results.reload if r.status == OK and r.p99_ms is not None]
    if not rows:
        why = results.reload[0].status if results.reload else "not measured"
        return TargetResult(words, why, None)
    parts = [f"{rules_text(r.policy_rules)} rules ({r.trigger}): p99 {r.p99_ms:.0f} ms"
             + (f", {r.failures} edit(s) never seen" if r.failures else "")
             for r in rows]
    passed = all(r.p99_ms is not None and r.p99_ms < 1000.0 and not r.failures for r in rows)
    return TargetResult(words, "; ".join(parts), passed)


def _audit_target(results: Results) -> TargetResult:
    words = ">= 50,000 audit events/s to syslog, every event delivered or counted"
    runs = [a for a in results.audit if a.status == OK]
    if not runs:
        why = results.audit[0].status if results.audit else "not measured"
        return TargetResult(words, why, None)
    unaccounted = sum(a.unaccounted for a in runs)
    distinct = [a for a in runs if a.workload == "distinct"]
    best = max(distinct or runs, key=lambda a: delivered_rate(a))
    measured = (f"best {delivered_rate(best):,.0f} events/s delivered ({best.workload} events, "
                f"offered {offered(best)}); unaccounted events over all runs: {unaccounted}")
    clean = [a for a in distinct if a.lost == 0]
    if clean:
        top = max(clean, key=lambda a: delivered_rate(a))
        measured += f"; highest rate without any drop: {delivered_rate(top):,.0f}/s"
    return TargetResult(words, measured, delivered_rate(best) >= 50_000 and unaccounted == 0)


def _memory_target(results: Results) -> TargetResult:
    words = "under 100 MB resident memory with 100,000 rules"
    row = next((d for d in results.daemon if d.rules == FULL_RULES), None)
    if row is None or row.status != OK or row.vmhwm_mb is None:
        return TargetResult(words, row.status if row else "not measured", None)
    measured = f"VmRSS {row.vmrss_mb:.0f} MB, peak VmHWM {row.vmhwm_mb:.0f} MB"
    if row.pss_mb is not None and row.private_mb is not None:
        measured += f"; own share: PSS {row.pss_mb:.0f} MB, private {row.private_mb:.0f} MB"
    return TargetResult(words, measured, row.vmhwm_mb < 100.0)  # judged on the peak, as before


def targets(results: Results) -> list[TargetResult]:
    """Issue 9's targets, each against this run's numbers."""
    return [
        _overhead_target(results, "connect", FULL_RULES, 1.05,
                         "connect overhead within 5% of no enforcement at 100,000 rules"),
        _flat_target(results, "connect", 0.05, "connect overhead flat in rule count "
                     "(spread <= 5 points)"),
        _ahead_target(results, "connect", 1_000,
                      "connect ahead of iptables chains from 1,000 rules on"),
        _overhead_target(results, "open", FULL_RULES, 1.05,
                         "open overhead (non-matching path) within 5% at 100,000 rules"),
        _flat_target(results, "open", 0.05, "open overhead flat in rule count "
                     "(spread <= 5 points)"),
        _overhead_target(results, "open-bpf", FULL_RULES, 1.05,
                         "the same, by the program's own time (kernel.bpf_stats)"),
        _flat_target(results, "open-bpf", 0.05, "the same flatness, by the program's own "
                     "time"),
        _overhead_target(results, "exec", 10_000, 1.02,
                         "exec overhead within 2% of no enforcement at 10,000 rules"),
        _apply_target(results),
        _reload_target(results),
        _audit_target(results),
        _memory_target(results),
    ]


def delivered_rate(run: AuditRun) -> float:
    """Events that reached syslog (in a line, with its count) per second, end to end."""
    return run.events_in_lines / run.drain_s if run.drain_s > 0 else 0.0


def offered(run: AuditRun) -> str:
    return "flat out" if run.offered_rate == 0 else f"{run.offered_rate:,}/s"


def verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[passed]


# --- tables -------------------------------------------------------------------------

Table = tuple[list[str], list[list[str]]]  # header, rows


def overhead_tables(results: Results) -> list[tuple[str, Table]]:
    """Per metric: rules x (no enforcement, each engine), cells 'value (ratio)'."""
    out: list[tuple[str, Table]] = []
    for metric, (title, unit, _higher) in METRICS.items():
        rows = [r for r in results.overhead if r.metric == metric]
        if not rows:
            continue
        engines = [e for e in ENGINES if any(r.engine == e for r in rows)]
        header = ["rules", f"none ({unit})", *(ENGINES[e] for e in engines)]
        body: list[list[str]] = []
        for rules in sorted({r.rules for r in rows}):
            at = {r.engine: r for r in rows if r.rules == rules}
            baselines = [r.baseline for r in at.values() if r.baseline is not None]
            line = [rules_text(rules), _num(baselines[0], 2) if baselines else "-"]
            for engine in engines:
                row = at.get(engine)
                if row is None:
                    line.append("-")
                elif row.status != OK or row.ratio is None:
                    line.append(row.status if len(row.status) <= 90 else row.status[:87] + "...")
                else:
                    line.append(f"{_num(row.value, 2)} ({pct(row.ratio)})")
            body.append(line)
        how = ("cell: time per call of the program (kernel.bpf_stats), and that time as a "
               "share of an open()+close() without guard" if metric.endswith("-bpf") else
               "cell: median (overhead vs none, median of per-round ratios)")
        out.append((f"{title} [{unit}]; {how}", (header, body)))
    return out


def other_tables(results: Results) -> list[tuple[str, Table]]:
    out: list[tuple[str, Table]] = []
    if results.apply:
        header = ["rules", "map entries", "first load (ms)", "reload to enforced (ms, median)",
                  "p99 (ms)", "whole apply() call (ms)", "status"]
        body = [[rules_text(a.rules), rules_text(a.entries), _num(a.initial_ms),
                 _num(a.to_enforced_ms), _num(a.to_enforced_p99_ms), _num(a.total_ms),
                 a.status] for a in results.apply]
        out.append(("guard.kernel.apply: time to apply a rule set", (header, body)))
    if results.reload:
        header = ["policy rules", "trigger", "edits", "median (ms)", "p99 (ms)", "max (ms)",
                  "not seen", "status"]
        body = [[rules_text(r.policy_rules), r.trigger, str(r.edits), _num(r.median_ms),
                 _num(r.p99_ms), _num(r.max_ms), str(r.failures), r.status]
                for r in results.reload]
        out.append(("save-to-enforced: policy file saved -> new verdict seen by connect()",
                    (header, body)))
    if results.daemon:
        header = ["rules", "start to READY (s)", "VmRSS (MB)", "VmHWM (MB)", "RssAnon (MB)",
                  "PSS (MB)", "private (MB)", "status"]
        body = [[rules_text(d.rules), _num(d.ready_s, 2), _num(d.vmrss_mb), _num(d.vmhwm_mb),
                 _num(d.rssanon_mb), _num(d.pss_mb), _num(d.private_mb), d.status]
                for d in results.daemon]
        out.append(("guard run: start time and memory", (header, body)))
    if results.audit:
        header = ["events", "offered", "sent", "send (s)", "drained (s)", "lines",
                  "events in lines", "lost: ringbuf/reader/sink", "unaccounted",
                  "delivered/s", "status"]
        body = [[a.workload, offered(a), f"{a.sent:,}", _num(a.send_s, 2), _num(a.drain_s, 2),
                 f"{a.lines:,}", f"{a.events_in_lines:,}",
                 f"{a.lost_ringbuf}/{a.lost_reader}/{a.lost_sink}", str(a.unaccounted),
                 f"{delivered_rate(a):,.0f}", a.status] for a in results.audit]
        out.append(("audit throughput: kernel -> guard run -> rsyslogd", (header, body)))
    header = ["target (issue 9)", "measured", "result"]
    body = [[t.target, t.measured, verdict(t.passed)] for t in targets(results)]
    out.append(("targets", (header, body)))
    return out


def text_table(table: Table) -> str:
    header, body = table
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in body]
    return "\n".join(lines)


def markdown_table(table: Table) -> str:
    header, body = table
    esc: Callable[[str], str] = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def machine_text(meta: dict[str, object]) -> str:
    keys = ("host_kernel", "guest_kernel", "nproc", "memory", "cpu", "iptables", "nft",
            "landlock_abi_host", "landlock_abi_guest", "mode", "started", "duration_s",
            "loadavg_start", "loadavg_end", "runs", "loadavg")
    return "\n".join(f"{k}: {meta[k]}" for k in keys if k in meta)


def render_text(results: Results) -> str:
    parts = ["guard benchmark", machine_text(results.meta), ""]
    for title, table in [*overhead_tables(results), *other_tables(results)]:
        parts += [title, text_table(table), ""]
    if results.notes:
        parts.append("notes:")
        parts += [f"- {n}" for n in results.notes]
    return "\n".join(parts) + "\n"


def render_markdown(results: Results) -> str:
    parts: list[str] = []
    for title, table in [*overhead_tables(results), *other_tables(results)]:
        parts += [f"**{title}**", "", markdown_table(table), ""]
    if results.notes:
        parts += [f"- {n}" for n in results.notes]
    return "\n".join(parts) + "\n"


# --- the plot -----------------------------------------------------------------------

STYLE = {"guard": ("tab:green", "o"), "iptables": ("tab:red", "s"),
         "nft-chain": ("tab:orange", "^"), "nft-set": ("tab:purple", "v"),
         "landlock": ("tab:blue", "D")}


def plot_series(results: Results) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """metric -> engine -> [(rules, cost ratio)], measured points only, sorted."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in results.overhead:
        if r.status != OK or r.ratio is None:
            continue
        out.setdefault(r.metric, {}).setdefault(r.engine, []).append((r.rules, r.ratio))
    for engines in out.values():
        for points in engines.values():
            points.sort()
    return out


def plot(results: Results, path: Path, title_note: str = "") -> Path:
    """Overhead against rule count, one panel per metric, one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = plot_series(results)
    metrics = [m for m in METRICS if m in series]
    if not metrics:
        raise ValueError("nothing measured to plot")
    cols = min(3, len(metrics))
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    limits = {"connect": 1.05, "open": 1.05, "open-bpf": 1.05, "exec": 1.02}
    for ax, metric in zip((a for row in axes for a in row), metrics, strict=False):
        engines = series[metric]
        counts = sorted({k for pts in engines.values() for k, _ in pts})
        x_of = {k: i for i, k in enumerate(counts)}  # evenly spaced, labelled rule counts
        for engine in ENGINES:
            points = engines.get(engine)
            if not points:
                continue
            color, marker = STYLE[engine]
            ax.plot([x_of[k] for k, _ in points], [(v - 1) * 100 for _, v in points],
                    color=color, marker=marker, label=ENGINES[engine])
        ax.axhline(0, color="black", linewidth=0.8)
        if metric in limits:
            ax.axhline((limits[metric] - 1) * 100, color="gray", linestyle="--", linewidth=0.8,
                       label=f"target +{(limits[metric] - 1) * 100:.0f}%")
        ax.set_xticks(range(len(counts)), [rules_text(k) for k in counts])
        ax.set_yscale("symlog", linthresh=10)
        ax.set_ylim(bottom=-100)  # nothing is cheaper than free by more than all of it
        ax.set_xlabel("rules")
        ax.set_ylabel("overhead vs no enforcement (%)")
        ax.set_title(METRICS[metric][0], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in [a for row in axes for a in row][len(metrics):]:
        ax.set_visible(False)
    fig.suptitle("guard vs peers: cost per operation against rule count"
                 + (f"\n{title_note}" if title_note else ""), fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_lines(results: Results) -> Iterable[str]:
    for t in targets(results):
        yield f"[{verdict(t.passed)}] {t.target}: {t.measured}"


def engines_in(results: Results, metric: str) -> Sequence[str]:
    return [e for e in ENGINES if any(r.metric == metric and r.engine == e
                                      for r in results.overhead)]
