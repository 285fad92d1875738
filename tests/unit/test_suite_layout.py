"""The suite's own shape: pytest imports test modules by their basename (rootdir
import mode), so two layers with a test file of the same name stop the collection
of the whole suite ("import file mismatch") — once seen only in a clean CI clone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_names_are_unique_across_layers() -> None:
    names = Counter(p.name for p in TESTS.glob("*/test_*.py"))
    assert names, "no test modules found"
    assert [name for name, n in names.items() if n > 1] == []
