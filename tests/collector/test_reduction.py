"""reduction.py: each op against an independent per-metric computation, NaN/inf propagation,
n_ranks per metric, and that only the included ranks are reduced."""
from __future__ import annotations

import numpy as np
import pytest

from collector.reduction import (OP_MAX, OP_MEAN, OP_MIN, OP_SUM, gather, reduce_rows,
                                 reduce_step)
from store.base import StepStatus

OPS = {OP_SUM: np.sum, OP_MEAN: np.mean, OP_MAX: np.max, OP_MIN: np.min}


def test_each_op_matches_a_per_metric_loop():
    rng = np.random.default_rng(0)
    M, R = 40, 5
    ops_M = rng.choice(list(OPS), size=M).astype(np.int8)
    # every rank sends a random subset of metrics, in a random order
    ids, vals = [], []
    for _ in range(R):
        sub = rng.permutation(M)[: rng.integers(1, M)]
        ids.append(sub)
        vals.append(rng.normal(size=sub.size).astype(np.float32))
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
    assert np.isnan(vals[0])                       # max/min must not skip the NaN (fmax would)
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
    ids_S = np.array([2, 0, 1], np.int32)                 # schema position -> metric id
    ops_M = np.array([OP_SUM, OP_MAX, OP_MEAN], np.int8)
    full = np.ones(3, bool)
    partial = np.array([True, False, True])
    parts = [(0, ids_S, np.array([1, 2, 3], np.float32), full),
             (1, ids_S, np.array([10, 20, 30], np.float32), full),
             (2, ids_S, np.array([100, 999, 300], np.float32), partial)]   # rank 2 straggles
    status = StepStatus(step=7, n_ranks=2, missing_ranks=(2,), complete=False)
    rows = reduce_step(7, parts, {0, 1}, ops_M, status)

    assert rows.raw.value.size == 8                        # 3 + 3 + the 2 values rank 2 sent
    assert set(rows.raw.rank.tolist()) == {0, 1, 2}
    assert 999 not in rows.raw.value                       # not sent (have=False): not stored
    np.testing.assert_array_equal(rows.reduced.metric_id, [0, 1, 2])
    np.testing.assert_array_equal(rows.reduced.value, [2 + 20, max(3, 30), (1 + 10) / 2])
    np.testing.assert_array_equal(rows.reduced.n_ranks, [2, 2, 2])
    assert (rows.reduced.step == 7).all() and (rows.raw.step == 7).all()
    assert rows.status is status


def test_gather_of_nothing_is_empty():
    rows = gather([])
    assert rows.value.size == 0 and rows.metric_id.dtype == np.int32
