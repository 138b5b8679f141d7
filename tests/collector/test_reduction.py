"""reduction.py: each op against an independent per-metric computation, NaN/inf propagation,
n_ranks per metric, and that only the included ranks are reduced."""

from __future__ import annotations

import numpy as np
import pytest

from collector.reduction import (
    OP_MAX,
    OP_MEAN,
    OP_MEAN_NONZERO,
    OP_MIN,
    OP_SUM,
    Accumulator,
    gather,
    reduce_step,
)
from store.base import StepStatus


def mean_nonzero(v: np.ndarray) -> float:
    """The reference: the mean of the values that are not 0 (NaN is not), 0 if none is."""
    nz = v[v != 0]
    return float(nz.mean()) if nz.size else 0.0


OPS = {
    OP_SUM: np.sum,
    OP_MEAN: np.mean,
    OP_MAX: np.max,
    OP_MIN: np.min,
    OP_MEAN_NONZERO: mean_nonzero,
}


def with_zeros(rng, v: np.ndarray, share: float = 0.4) -> np.ndarray:
    """v with about `share` of its values set to 0 (a rank that routed an expert nothing):
    mean and mean_nonzero differ only where some are."""
    v[rng.random(v.size) < share] = 0.0
    return v


def reduce_rows(
    metric_id: np.ndarray, value: np.ndarray, ops_M: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows reduced per metric id by ops_M[id]: (ids, values f32, n_ranks i32) of every id
    that had a row, sorted by id."""
    acc = Accumulator(ops_M)
    acc.add_rows(metric_id, value)
    return acc.result()


def test_each_op_matches_a_per_metric_loop():
    rng = np.random.default_rng(0)
    M, R = 40, 5
    ops_M = rng.choice(list(OPS), size=M).astype(np.int8)
    # every rank sends a random subset of metrics, in a random order
    ids, vals = [], []
    for _ in range(R):
        sub = rng.permutation(M)[: rng.integers(1, M)]
        ids.append(sub)
        vals.append(with_zeros(rng, rng.normal(size=sub.size).astype(np.float32)))
    metric_id = np.concatenate(ids).astype(np.int32)
    value = np.concatenate(vals)

    got_ids, got_vals, got_n = reduce_rows(metric_id, value, ops_M)

    expect_ids = np.unique(metric_id)
    np.testing.assert_array_equal(got_ids, expect_ids)
    for i, mid in enumerate(expect_ids):
        rows = value[metric_id == mid].astype(np.float64)
        assert got_n[i] == rows.size
        np.testing.assert_allclose(got_vals[i], OPS[ops_M[mid]](rows), rtol=1e-6, atol=1e-6)
    assert got_vals.dtype == np.float32 and got_n.dtype == np.int32


@pytest.mark.parametrize("op", list(OPS))
def test_nan_on_any_rank_gives_nan(op):
    ops_M = np.array([op, op], np.int8)
    metric_id = np.array([0, 0, 0, 1, 1], np.int32)
    value = np.array([1.0, np.nan, 3.0, 2.0, 5.0], np.float32)
    _, vals, _ = reduce_rows(metric_id, value, ops_M)
    assert np.isnan(vals[0])  # max/min must not skip the NaN (fmax would)
    assert vals[1] == OPS[op](np.array([2.0, 5.0]))


def test_infinities_propagate():
    ops_M = np.array([OP_SUM, OP_MAX, OP_MIN, OP_MEAN], np.int8)
    metric_id = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)
    value = np.array([np.inf, -np.inf, np.inf, 1, -np.inf, 1, np.inf, 1], np.float32)
    _, vals, _ = reduce_rows(metric_id, value, ops_M)
    assert np.isnan(vals[0]) and vals[1] == np.inf and vals[2] == -np.inf and vals[3] == np.inf


def test_sum_accumulates_in_float64():
    n = 10_000
    metric_id = np.zeros(n, np.int32)
    value = np.full(n, 0.1, np.float32)
    _, vals, _ = reduce_rows(metric_id, value, np.array([OP_SUM], np.int8))
    assert vals[0] == np.float32(np.float64(np.float32(0.1)) * n)


def test_reduce_step_keeps_stragglers_raw_but_out_of_the_reduction():
    ids_S = np.array([2, 0, 1], np.int32)  # schema position -> metric id
    ops_M = np.array([OP_SUM, OP_MAX, OP_MEAN], np.int8)
    full = np.ones(3, bool)
    partial = np.array([True, False, True])
    parts = [
        (0, ids_S, np.array([1, 2, 3], np.float32), full),
        (1, ids_S, np.array([10, 20, 30], np.float32), full),
        (2, ids_S, np.array([100, 999, 300], np.float32), partial),
    ]  # rank 2 straggles
    status = StepStatus(step=7, n_ranks=2, missing_ranks=(2,), complete=False)
    rows = reduce_step(7, parts, {0, 1}, ops_M, status)

    assert rows.raw.value.size == 8  # 3 + 3 + the 2 values rank 2 sent
    assert set(rows.raw.rank.tolist()) == {0, 1, 2}
    assert 999 not in rows.raw.value  # not sent (have=False): not stored
    np.testing.assert_array_equal(rows.reduced.metric_id, [0, 1, 2])
    np.testing.assert_array_equal(rows.reduced.value, [2 + 20, max(3, 30), (1 + 10) / 2])
    np.testing.assert_array_equal(rows.reduced.n_ranks, [2, 2, 2])
    assert (rows.reduced.step == 7).all() and (rows.raw.step == 7).all()
    assert rows.status is status


def test_gather_of_nothing_is_empty():
    rows = gather([])
    assert rows.value.size == 0 and rows.metric_id.dtype == np.int32


# ---- the matrix path against the flat reference ----------------------------------------------
def flat_reference(parts, included, ops_M):
    """Per metric id, the op over the values of included ranks, one Python loop per id."""
    rows = gather([p for p in parts if p[0] in included])
    out = {}
    for mid in np.unique(rows.metric_id):
        v = rows.value[rows.metric_id == mid].astype(np.float64)
        with np.errstate(invalid="ignore"):
            out[int(mid)] = (OPS[ops_M[mid]](v), v.size)
    return out


def random_step(rng, *, n_layouts=5, ranks=40, M=300, S=60):
    """Layouts drawn from one id space: every layout holds the shared ids 0..9 (the loss...),
    plus a random subset of the rest, so ids overlap across layouts. NaN/inf sprinkled in.
    Some ranks straggle (partial vector, not included), some are included with a gap, some
    sent a whole vector but never ended the step."""
    ops_M = rng.choice(list(OPS), size=M).astype(np.int8)
    layouts = [
        np.concatenate([np.arange(10), rng.choice(np.arange(10, M), S - 10, replace=False)]).astype(
            np.int32
        )
        for _ in range(n_layouts)
    ]
    for ids in layouts:
        rng.shuffle(ids)
    parts, included = [], set()
    for rank in range(ranks):
        ids = layouts[rank % n_layouts]
        v = with_zeros(rng, rng.normal(size=S).astype(np.float32))
        bad = rng.random(S) < 0.01
        v[bad] = rng.choice([np.nan, np.inf, -np.inf], size=int(bad.sum()))
        have = np.ones(S, bool)
        kind = rank % 7
        if kind in (1, 2):  # partial: straggler (1) or a gap (2)
            have[rng.choice(S, S // 3, replace=False)] = False
        if kind not in (1, 3):  # 3: whole vector, never ended the step
            included.add(rank)
        parts.append((rank, ids, v, have))
    return parts, included, ops_M


@pytest.mark.parametrize("seed", range(6))
def test_matrix_reduction_equals_the_flat_reference(seed):
    rng = np.random.default_rng(seed)
    parts, included, ops_M = random_step(rng)
    status = StepStatus(step=3, n_ranks=len(included))
    rows = reduce_step(3, parts, included, ops_M, status)

    expect = flat_reference(parts, included, ops_M)
    np.testing.assert_array_equal(rows.reduced.metric_id, sorted(expect))
    np.testing.assert_array_equal(rows.reduced.n_ranks, [expect[m][1] for m in sorted(expect)])
    np.testing.assert_allclose(
        rows.reduced.value,
        [expect[m][0] for m in sorted(expect)],
        rtol=1e-6,
        atol=1e-6,
        equal_nan=True,
    )
    assert np.isnan(rows.reduced.value).any() and np.isinf(rows.reduced.value).any()
    assert rows.reduced.value.dtype == np.float32 and rows.reduced.n_ranks.dtype == np.int32
    # shared ids are reduced over every layout's ranks at once, not per layout
    loss = int(np.flatnonzero(rows.reduced.metric_id == 0)[0])
    assert rows.reduced.n_ranks[loss] == sum(
        1 for r, _, _, h in parts if r in included and h[list(parts[r][1]).index(0)]
    )


def sorted_rows(batch):
    order = np.lexsort((batch.metric_id, batch.rank))
    return batch.rank[order], batch.metric_id[order], batch.value[order]


def test_whole_vectors_become_one_block_per_layout_and_raw_keeps_every_value():
    rng = np.random.default_rng(7)
    parts, included, ops_M = random_step(rng, n_layouts=3, ranks=21)
    rows = reduce_step(5, parts, included, ops_M, StepStatus(step=5, n_ranks=len(included)))

    whole = [p for p in parts if p[3].all()]
    assert len(rows.blocks) == 3
    for block in rows.blocks:
        assert block.step == 5 and block.value.dtype == np.float32
        assert block.value.flags.c_contiguous
        for i, rank in enumerate(block.rank.tolist()):
            r, ids, v, _ = parts[rank]
            assert ids is block.metric_id
            np.testing.assert_array_equal(block.value[i], v)
    assert sum(b.rank.size for b in rows.blocks) == len(whole)  # stragglers' whole vectors too
    assert set(rows.rest.rank.tolist()) == {p[0] for p in parts if not p[3].all()}
    assert rows.n_raw == sum(int(p[3].sum()) for p in parts)
    # the flat view is exactly what every rank sent, stragglers included
    ref = gather(parts)
    for got, want in zip(sorted_rows(rows.raw), sorted_rows(ref)):
        np.testing.assert_array_equal(got, want)
    assert (rows.raw.step == 5).all()


def test_equal_id_maps_that_are_distinct_objects_still_reduce_correctly():
    ids = np.array([0, 1], np.int32)
    ops_M = np.array([OP_MEAN, OP_MAX], np.int8)
    full = np.ones(2, bool)
    parts = [
        (0, ids, np.array([1, 5], np.float32), full),
        (1, ids.copy(), np.array([3, 2], np.float32), full),
    ]  # same content, new array
    rows = reduce_step(0, parts, {0, 1}, ops_M, StepStatus(step=0, n_ranks=2))
    assert len(rows.blocks) == 2
    np.testing.assert_array_equal(rows.reduced.value, [2, 5])
    np.testing.assert_array_equal(rows.reduced.n_ranks, [2, 2])


def test_a_layout_whose_ranks_are_all_excluded_is_stored_but_not_reduced():
    a, b = np.array([0, 1], np.int32), np.array([1, 2], np.int32)
    ops_M = np.array([OP_SUM, OP_SUM, OP_MIN], np.int8)
    full = np.ones(2, bool)
    parts = [
        (0, a, np.array([1, 2], np.float32), full),
        (1, b, np.array([30, 40], np.float32), full),
    ]  # rank 1 never ended
    rows = reduce_step(0, parts, {0}, ops_M, StepStatus(step=0, n_ranks=1))
    np.testing.assert_array_equal(rows.reduced.metric_id, [0, 1])
    np.testing.assert_array_equal(rows.reduced.value, [1, 2])
    assert rows.n_raw == 4 and len(rows.blocks) == 2


def test_matrix_ids_outside_the_run_are_refused():
    ids = np.array([0, 5], np.int32)
    parts = [(0, ids, np.zeros(2, np.float32), np.ones(2, bool))]
    with pytest.raises(ValueError, match="metric id 5 outside the run's 2 metrics"):
        reduce_step(
            0, parts, {0}, np.array([OP_SUM, OP_SUM], np.int8), StepStatus(step=0, n_ranks=1)
        )


def test_a_resent_chunk_through_the_barrier_is_reduced_once():
    from collector.barrier import ByteBudget, StepBarrier

    b = StepBarrier(2, straggler_timeout_s=10.0, max_pending_steps=4, budget=ByteBudget(1 << 20))
    ids = np.array([2, 0, 1], np.int32)
    ops_M = np.array([OP_SUM, OP_MEAN, OP_MAX], np.int8)
    b.add_chunk(0, 0, 1, 0, 3, np.array([1, 2, 3], np.float32))
    b.add_chunk(0, 0, 1, 0, 3, np.array([1, 2, 3], np.float32))  # resent after reconnect
    b.add_chunk(1, 0, 1, 0, 3, np.array([10, 20], np.float32))
    b.add_chunk(1, 0, 1, 2, 3, np.array([30], np.float32))
    b.add_chunk(1, 0, 1, 0, 3, np.array([11, 21], np.float32))  # replaced, not added
    b.end_of_step(0, 0, 3, 0.0, now=0.0)
    b.end_of_step(1, 0, 3, 0.0, now=0.0)
    [ready] = b.poll(now=0.0)
    parts = [(r, ids, v, h) for r, _, v, h in ready.parts]
    rows = reduce_step(0, parts, ready.included, ops_M, ready.status)
    np.testing.assert_array_equal(rows.reduced.value, [2 + 21, (3 + 30) / 2, max(1, 11)])
    np.testing.assert_array_equal(rows.reduced.n_ranks, [2, 2, 2])
    assert len(rows.blocks) == 1 and rows.n_raw == 6


@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("n_parts", [1, 3])
def test_one_ranks_whole_vectors_reduce_bit_for_bit_as_the_accumulator_does(shuffled, n_parts):
    """A world-1 step (one rank's whole vectors, one per wire schema part) takes a path
    without the accumulator: its reduced ids, values (bits: -0.0 summed to +0.0, NaN, inf,
    huge) and n_ranks equal the accumulator's, ids sorted, one raw block per part holding
    the part's vector."""
    rng = np.random.default_rng(7)
    M = 400
    ops_M = rng.integers(1, 6, M + 10).astype(np.int8)  # the run has ids the step lacks
    ids = np.arange(M, dtype=np.int32)
    if shuffled:
        ids = rng.permutation(ids).astype(np.int32)
    v = rng.normal(size=M).astype(np.float32)
    v[:8] = [-0.0, np.nan, np.inf, -np.inf, 3.0e38, -3.0e38, 0.0, 1e-45]
    cuts = np.array_split(np.arange(M), n_parts)
    parts = [(2, ids[c], v[c], np.ones(c.size, bool)) for c in cuts]
    want_ids, want_v, want_n = reduce_rows(ids, v, ops_M)
    rows = reduce_step(3, parts, {2}, ops_M, StepStatus(3, 1))
    r = rows.reduced
    np.testing.assert_array_equal(r.metric_id, want_ids)
    assert r.metric_id.dtype == np.int32 and r.value.dtype == np.float32
    np.testing.assert_array_equal(r.value.view(np.uint32), want_v.view(np.uint32))
    np.testing.assert_array_equal(r.n_ranks, want_n)
    np.testing.assert_array_equal(r.step, np.full(M, 3))
    assert len(rows.blocks) == n_parts
    for block, (_, ids_S, v_S, _) in zip(rows.blocks, parts):
        assert block.rank.tolist() == [2] and block.metric_id is ids_S
        np.testing.assert_array_equal(block.value, v_S[np.newaxis])
    assert rows.rest.value.size == 0 and rows.n_raw == M
    minus_zero = int(np.flatnonzero(want_ids == ids[0])[0])
    if ops_M[ids[0]] in (OP_SUM, OP_MEAN, OP_MEAN_NONZERO):  # -0.0 summed is +0.0 (max/min keep it)
        assert r.value[minus_zero].view(np.uint32) == 0


def test_one_rank_sending_an_id_in_two_parts_is_reduced_over_both():
    """Not a case the registry lets through, but the reduction stays the accumulator's: the
    id counts twice (mean over both values), not once."""
    ops_M = np.array([OP_MEAN, OP_SUM], np.int8)
    ids = np.array([0, 1], np.int32)
    parts = [(0, ids, np.array([1.0, 2.0], np.float32), np.ones(2, bool))] * 2
    parts[1] = (0, ids.copy(), np.array([3.0, 5.0], np.float32), np.ones(2, bool))
    r = reduce_step(0, parts, {0}, ops_M, StepStatus(0, 1)).reduced
    assert r.value.tolist() == [2.0, 7.0] and r.n_ranks.tolist() == [2, 2]


def test_mean_nonzero_is_the_owners_value_where_a_plain_mean_divides_it_by_the_world():
    """Expert parallelism: only rank 2 holds expert 0 (the others report 0 for it); data
    parallelism: expert 1 got tokens on 2 of 4 ranks. mean_nonzero gives the owner's value
    and the mean of the two that saw it; mean gives those divided by 4 and 2. An expert no
    rank fed reduces to 0; NaN on one rank is NaN; n_ranks counts every rank that sent it."""
    ids = np.arange(4, dtype=np.int32)
    v = np.array([[0, 1.0, 0, 5], [0, 3.0, 0, 5], [8.0, 0, 0, np.nan], [0, 0, 0, 5]], np.float32)
    for ops in (np.full(4, OP_MEAN_NONZERO, np.int8), np.full(4, OP_MEAN, np.int8)):
        whole = [(r, ids, v[r], np.ones(4, bool)) for r in range(4)]
        gaps = [(r, ids, v[r], np.array([True, True, True, r != 1])) for r in range(4)]
        for parts in (whole, gaps):  # the matrix path, then flat rows
            got = reduce_step(1, parts, {0, 1, 2, 3}, ops, StepStatus(1, 4)).reduced
            if ops[0] == OP_MEAN_NONZERO:
                assert got.value[:3].tolist() == [8.0, 2.0, 0.0]
            else:
                assert got.value[:3].tolist() == [2.0, 1.0, 0.0]
            assert np.isnan(got.value[3]) and got.n_ranks.tolist()[:3] == [4, 4, 4]
