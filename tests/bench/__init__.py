"""guard's benchmark: the cost of guard next to its peers, on this machine, in one run.

Run it with ``./scripts/bench`` (``--quick`` for a smoke run); see docs/benchmarks.md.
Not part of the test suite: it measures, it does not assert (the targets of
issue 9 are reported as pass/fail next to the numbers).

Modules, one job each:

    probe.c / probe.py   the timed loops, in C, and building/running them
    results.py           the results (frozen dataclasses) and their JSON file
    stats.py             medians, percentiles, cost ratios (pure)
    report.py            the table, the targets' pass/fail and the PNG plot (pure but for
                         the file it writes)
    plans.py             rule sets of a given size: guard plans and policy files
    peers.py             the same rules for iptables, nftables (chains, sets), Landlock
    lab.py               the bench's own cgroups and network namespaces, and servers
    host.py              network overhead, apply time, daemon start/memory, reload
                         latency and audit throughput, on the host
    guest.py             exec and open() overhead in one BPF-LSM guest boot
    __main__.py          the command line
"""
