"""``guard run --metrics``: scraped over real HTTP, parsed with prometheus_client's parser.

A real daemon (its programs on a cgroup this module makes), one policy denying a
loopback port to a process in the scope; the endpoint is scraped with urllib
and read with ``prometheus_client.parser``. Shown: a real denial counted under
its policy, rule, action and kind; a reload that changes that rule's content
starts it from zero; a rejected reload counts as a reload error; revision,
families, sections and map entries as the status says.
"""

from __future__ import annotations

import errno
import importlib.util
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import need, need_root
from support.cgroup import TestCgroup
from support.daemon import ConnectProbe, GuardDaemon, running_daemon
from support.policies import egress, policy_text, tcp_rule

pytestmark = pytest.mark.host


def policy(port: int) -> str:
    return policy_text("lock", egress(tcp_rule("deny", port)))


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[GuardDaemon, ConnectProbe, str, Path]]:
    need_root()
    need(importlib.util.find_spec("prometheus_client") is not None,
         "python3-prometheus-client is not installed (scripts/setup)")
    from guard.kernel.loader import probe_family

    need(probe_family("net").available, "cgroup network programs do not load here")
    work = tmp_path_factory.mktemp("metrics")
    with TestCgroup.create() as top:
        probe = ConnectProbe.start(top.child("in"), 2)
        policies = work / "policies"
        policies.mkdir()
        (policies / "lock.yaml").write_text(policy(probe.ports[0]))
        try:
            with running_daemon(policies, top, f"file:{work / 'events.jsonl'}", work, "m",
                                extra=["--metrics", "127.0.0.1:0", "--no-watch"]) as guard:
                found = re.search(r"serving (http://\S+/metrics)", guard.stderr_text())
                assert found, guard.stderr_text()
                yield guard, probe, found[1], policies
        finally:
            probe.close()


def test_a_denial_is_counted_by_policy_rule_action_kind(running: tuple[
        GuardDaemon, ConnectProbe, str, Path]) -> None:
    guard, probe, url, _ = running
    denied, allowed = probe.ports
    assert probe.connect(allowed) == 0
    assert probe.connect(denied) == errno.EPERM
    rule = dict(policy="lock", rule="lock/egress.rules[0]", action="deny", kind="connect")
    deadline = time.monotonic() + 15
    while value(samples := scrape(url), "guard_policy_events_total", **rule) != 1:
        assert time.monotonic() < deadline, samples
        time.sleep(0.1)
    status = guard.status()
    assert value(samples, "guard_family_enforced", family="net") == 1
    assert value(samples, "guard_policy_section_enforced", policy="lock", section="egress") == 1
    assert value(samples, "guard_policy_revision_info", revision=status["revision"],
                 generation=str(status["generation"])) == 1
    assert value(samples, "guard_policies") == 1
    assert (value(samples, "guard_map_entries", map="guard_net4") or 0) >= 1
    assert (value(samples, "guard_map_capacity", map="guard_net4") or 0) > 1000
    for stage in ("ringbuf", "reader", "malformed", "sink", "events_client"):
        assert value(samples, "guard_events_lost_total", stage=stage) == 0
    assert value(samples, "guard_events_received_total") == status["events"]["received"]


def test_reloads_and_a_changed_rule_starting_from_zero(running: tuple[
        GuardDaemon, ConnectProbe, str, Path]) -> None:
    guard, probe, url, policies = running
    denied, other = probe.ports
    before = scrape(url)
    rule = dict(policy="lock", rule="lock/egress.rules[0]", action="deny", kind="connect")
    assert (value(before, "guard_policy_events_total", **rule) or 0) >= 1
    reloads = value(before, "guard_reloads_total") or 0
    # the same rule, now about the other port: its count starts from zero
    (policies / "lock.yaml").write_text(policy(other))
    guard.wait_reloaded(guard.sighup())
    after = scrape(url)
    assert value(after, "guard_policy_events_total", **rule) is None, after
    assert value(after, "guard_reloads_total") == reloads + 1
    assert (value(after, "guard_last_reload_timestamp_seconds") or 0) > time.time() - 60
    assert guard.status()["rule_hits"] == {}
    assert probe.connect(other) == errno.EPERM and probe.connect(denied) == 0
    deadline = time.monotonic() + 15
    while value(scrape(url), "guard_policy_events_total", **rule) != 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # a broken edit: a reload error, the set in force stays
    broken_text = policy(other).replace("protocol: tcp", "protocol: tcp, x: 1")
    (policies / "lock.yaml").write_text(broken_text)
    guard.wait_reloaded(guard.sighup())
    broken = scrape(url)
    assert value(broken, "guard_reload_errors_total") == 1
    assert value(broken, "guard_reloads_total") == reloads + 2
