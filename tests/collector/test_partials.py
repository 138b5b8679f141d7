"""partials.py: a step reduced as partials of rank subsets, combined, gives the very values a
single collector's reduce_step gives (every op, partial vectors, stragglers, NaN and inf);
the wire encoding round-trips; overlapping partials are refused."""

from __future__ import annotations

import numpy as np
import pytest

from collector import partials
from collector.partials import NonFiniteRanks, Partial, combine, finish, partial_of
from collector.reduction import OP_MAX, OP_MEAN, OP_MEAN_NONZERO, OP_MIN, OP_SUM, reduce_step
from store.base import RawBlock, StepStatus, ValueBatch

OPS = np.array([OP_SUM, OP_MEAN, OP_MAX, OP_MIN, OP_MEAN_NONZERO], dtype=np.int8)


def make_step(seed: int, R: int = 6, M: int = 50):
    """parts of R ranks: two layouts of whole vectors, one rank with a partial vector."""
    rng = np.random.default_rng(seed)
    ops_M = rng.choice(OPS, size=M).astype(np.int8)
    lay_a = np.arange(0, 30, dtype=np.int32)
    lay_b = np.arange(20, M, dtype=np.int32)  # overlaps a: ids in both layouts
    parts = []
    for r in range(R):
        ids = lay_a if r % 2 == 0 else lay_b
        v = (rng.standard_normal(ids.size) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
        v[rng.random(ids.size) < 0.4] = 0.0  # ranks that routed an expert nothing
        have = np.ones(ids.size, bool)
        if r == R - 1:
            have[rng.permutation(ids.size)[:7]] = False  # a vector with gaps
        parts.append((r, ids, v, have))
    return parts, ops_M


def tier_reduce(step, parts, included, ops_M, groups):
    """Each group of ranks as one collector: its raw rows -> a partial; then combined."""
    status = StepStatus(step, len(included), (), True, 0.0)
    partials = []
    for g in groups:
        mine = [p for p in parts if p[0] in g]
        rows = reduce_step(step, mine, included & set(g), ops_M, status)
        ranks = frozenset(included & set(g))
        partials.append(partial_of("r", step, rows.blocks, rows.rest, ranks))
    p = combine([Partial.decode(x.encode()) for x in partials])  # through the wire format
    return finish(p, ops_M)


@pytest.mark.parametrize("seed", range(5))
def test_partials_combined_equal_the_single_collector_bit_for_bit(seed):
    parts, ops_M = make_step(seed)
    included = {0, 1, 2, 3, 5}  # rank 4 is a straggler: stored raw, never reduced
    single = reduce_step(7, parts, included, ops_M, StepStatus(7, 5, (4,), False, 0.0)).reduced
    for groups in ([[0, 2, 4], [1, 3, 5]], [[0, 1], [2, 3], [4, 5]], [[5], [0, 1, 2, 3, 4]]):
        ids, vals, n = tier_reduce(7, parts, included, ops_M, groups)
        assert np.array_equal(ids, single.metric_id)
        assert vals.tobytes() == single.value.tobytes()  # bit for bit
        assert np.array_equal(n, single.n_ranks)


def test_nan_and_inf_on_one_collector_reach_the_reduced_step():
    ids = np.arange(4, dtype=np.int32)
    ops_M = OPS[:4].copy()  # sum, mean, max, min
    parts = [
        (0, ids, np.array([1, 2, 3, 4], np.float32), np.ones(4, bool)),
        (1, ids, np.array([np.nan, np.inf, np.nan, -np.inf], np.float32), np.ones(4, bool)),
    ]
    _, vals, _ = tier_reduce(0, parts, {0, 1}, ops_M, [[0], [1]])
    assert np.isnan(vals[0]) and np.isposinf(vals[1]) and np.isnan(vals[2])
    assert np.isneginf(vals[3])


def test_overlapping_partials_are_refused():
    p = Partial("r", 1, frozenset({0, 1}))
    q = Partial("r", 1, frozenset({1, 2}))
    with pytest.raises(ValueError, match="overlap in ranks \\[1\\]"):
        combine([p, q])


def test_decode_refuses_arrays_of_unequal_length():
    p = Partial("r", 1, frozenset({0}), ids=np.array([1, 2], np.int32))
    with pytest.raises(ValueError, match="5 or 6 arrays of one length"):
        Partial.decode(p.encode())


def nan_block(step: int, ranks: list[int], bad: dict[int, int]) -> RawBlock:
    """Whole vectors of ids 0..3 for `ranks`; rank r's value of id bad[r] is NaN."""
    v = np.ones((len(ranks), 4), np.float32)
    for i, r in enumerate(ranks):
        if r in bad:
            v[i, bad[r]] = np.nan
    return RawBlock(step, np.array(ranks, np.int32), np.arange(4, dtype=np.int32), v)


def test_a_partial_names_the_ranks_and_ids_of_its_non_finite_values():
    none = np.empty(0, np.int32)
    rest = ValueBatch(
        np.array([3], np.int64),
        np.array([2], np.int32),
        np.array([np.inf], np.float32),
        rank=np.array([9], np.int32),
    )
    p = partial_of("r", 3, [nan_block(3, [0, 1, 2], {1: 3, 2: 3})], rest, frozenset({0, 1, 2, 9}))
    q = partial_of(
        "r",
        3,
        [nan_block(3, [4, 5], {5: 0})],
        ValueBatch(np.empty(0, np.int64), none, np.empty(0, np.float32), rank=none),
        frozenset({4, 5}),
    )
    assert p.nonfinite.tolist() == [[1, 3], [2, 3], [9, 2]]
    both = combine([Partial.decode(x.encode()) for x in (p, q)])  # through the wire format
    assert both.nonfinite.tolist() == [[1, 3], [2, 3], [5, 0], [9, 2]]
    ev = NonFiniteRanks(both.nonfinite)
    assert ev.nonfinite(3) == [1, 2] and ev.nonfinite(1) == [] and len(ev) == 0
    # a healthy partial says nothing of it on the wire (older coordinators read past it)
    healthy = partial_of("r", 3, [nan_block(3, [0, 1], {})], rest, frozenset({0, 1}))
    assert healthy.nonfinite.size == 0 and b"nonfinite" not in healthy.encode()


def test_a_nan_storm_is_listed_up_to_the_cap_and_counted_beyond(monkeypatch):
    monkeypatch.setattr(partials, "MAX_NONFINITE", 5)
    none = np.empty(0, np.int32)
    empty = ValueBatch(np.empty(0, np.int64), none, np.empty(0, np.float32), rank=none)
    p = partial_of(
        "r", 0, [nan_block(0, [0, 1, 2], {0: 0, 1: 1, 2: 2})], empty, frozenset({0, 1, 2})
    )
    q = partial_of(
        "r", 0, [nan_block(0, [3, 4, 5], {3: 0, 4: 1, 5: 2})], empty, frozenset({3, 4, 5})
    )
    assert len(p.nonfinite) == 3 and p.nonfinite_more == 0
    both = combine([Partial.decode(x.encode()) for x in (p, q)])
    assert len(both.nonfinite) == 5 and both.nonfinite_more == 1


def test_an_older_tiers_five_arrays_read_as_every_value_nonzero():
    """A Partial from a tier before the nonzero counts (five arrays): mean_nonzero falls back
    to the plain mean of its ranks; with six, the zeros are left out."""
    ids = np.array([0], np.int32)
    block = RawBlock(1, np.array([0, 1], np.int32), ids, np.array([[0.0], [6.0]], np.float32))
    none = np.empty(0, np.int32)
    empty = ValueBatch(np.empty(0, np.int64), none, np.empty(0, np.float32), rank=none)
    p = partial_of("r", 1, [block], empty, frozenset({0, 1}))
    ops = np.array([OP_MEAN_NONZERO], np.int8)
    assert finish(Partial.decode(p.encode()), ops)[1].tolist() == [6.0]
    meta, arrays = partials._unpack(p.encode())
    older = b"".join(partials._pack(meta, arrays[:5]))
    assert finish(Partial.decode(older), ops)[1].tolist() == [3.0]
