"""collector/idset.py: the ranges of metric ids a rank's schemas hold."""

from __future__ import annotations

import numpy as np

from collector.idset import IdRanges


def test_membership_and_merging_match_a_plain_set():
    rng = np.random.default_rng(3)
    ids, truth = IdRanges(), set()
    for _ in range(200):
        start = int(rng.integers(0, 5_000))
        batch = np.arange(start, start + int(rng.integers(1, 60)))
        if rng.random() < 0.3:
            batch = rng.permutation(batch)[: max(1, batch.size // 2)]
        probe = rng.integers(0, 5_100, 300)
        np.testing.assert_array_equal(ids.contains(probe), [int(p) in truth for p in probe])
        ids.add(batch)
        truth.update(batch.tolist())
    assert len(ids) == len(truth)
    assert (ids.starts[1:] > ids.stops[:-1]).all()  # disjoint, not even touching


def test_a_wide_rank_is_one_range():
    ids = IdRanges()
    for k in range(500):  # 500 parts of 20,000 fresh ids: 10 M metrics
        ids.add(np.arange(k * 20_000, (k + 1) * 20_000, dtype=np.int32))
    assert ids.starts.tolist() == [0] and ids.stops.tolist() == [10_000_000]
    assert ids.contains(np.array([-1, 0, 9_999_999, 10_000_000])).tolist() == [
        False,
        True,
        True,
        False,
    ]
