"""The long versions of the reliability tests: run by ``make stress`` (SHIFTFS_STRESS=1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent.resolve()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SHIFTFS_STRESS") == "1":
        return
    skip = pytest.mark.skip(reason="long stress test: run with SHIFTFS_STRESS=1 (make stress)")
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)
