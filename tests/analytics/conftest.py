"""Fixtures of the analytics tests: a seeded synthetic run (tests/analytics/synthetic.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.` imports

from tests.analytics.synthetic import SyntheticRun


@pytest.fixture
def syn() -> SyntheticRun:
    return SyntheticRun(seed=0)
