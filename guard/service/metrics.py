"""``guard run --metrics ADDR:PORT``: the daemon's counters in Prometheus' text format.

Made with the standard client library (prometheus_client; Debian's
python3-prometheus-client), by a collector that reads the daemon's state at
each scrape, under its lock, from the HTTP server's thread; the daemon's loop
never waits for a scrape. Names follow the conventions Tetragon users know:

    guard_policy_events_total{policy,rule,action,kind}   events reported, by rule; counts
                                                         follow rule content across reloads
    guard_events_lost_total{stage}                       ringbuf, reader, malformed, sink,
                                                         events_client
    guard_events_received_total                          records read from the ring buffer
    guard_reloads_total, guard_reload_errors_total
    guard_last_reload_timestamp_seconds                  the last reload, good or rejected
    guard_policy_revision_info{revision,generation}     what is in force (an info metric)
    guard_policies                                       policies loaded
    guard_family_enforced{family}                        1 when the family's programs run
    guard_policy_section_enforced{policy,section}        1 enforced, 0 not (or waiting)
    guard_map_entries{map}, guard_map_capacity{map}      rule entries in the active slot
                                                         and what one slot may hold
    guard_kernel_events_total{counter}                   the programs' own counters

Program run time is not exported: it needs kernel.bpf_stats_enabled, which
guard does not switch on (it costs every program call).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client.registry import Collector

from guard.kernel.apply import MAP_NAMES, SLOT_CAPACITY
from guard.kernel.loader import FAMILIES
from guard.service.report import daemon_status


class MetricsError(ValueError):
    """The --metrics address is not usable."""


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[::1]:9464`` for IPv6; ``:9464`` for every address)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MetricsError(f"--metrics {text!r}: write ADDR:PORT, e.g. 127.0.0.1:9464")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class GuardCollector(Collector):
    """A prometheus_client collector over a guard.service.daemon.Daemon."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        d = self.daemon
        with d._lock:
            body = daemon_status(d)
            counts = dict(d.events.event_counts)
            live = _live_entries(d)
            reload_errors = d.reload_errors
            last = d.last_reload
        events = CounterMetricFamily("guard_policy_events", "events reported, by rule",
                                     labels=["policy", "rule", "action", "kind"])
        for (policy, rule, action, kind), count in sorted(counts.items()):
            events.add_metric([policy, rule, action, kind], count)
        yield events
        lost = CounterMetricFamily("guard_events_lost", "events lost, by where",
                                   labels=["stage"])
        for stage, count in sorted(body["events"]["lost"].items()):
            lost.add_metric([stage], count)
        lost.add_metric(["events_client"], body["tail"]["dropped"])
        yield lost
        yield CounterMetricFamily("guard_events_received", "records read from the ring buffer",
                                  value=body["events"]["received"])
        yield CounterMetricFamily("guard_reloads", "reloads, applied or rejected",
                                  value=body["reloads"])
        yield CounterMetricFamily("guard_reload_errors", "rejected reloads", value=reload_errors)
        if last is not None:
            yield GaugeMetricFamily("guard_last_reload_timestamp_seconds",
                                    "when the last reload ran", value=last.time_ns / 1e9)
        info = InfoMetricFamily("guard_policy_revision", "the policy revision in force")
        info.add_metric([], {"revision": str(body["revision"] or ""),
                             "generation": str(body["generation"])})
        yield info
        yield GaugeMetricFamily("guard_policies", "policies loaded",
                                value=len(body["policies"]))
        families = GaugeMetricFamily("guard_family_enforced",
                                     "1 when the family's programs are loaded",
                                     labels=["family"])
        for family in FAMILIES:
            families.add_metric([family], 1 if family in body["families"]["enforced"] else 0)
        yield families
        sections = GaugeMetricFamily("guard_policy_section_enforced",
                                     "1 when a policy section is enforced now",
                                     labels=["policy", "section"])
        for row in body["policies"]:
            for section in row["enforcement"]:
                sections.add_metric([row["name"], section["section"]],
                                    1 if section["enforced"] else 0)
        yield sections
        used = GaugeMetricFamily("guard_map_entries", "entries in the active slot",
                                 labels=["map"])
        capacity = GaugeMetricFamily("guard_map_capacity", "entries one slot may hold",
                                     labels=["map"])
        for name in MAP_NAMES:
            used.add_metric([name], live.get(name, 0))
            capacity.add_metric([name], SLOT_CAPACITY[name])
        yield used
        yield capacity
        kernel = CounterMetricFamily("guard_kernel_events", "the programs' own counters",
                                     labels=["counter"])
        for name, value in sorted(body["kernel"].items()):
            if value is not None:
                kernel.add_metric([name], value)
        yield kernel


def _live_entries(d: Any) -> dict[str, int]:
    """Entries per map in the active slot, as the applier last wrote them."""
    live = getattr(d.applier, "_live", None)
    if not live:
        return {}
    return {name: len(entries) for name, entries in live[d.active_slot & 1].items()}


class MetricsServer:
    """The HTTP endpoint (GET /metrics, or any path), on a thread of its own."""

    def __init__(self, address: str, daemon: Any) -> None:
        from prometheus_client import CollectorRegistry, make_wsgi_app
        from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

        host, port = parse_address(address)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(GuardCollector(daemon))
        server_class = ThreadingWSGIServer
        if ":" in host:
            import socket

            class V6(ThreadingWSGIServer):
                address_family = socket.AF_INET6

            server_class = V6
        try:
            self.server: WSGIServer = make_server(host, port, make_wsgi_app(registry),
                                                  server_class, handler_class=_SilentHandler)
        except OSError as error:
            raise MetricsError(f"--metrics {address}: {error.strerror or error}") from error
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="guard-metrics",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


__all__ = ["GuardCollector", "MetricsError", "MetricsServer", "parse_address"]
