"""``python -m bench`` (from tests/; ./scripts/bench does that): run the benchmark.

    ./scripts/bench                  the full run (about 20 minutes)
    ./scripts/bench --quick          a smoke run (about 3 minutes)
    ./scripts/bench --parts net,apply --no-guest
    ./scripts/bench report bench-results/latest.json   re-print a run (and --markdown)

Writes bench-results/bench-TIMESTAMP.{json,txt,png} and latest.{json,txt,png}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench import probe, report
from bench.config import FULL, PARTS, QUICK, Config
from bench.results import Results

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench-results"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x.replace("_", "").replace(",", "")) for x in text.split("+") if x)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description="guard's benchmark against its peers")
    sub = p.add_subparsers(dest="command")
    rep = sub.add_parser("report", help="print the table of a results file (and plot it)")
    rep.add_argument("file", type=Path)
    rep.add_argument("--markdown", action="store_true")
    rep.add_argument("--plot", type=Path, default=None, metavar="PNG")
    comb = sub.add_parser("combine", help="several results files as one (later ones win)")
    comb.add_argument("out", type=Path, help="the combined JSON to write")
    comb.add_argument("files", type=Path, nargs="+")
    comb.add_argument("--plot", type=Path, default=None, metavar="PNG")
    guest = sub.add_parser("guest-part", help="(internal) the half that runs inside the guest")
    guest.add_argument("rwdir", type=Path)
    p.add_argument("--quick", action="store_true", help="a smoke run of about 3 minutes")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--no-guest", action="store_true", help="same as leaving guest out of --parts")
    p.add_argument("--net-rules", type=_ints, default=None, metavar="K+K+...",
                   help="rule counts for the network runs, e.g. 0+100+10000")
    p.add_argument("--guest-rules", type=_ints, default=None, metavar="K+K+...")
    p.add_argument("--guest-metrics", default=None, metavar="exec,open",
                   help="which of the guest's measurements run (default: both)")
    p.add_argument("--apply-rules", type=_ints, default=None, metavar="K+K+...")
    p.add_argument("--daemon-rules", type=_ints, default=None, metavar="K+K+...")
    p.add_argument("--rounds", type=int, default=None, help="rounds per rule count")
    p.add_argument("--out", type=Path, default=OUT, help=f"results directory (default {OUT})")
    return p


def config_from(args: argparse.Namespace) -> Config:
    cfg = QUICK if args.quick else FULL
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"bench: unknown parts: {', '.join(sorted(unknown))}")
    if args.no_guest:
        parts = tuple(p for p in parts if p != "guest")
    cfg = replace(cfg, parts=parts)
    for name in ("net_rules", "guest_rules", "apply_rules", "daemon_rules"):
        value = getattr(args, name)
        if value is not None:
            cfg = replace(cfg, **{name: value})
    if args.guest_metrics is not None:
        metrics = tuple(m for m in args.guest_metrics.split(",") if m)
        if not metrics or set(metrics) - {"exec", "open"}:
            raise SystemExit("bench: --guest-metrics takes exec, open or exec,open")
        cfg = replace(cfg, guest_metrics=metrics)
    if args.rounds is not None:
        cfg = replace(cfg, rounds=args.rounds, guest_rounds=args.rounds)
    return cfg


def machine() -> dict[str, object]:
    def first(path: str, key: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "?"

    return {
        "host_kernel": platform.release(),
        "nproc": os.cpu_count(),
        "memory": first("/proc/meminfo", "MemTotal"),
        "cpu": first("/proc/cpuinfo", "model name"),
        "python": platform.python_version(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "report":
        results = Results.from_json(args.file.read_text())
        print(report.render_markdown(results) if args.markdown else report.render_text(results),
              end="")
        if args.plot is not None:
            report.plot(results, args.plot)
        return 0
    if args.command == "combine":
        from bench.results import combine

        combined = combine([Results.from_json(f.read_text()) for f in args.files])
        combined.write(args.out)
        print(report.render_text(combined), end="")
        if args.plot is not None:
            report.plot(combined, args.plot, "runs " + ", ".join(combined.meta["runs"]))
        return 0
    if args.command == "guest-part":
        from bench.guest import guest_main

        return guest_main(args.rwdir)
    if os.geteuid() != 0:
        print("bench: must run as root (cgroups, namespaces, BPF, netfilter)", file=sys.stderr)
        return 2
    cfg = config_from(args)
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"bench [{time.monotonic() - started:6.0f}s] {text}", file=sys.stderr, flush=True)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = Results(meta={**machine(), "mode": "quick" if cfg.quick else "full",
                            "started": stamp, "config": cfg.to_json()})
    binary = probe.build(args.out)
    log(f"{results.meta['mode']} run, parts {','.join(cfg.parts)}; probe {binary}")
    host_parts = [p for p in cfg.parts if p != "guest"]
    if host_parts:
        from bench.host import run_host

        try:
            run_host(cfg, binary, args.out, log, results)
        except Exception as error:
            import traceback

            traceback.print_exc()
            results.notes.append(f"host part failed: {type(error).__name__}: {error}")
    if "guest" in cfg.parts:
        from bench.guest import run_guest

        try:
            results.merge(run_guest(cfg, binary, log))
        except Exception as error:
            results.notes.append(f"guest part failed: {type(error).__name__}: {error}")
    results.meta.pop("guest_finished", None)
    results.meta["duration_s"] = round(time.monotonic() - started)
    results.meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    args.out.mkdir(parents=True, exist_ok=True)
    text = report.render_text(results)
    for name in (f"bench-{stamp}", "latest"):
        results.write(args.out / f"{name}.json")
        (args.out / f"{name}.txt").write_text(text)
    try:
        report.plot(results, args.out / f"bench-{stamp}.png",
                    f"{results.meta['mode']} run {stamp}, {results.meta.get('nproc')} CPUs, "
                    f"host {results.meta.get('host_kernel')}, guest "
                    f"{results.meta.get('guest_kernel', '-')} (TCG)")
        (args.out / "latest.png").write_bytes((args.out / f"bench-{stamp}.png").read_bytes())
    except Exception as error:  # a table without a plot is still a result
        log(f"no plot: {error}")
    print(text)
    log(f"done in {results.meta['duration_s']} s; results in {args.out}/bench-{stamp}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
