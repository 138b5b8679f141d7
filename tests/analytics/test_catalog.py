"""MetricIndex's id grids against the per-metric loop they replaced; StepFrame's dense path
against its scatter path."""

from __future__ import annotations

import numpy as np

from analytics.catalog import MetricIndex
from analytics.frame import StepFrame


def _reference_grid(ix: MetricIndex, prefix: str, stat: str) -> np.ndarray:
    layers = ix.moe_layers
    sel = [
        i
        for i in range(ix.size)
        if ix.stat[i] == stat and ix.names[i].startswith(prefix) and ix.expert[i] >= 0
    ]
    n_e = max((int(ix.expert[i]) for i in sel), default=-1) + 1
    grid = np.full((len(layers), n_e), -1, np.int64)
    row = {l: r for r, l in enumerate(layers)}
    for i in sel:
        r = row.get(int(ix.layer[i]))
        if r is not None:
            grid[r, ix.expert[i]] = i
    return grid


def test_expert_grid_matches_the_per_metric_loop_on_random_dictionaries():
    rng = np.random.default_rng(7)
    for trial in range(30):
        n = int(rng.integers(1, 400))
        prefix = rng.choice(["moe/", "grad/", "params/"], n)
        stat = rng.choice(["act_rms", "tokens", "norm"], n)
        layer = rng.integers(-1, 6, n)
        expert = rng.integers(-1, 9, n)  # -1: a layer-level metric; repeats: re-registered
        names = [
            f"{p}layer{l:02d}/e{e}/{s}/{i}"
            for i, (p, l, e, s) in enumerate(zip(prefix, layer, expert, stat))
        ]
        ix = MetricIndex.from_columns(range(n), names, layer, expert, [-1] * n, stat)
        for p in ("moe/", "grad/", "params/", "moe/layer03"):
            for s in ("act_rms", "tokens", "norm", "absent"):
                got, want = ix.expert_grid(p, s), _reference_grid(ix, p, s)
                assert got.shape == want.shape and (got == want).all(), (trial, p, s)


def test_a_whole_step_in_order_gives_the_frame_a_scatter_gives():
    rng = np.random.default_rng(3)
    v = rng.standard_normal(50).astype(np.float32)
    v[[3, 9]] = [np.nan, np.inf]
    ids = np.arange(50)
    dense = StepFrame.from_rows("r", 1, ids, v, 50)
    perm = rng.permutation(50)
    scattered = StepFrame.from_rows("r", 1, ids[perm], v[perm], 50)
    assert dense.values.dtype == scattered.values.dtype == np.float64
    np.testing.assert_array_equal(dense.values, scattered.values)
    assert dense.present.all() and scattered.present.all()
    # not every id, or an id twice: the scatter path, absent ids NaN and not present
    part = StepFrame.from_rows("r", 1, np.array([0, 1, 1, 3]), v[:4], 5)
    assert part.present.tolist() == [True, True, False, True, False]
    assert part.values[1] == v[2] and np.isnan(part.values[4])
