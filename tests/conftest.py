"""Test-suite wiring shared by all layers (unit, host, guest).

- Marks tests under tests/guest with ``guest`` and under tests/host with ``host``.
- On the host, runs every selected ``guest`` test inside one BPF-LSM QEMU guest per
  session and reports its real outcome here (see tests/guestharness.py).
- Inside that guest, records each test's outcome for the host.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guestharness  # needs the path above


def pytest_configure(config: pytest.Config) -> None:
    guestharness.configure(config)



class SkipIsFailureInCI:
    """In CI a skipped (or xfailed) test is a failed one: a feature whose test did not run is not
    shown to work (support.need already fails there; this catches every other skip,
    including those relayed from the guest). Registered at session start, after the
    session itself, so that it turns the report round before the session counts it."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not report.skipped:  # an xfail is a skipped report too: unproved as well
            return
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        if hasattr(report, "wasxfail"):  # the session does not count a failed xfail
            del report.wasxfail
        report.longrepr = f"skipped in CI, where every test must run: {reason}"


def pytest_sessionstart(session: pytest.Session) -> None:
    from support import in_ci

    if in_ci():
        session.config.pluginmanager.register(SkipIsFailureInCI(), "skip-is-failure-in-ci")
