"""Reduced values as vectors (store/reduced.py), on every backend: reads are the logical table
whatever the grouping, and a world-1 run's values stored once read back exactly."""

from __future__ import annotations

import glob
import os

import numpy as np
import polars as pl
import pytest

from store import MetricDict, RawBlock, RunInfo, ValueBatch
from store.parquet import ParquetStore
from store.segments import SegmentLog

M = 12
NAMES = [f"m{i:02d}" for i in range(M)]


def open_run(st, run="w1", world_size=1):
    st.open_run(RunInfo(run, world_size))
    st.write_metrics(
        run,
        MetricDict(
            np.arange(M, dtype=np.int32),
            NAMES,
            np.full(M, -1),
            np.full(M, -1),
            np.full(M, -1),
            [""] * M,
            [""] * M,
            ["mean"] * M,
        ),
    )


def reduced(step, ids, values, n_ranks=1) -> ValueBatch:
    order = np.argsort(ids)  # the collector writes reduced ids ascending
    ids, values = np.asarray(ids)[order], np.asarray(values, np.float32)[order]
    return ValueBatch(
        step=np.full(ids.size, step, np.int64),
        metric_id=ids.astype(np.int32),
        value=values,
        n_ranks=np.full(ids.size, n_ranks, np.int32),
    )


def world_one_history(st, rng, steps=12, ordered=False):
    """A world-1 run as the collector writes it: per step a RawBlock of the schema (ids not
    sorted), or flat rows of a partial vector, then the reduced values (equal, but for one
    -0.0, which the float64 sum makes +0.0), flushes every few steps (ordered: the schema's
    ids ascending, as a rank registering its metrics in order has them: its raw and reduced
    vectors are then of one layout). Returns the expected reduced {(step, metric): value}."""
    schema = np.arange(M, dtype=np.int32) if ordered else rng.permutation(M).astype(np.int32)
    expect = {}
    for s in range(steps):
        v = rng.standard_normal(M).astype(np.float32)
        red = v.copy()
        if s == 3:
            p = int(np.flatnonzero(schema == 2)[0])  # metric m02; step 3 is a whole vector
            v[p], red[p] = np.float32(-0.0), np.float32(0.0)  # 0.0 + -0.0 = 0.0
        if s % 4 == 1:  # a partial vector: flat rows, no values for the first 5 ids
            ids, vals = schema[5:], v[5:]
            st.write_raw(
                "w1", ValueBatch(np.full(ids.size, s), ids, vals, rank=np.zeros(ids.size, np.int32))
            )
            red_ids, red_vals = ids, red[5:]
        else:
            st.write_raw_block("w1", RawBlock(s, np.array([0], np.int32), schema, v[None, :]))
            red_ids, red_vals = schema, red
        st.write_reduced("w1", reduced(s, red_ids, red_vals))
        expect.update({(s, int(m)): float(x) for m, x in zip(red_ids, red_vals)})
        if s % 3 == 2:
            st.flush()
    st.flush()
    return expect


def read_all(st, run="w1"):
    got = {}
    for name in NAMES:
        mid = NAMES.index(name)
        for step, value in st.series(run, name).rows():
            got[(step, mid)] = value
    return got


def test_world_one_reduced_reads_are_exact(store):
    open_run(store)
    expect = world_one_history(store, np.random.default_rng(0))
    got = read_all(store)
    assert got == pytest.approx(expect, abs=0)
    zero = store.series("w1", "m02", start=3, stop=4)["value"].to_numpy()
    assert zero.tolist() == [0.0] and not np.signbit(zero[0])  # reduced +0.0, not raw -0.0
    assert dict(store.series("w1", "m07", start=4, stop=9).rows()) == {
        s: v for (s, m), v in expect.items() if m == 7 and 4 <= s < 9
    }
    for step in (0, 1, 3):
        at = store.at_step("w1", step)
        assert dict(zip(at["metric_id"].to_list(), at["value"].to_list())) == {
            m: v for (s, m), v in expect.items() if s == step
        }


def test_world_one_rewrites_and_other_worlds(store):
    open_run(store)
    expect = world_one_history(store, np.random.default_rng(1), steps=4)
    store.write_reduced("w1", reduced(2, [4, 5], [10.0, 11.0]))  # a later reduced rewrite
    store.flush()
    expect[(2, 4)], expect[(2, 5)] = 10.0, 11.0
    assert read_all(store) == expect
    open_run(store, "w2", world_size=2)  # n_ranks 1 of a world-2 run: its own values
    store.write_raw_block("w2", RawBlock(0, np.array([1], np.int32), np.arange(M), np.ones((1, M))))
    store.write_reduced("w2", reduced(0, np.arange(M), np.full(M, 2.0), n_ranks=1))
    store.flush()
    assert store.series("w2", "m03").rows() == [(0, 2.0)]
    assert store.series("w2", "m03", rank=1).rows() == [(0, 1.0)]


def test_mixed_n_ranks_in_one_step_read_as_one_table(store):
    """Ids reduced over different numbers of ranks are separate vectors of one step; a later
    write regrouping them wins cell by cell."""
    open_run(store, "r", world_size=8)
    ids = np.arange(M, dtype=np.int32)
    n = np.where(ids < 4, 8, 2).astype(np.int32)
    for step in range(3):
        store.write_reduced("r", ValueBatch(np.full(M, step), ids, ids + step * 100.0, n_ranks=n))
    store.flush()
    store.write_reduced("r", ValueBatch(np.full(3, 1), ids[2:5], np.full(3, -1.0), n_ranks=n[:3]))
    store.flush()
    assert store.series("r", "m03").rows() == [(0, 3.0), (1, -1.0), (2, 203.0)]
    assert store.series("r", "m05").rows() == [(0, 5.0), (1, 105.0), (2, 205.0)]
    at = store.at_step("r", 1)
    assert at["value"].to_list() == [100, 101, -1, -1, -1] + [100.0 + i for i in range(5, M)]


# ---- Parquet: what is on disk -------------------------------------------------------------
@pytest.mark.parametrize("ordered", [False, True], ids=["cell-by-cell", "vector-to-vector"])
def test_parquet_world_one_values_are_stored_once(tmp_path, ordered):
    st = ParquetStore(str(tmp_path), fsync=False)
    open_run(st)
    expect = world_one_history(st, np.random.default_rng(2), ordered=ordered)
    assert read_all(st) == pytest.approx(expect, abs=0)
    rows = pl.read_parquet(glob.glob(str(tmp_path / "w1" / "reduced_vectors" / "*.parquet")))
    rows = rows.sort("step")
    own = rows.filter(pl.col("source") == -1)
    assert own["step"].to_list() == [3]  # only the step whose reduced bits differ
    assert own["values"].bin.size().to_list() == [4 * M]
    assert (rows.filter(pl.col("source") == 0)["values"].bin.size() == 0).all()
    assert not os.path.exists(tmp_path / "w1" / "reduced")  # the row table is not written
    st.close()


def test_parquet_store_with_reduced_rows_of_the_old_format_reads_them(tmp_path):
    """A store written before reduced vectors (reduced/ segments of one row per value) reads
    as before, and a vector written since wins over the old row of its cell."""
    st = ParquetStore(str(tmp_path), fsync=False)
    open_run(st, "old", world_size=4)
    st.flush()
    SegmentLog(str(tmp_path / "old" / "reduced"), "reduced", fsync=False).append(
        pl.DataFrame(
            {"step": [0, 1, 2], "metric_id": [1, 1, 1], "value": [1.0, 2.0, 3.0], "n_ranks": 4},
            schema={
                "step": pl.Int64,
                "metric_id": pl.Int32,
                "value": pl.Float32,
                "n_ranks": pl.Int32,
            },
        )
    )
    assert ParquetStore(str(tmp_path)).series("old", "m01").rows() == [(0, 1.0), (1, 2.0), (2, 3.0)]
    st.write_reduced("old", reduced(1, [1, 2], [20.0, 30.0], n_ranks=4))
    st.flush()
    reader = ParquetStore(str(tmp_path))
    assert reader.series("old", "m01").rows() == [(0, 1.0), (1, 20.0), (2, 3.0)]
    assert reader.at_step("old", 1)["value"].to_list() == [20.0, 30.0]
    st.close()
