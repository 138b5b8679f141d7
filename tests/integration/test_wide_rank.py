"""A rank of a million metrics end to end: registered in packed schema parts, streamed through a
real `python -m collector serve` into Parquet, read back exactly (`benchmarks/wide_rank.py`,
which the README runs at 10 M). Before the columnar path this took ~50 s of registration (a
protobuf per metric on both sides, the whole dictionary rewritten per flush); here it is
seconds, so it runs with the fast suite."""

from __future__ import annotations

import pytest

from benchmarks.wide_rank import run

pytestmark = pytest.mark.timeout(600)


def test_a_million_metrics_on_one_rank_register_stream_and_read_back_exactly(tmp_path):
    r = run(1_000_000, 2, tmp_path)  # raises when anything read back differs
    print(r)
    assert r["packed"]  # towards this collector every part goes in the packed form
    assert r["parts"] > 40  # really cut into parts under the message limit
