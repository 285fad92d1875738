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
