"""Helpers the host and guest tests share: real cgroups, network namespaces, syslog.

A kernel test may skip on a developer's machine that lacks a feature, never in
CI (``CI=true``): there a missing feature is a failure (``need``).
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, reason: str) -> None:
    """Skip the test when ``condition`` is false, or fail it in CI."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root (cgroups, network namespaces, BPF)")
