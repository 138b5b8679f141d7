"""The store contract (store/base.py), run against every backend in conftest.store_factory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest

from store import (
    ClipRecord,
    EventRecord,
    InvalidInput,
    MetricDict,
    NotFound,
    RawBlock,
    RunInfo,
    StepStatus,
    StoreError,
    ValueBatch,
)
from store.frames import (
    AT_STEP_SCHEMA,
    CLIPS_SCHEMA,
    EVENTS_SCHEMA,
    METRICS_SCHEMA,
    RUNS_SCHEMA,
    SERIES_SCHEMA,
    STEPS_SCHEMA,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = [
    "loss",
    "grad_norm",
    "moe/layer00/expert000/act_rms",
    "moe/layer00/expert001/act_rms",
    "moe/layer01/expert000/act_rms",
    "moe/layer01/expert001/act_rms",
    "attn/layer00/head03/max_logit",
]
LAYER = [-1, -1, 0, 0, 1, 1, 0]
EXPERT = [-1, -1, 0, 1, 0, 1, -1]
HEAD = [-1, -1, -1, -1, -1, -1, 3]
STAT = ["loss", "norm", "act_rms", "act_rms", "act_rms", "act_rms", "max_logit"]


def metric_dict(ids=None, names=NAMES) -> MetricDict:
    ids = list(range(len(NAMES)) if ids is None else ids)
    pick = lambda col: [col[i] for i in ids]
    return MetricDict(
        np.array(ids, np.int32),
        [names[i] for i in ids],
        np.array(pick(LAYER), np.int32),
        np.array(pick(EXPERT), np.int32),
        np.array(pick(HEAD), np.int32),
        pick(STAT),
        [""] * len(ids),
        ["mean"] * len(ids),
    )


def one_metric(mid, name, *, layer=-1, stat="", unit="", reduce="max") -> MetricDict:
    return MetricDict(
        np.array([mid]),
        [name],
        np.array([layer]),
        np.array([-1]),
        np.array([-1]),
        [stat],
        [unit],
        [reduce],
    )


def value(step, mid, rank=None):
    """Exact in float32: the value a test expects back for a key."""
    return np.float32(step * 100 + mid + (0 if rank is None else 0.25 * (rank + 1)))


def reduced(steps, mids, n_ranks=4, values=None) -> ValueBatch:
    s, m = (a.ravel() for a in np.meshgrid(np.asarray(steps), np.asarray(mids), indexing="ij"))
    v = value(s, m) if values is None else np.asarray(values, np.float32)
    return ValueBatch(
        step=s.astype(np.int64),
        metric_id=m.astype(np.int32),
        value=v,
        n_ranks=np.full(s.size, n_ranks, np.int32),
    )


def raw(steps, mids, ranks) -> ValueBatch:
    s, m, r = (
        a.ravel()
        for a in np.meshgrid(np.asarray(steps), np.asarray(mids), np.asarray(ranks), indexing="ij")
    )
    return ValueBatch(
        step=s.astype(np.int64),
        metric_id=m.astype(np.int32),
        value=value(s, m, r),
        rank=r.astype(np.int32),
    )


def new_run(st, run="r1", world_size=4, started_at=1000.0):
    st.open_run(RunInfo(run, world_size, '{"lr": 0.001}', started_at))
    st.write_metrics(run, metric_dict())


def schema_of(df: pl.DataFrame) -> dict:
    return dict(df.schema)


# ---- round trips ---------------------------------------------------------------------------
def test_round_trip_every_table(store):
    new_run(store)
    store.write_reduced("r1", reduced(range(5), range(7)))
    store.write_raw("r1", raw(range(5), [0, 2], range(4)))
    store.write_steps("r1", [StepStatus(0, 4), StepStatus(1, 3, (2,), False, 12.5)])
    store.flush()

    runs = store.runs()
    assert schema_of(runs) == RUNS_SCHEMA
    assert runs.select(
        "run", "world_size", "config_json", "started_at", "last_step", "status"
    ).rows() == [("r1", 4, '{"lr": 0.001}', 1000.0, 4, "live")]
    assert runs["updated_at"][0] > 0

    md = store.metrics("r1")
    assert schema_of(md) == METRICS_SCHEMA
    assert md["name"].to_list() == NAMES and md["metric_id"].to_list() == list(range(7))
    assert md["head"].to_list() == HEAD and md["reduce"].to_list() == ["mean"] * 7

    s = store.series("r1", "moe/layer00/expert001/act_rms")
    assert schema_of(s) == SERIES_SCHEMA
    assert s["step"].to_list() == [0, 1, 2, 3, 4]
    assert s["value"].to_list() == [value(i, 3) for i in range(5)]

    r = store.series("r1", "moe/layer00/expert000/act_rms", rank=3)
    assert r["value"].to_list() == [value(i, 2, 3) for i in range(5)]

    st = store.steps("r1")
    assert schema_of(st) == STEPS_SCHEMA
    assert st.rows() == [(0, 4, [], True, 0.0), (1, 3, [2], False, 12.5)]


def test_nothing_is_visible_before_flush(store):
    new_run(store)
    with pytest.raises(NotFound):
        store.metrics("r1")  # the run row is not flushed yet
    store.flush()
    store.write_reduced("r1", reduced([0], range(7)))
    assert store.series("r1", "loss").height == 0
    store.flush()
    assert store.series("r1", "loss")["value"].to_list() == [value(0, 0)]


def test_series_step_range_is_half_open(store):
    new_run(store)
    store.write_reduced("r1", reduced(range(0, 20, 2), [0]))  # even steps only
    store.flush()
    steps = lambda **kw: store.series("r1", "loss", **kw)["step"].to_list()
    assert steps(start=4, stop=10) == [4, 6, 8]
    assert steps(start=5, stop=11) == [6, 8, 10]
    assert steps(start=14) == [14, 16, 18]
    assert steps(stop=3) == [0, 2]
    assert steps(start=7, stop=7) == []
    assert steps(start=100) == []


def test_raw_per_rank_and_reduced_are_separate(store):
    new_run(store)
    store.write_reduced("r1", reduced(range(3), [1], values=[7.0, 8.0, 9.0]))
    store.write_raw("r1", raw(range(3), [1], [0, 1]))
    store.flush()
    assert store.series("r1", "grad_norm")["value"].to_list() == [7.0, 8.0, 9.0]
    for rk in (0, 1):
        assert store.series("r1", "grad_norm", rank=rk)["value"].to_list() == [
            value(i, 1, rk) for i in range(3)
        ]
    assert store.series("r1", "grad_norm", rank=2).height == 0  # no such rank: empty
    assert store.series("r1", "loss").height == 0  # metric known, no data


def test_at_step_matches_glob_and_rank(store):
    new_run(store)
    store.write_reduced("r1", reduced(range(3), range(7)))
    store.write_raw("r1", raw([1], range(7), [0, 1]))
    store.flush()
    df = store.at_step("r1", 1, "moe/layer0?/expert001/*")
    assert schema_of(df) == AT_STEP_SCHEMA
    assert df["name"].to_list() == [NAMES[3], NAMES[5]]
    assert df["value"].to_list() == [value(1, 3), value(1, 5)]
    assert df.select("layer", "expert", "head", "stat").rows() == [
        (0, 1, -1, "act_rms"),
        (1, 1, -1, "act_rms"),
    ]
    assert store.at_step("r1", 2)["metric_id"].to_list() == list(range(7))
    assert store.at_step("r1", 2, "[!m]*")["name"].to_list() == [
        "loss",
        "grad_norm",
        "attn/layer00/head03/max_logit",
    ]
    assert store.at_step("r1", 2, "loss")["value"].to_list() == [value(2, 0)]
    r = store.at_step("r1", 1, "moe/*", rank=1)
    assert r["value"].to_list() == [value(1, m, 1) for m in (2, 3, 4, 5)]
    assert store.at_step("r1", 0, "moe/*", rank=1).height == 0  # no raw values at step 0
    empty = store.at_step("r1", 1, "nothing*")
    assert empty.height == 0 and schema_of(empty) == AT_STEP_SCHEMA
    assert store.at_step("r1", 99).height == 0


# ---- idempotency: same natural key again -> one row, last value -----------------------------
def test_rewrite_same_key_keeps_last_value(store):
    new_run(store)
    store.write_reduced("r1", reduced([0, 1], [0], values=[1.0, 2.0]))
    store.write_reduced("r1", reduced([1], [0], values=[3.0]))  # same flush
    store.write_raw("r1", raw([0], [0], [0]))
    store.flush()
    store.write_reduced("r1", reduced([0], [0], values=[4.0], n_ranks=3))  # later flush
    store.write_raw(
        "r1",
        ValueBatch(np.array([0, 0]), np.array([0, 0]), np.array([5.0, 6.0]), rank=np.array([0, 0])),
    )  # dup in one batch
    store.write_steps("r1", [StepStatus(0, 4), StepStatus(0, 2, (1, 3), False)])
    store.flush()
    store.write_steps("r1", [StepStatus(0, 3, (3,), False, 1.0)])
    store.flush()
    assert store.series("r1", "loss").rows() == [(0, 4.0), (1, 3.0)]
    assert store.series("r1", "loss", rank=0).rows() == [(0, 6.0)]
    assert store.at_step("r1", 0, "loss")["value"].to_list() == [4.0]
    assert store.steps("r1").rows() == [(0, 3, [3], False, 1.0)]


def test_resending_everything_changes_nothing(store):
    new_run(store)
    for _ in range(3):  # a client resending after reconnect
        store.write_metrics("r1", metric_dict())
        store.write_reduced("r1", reduced(range(4), range(7)))
        store.write_raw("r1", raw(range(4), range(7), range(2)))
        store.write_steps("r1", [StepStatus(i, 2) for i in range(4)])
        store.flush()
    assert store.metrics("r1").height == 7
    assert store.at_step("r1", 2).height == 7
    assert store.at_step("r1", 2, rank=1).height == 7
    assert store.series("r1", "loss")["step"].to_list() == [0, 1, 2, 3]
    assert store.steps("r1").height == 4


def test_metric_dictionary_upserts_by_id_and_keeps_names_unique(store):
    new_run(store)
    store.write_metrics("r1", metric_dict(ids=[0], names=["loss/renamed"] + NAMES[1:]))
    store.write_metrics("r1", one_metric(7, "new/metric", layer=2, stat="x", unit="s"))
    with pytest.raises(InvalidInput, match="unique"):
        store.write_metrics("r1", one_metric(1, "new/metric"))  # id 7 has that name
    store.flush()
    md = store.metrics("r1")
    assert md["metric_id"].to_list() == list(range(8))
    assert md["name"].to_list() == ["loss/renamed"] + NAMES[1:] + ["new/metric"]
    assert md.row(7) == (7, "new/metric", 2, -1, -1, "x", "s", "max")


def test_a_fresh_dictionary_write_skips_the_name_check_but_not_the_rest(store):
    """write_metrics(fresh=True) takes new ids on its caller's word (the collector's registry
    checked the names); an old id still takes the exact path (an upsert), and the writes after
    a fresh one still find a taken name."""
    new_run(store)
    store.write_metrics("r1", metric_dict(), fresh=True)
    store.write_metrics("r1", one_metric(7, "new/metric", layer=2), fresh=True)
    store.write_metrics("r1", one_metric(0, "loss/renamed"), fresh=True)  # old id: upsert
    with pytest.raises(InvalidInput, match="unique"):
        store.write_metrics("r1", one_metric(8, "new/metric"))  # id 7 has that name
    store.write_metrics("r1", one_metric(8, "newer/metric"))
    store.flush()
    md = store.metrics("r1")
    assert md["metric_id"].to_list() == list(range(9))
    assert md["name"].to_list() == ["loss/renamed", *NAMES[1:], "new/metric", "newer/metric"]


def test_runs_lifecycle(store):
    new_run(store, "late", started_at=2000.0)
    new_run(store, "early", started_at=1000.0)
    store.flush()
    assert store.runs()["run"].to_list() == ["early", "late"]  # sorted by started_at
    assert store.runs()["last_step"].to_list() == [None, None]
    store.write_reduced("late", reduced([5, 9, 7], [0]))
    store.finish_run("late")
    store.flush()
    late = store.runs().row(1, named=True)
    assert (late["status"], late["last_step"]) == ("finished", 9)
    store.open_run(RunInfo("late", 8))  # resumed: live again, start kept
    store.flush()
    late = store.runs().row(1, named=True)
    assert (late["status"], late["world_size"], late["started_at"]) == ("live", 8, 2000.0)
    assert late["config_json"] == "{}" and late["last_step"] == 9
    assert store.runs().height == 2


def test_runs_do_not_see_each_other(store):
    new_run(store, "a")
    new_run(store, "b")
    store.write_reduced("a", reduced([0], [0], values=[1.0]))
    store.write_reduced("b", reduced([0], [0], values=[2.0]))
    store.flush()
    assert store.series("a", "loss")["value"].to_list() == [1.0]
    assert store.series("b", "loss")["value"].to_list() == [2.0]


# ---- errors ------------------------------------------------------------------------------
def test_unknown_run_or_metric_is_not_found(store):
    new_run(store)
    store.flush()
    for call in (
        lambda: store.metrics("nope"),
        lambda: store.steps("nope"),
        lambda: store.series("nope", "loss"),
        lambda: store.at_step("nope", 0),
        lambda: store.series("r1", "no/such/metric"),
        lambda: store.series("r1", "no/such/metric", rank=0),
        lambda: store.write_reduced("nope", reduced([0], [0])),
        lambda: store.finish_run("nope"),
    ):
        with pytest.raises(NotFound):
            call()


@pytest.mark.parametrize("bad", ["", "a b", "../etc", "x" * 129, "r/1", None, 3])
def test_bad_run_name_is_invalid_input(store, bad):
    with pytest.raises(InvalidInput):
        store.open_run(RunInfo(bad, 1))
    with pytest.raises(InvalidInput):
        store.series(bad, "loss")
    with pytest.raises(InvalidInput):
        store.write_reduced(bad, reduced([0], [0]))


_i, _f = np.array([0, 1]), np.array([1.0, 2.0])
BAD_REDUCED = {
    "ragged value": ValueBatch(_i, _i, np.array([1.0]), n_ranks=_i),
    "ragged step": ValueBatch(np.array([0]), _i, _f, n_ranks=_i),
    "ragged n_ranks": ValueBatch(_i, _i, _f, n_ranks=np.array([1, 2, 3])),
    "float steps": ValueBatch(_f, _i, _f, n_ranks=_i),
    "negative step": ValueBatch(np.array([-1, 0]), _i, _f, n_ranks=_i),
    "2-D value": ValueBatch(_i, _i, np.ones((2, 1)), n_ranks=_i),
    "metric_id overflow": ValueBatch(_i, np.array([0, 2**40]), _f, n_ranks=_i),
    "no n_ranks": ValueBatch(_i, _i, _f),
    "rank on reduced": ValueBatch(_i, _i, _f, rank=_i, n_ranks=_i),
    "string values": ValueBatch(_i, _i, np.array(["a", "b"]), n_ranks=_i),
}


@pytest.mark.parametrize("why", list(BAD_REDUCED))
def test_malformed_reduced_batch_is_invalid_input(store, why):
    new_run(store)
    with pytest.raises(InvalidInput):
        store.write_reduced("r1", BAD_REDUCED[why])
    store.flush()
    assert store.series("r1", "loss").height == 0  # nothing of it was buffered


def test_malformed_writes_are_invalid_input(store):
    new_run(store)
    i, f = _i, _f
    with pytest.raises(InvalidInput):
        store.write_raw("r1", ValueBatch(i, i, f, n_ranks=i))  # raw needs rank
    with pytest.raises(InvalidInput):
        store.write_raw("r1", ValueBatch(i, i, f, rank=np.array([0])))
    with pytest.raises(InvalidInput):
        store.write_steps("r1", [StepStatus(-3, 1)])
    with pytest.raises(InvalidInput):
        store.write_steps("r1", [StepStatus(0, 1, missing_ranks=(-1,))])
    md = metric_dict()
    for field, v in (
        ("layer", np.zeros(3, np.int32)),
        ("name", NAMES[:6]),
        ("reduce", ["median"] * 7),
        ("name", [""] + NAMES[1:]),
    ):
        with pytest.raises(InvalidInput):
            store.write_metrics("r1", MetricDict(**{**md.__dict__, field: v}))
    with pytest.raises(InvalidInput):
        store.series("r1", "loss", start=1.5)
    for info in (
        RunInfo("r2", 0),
        RunInfo("r2", 2.0),
        RunInfo("r2", 2, None),
        RunInfo("r2", 2, "{}", float("nan")),
    ):
        with pytest.raises(InvalidInput):
            store.open_run(info)
    store.flush()  # nothing bad was buffered
    assert store.series("r1", "loss").height == 0 and store.steps("r1").height == 0


def test_closed_store_refuses_calls(store_factory):
    st = store_factory.open()
    new_run(st)
    st.close()
    st.close()  # closing twice is harmless
    with pytest.raises(StoreError):
        st.write_reduced("r1", reduced([0], [0]))
    with pytest.raises(StoreError):
        st.runs()


# ---- values are kept exactly -------------------------------------------------------------
def test_non_finite_values_are_stored_not_dropped(store):
    new_run(store)
    v = np.array([np.nan, np.inf, -np.inf, 1e38, -0.0, 1.5], np.float32)
    store.write_reduced(
        "r1", ValueBatch(np.arange(6), np.zeros(6, np.int32), v, n_ranks=np.full(6, 4))
    )
    store.write_raw(
        "r1",
        ValueBatch(np.arange(6), np.zeros(6, np.int32), v[::-1].copy(), rank=np.zeros(6, np.int32)),
    )
    store.write_reduced(
        "r1", ValueBatch(np.array([9]), np.array([1]), np.array([1e300]), n_ranks=np.array([4]))
    )  # f64 overflow -> inf
    store.flush()
    got = store.series("r1", "loss")["value"].to_numpy()
    np.testing.assert_array_equal(got, v)  # NaN == NaN here, -0.0 kept
    assert math.copysign(1, got[4]) == -1
    np.testing.assert_array_equal(store.series("r1", "loss", rank=0)["value"].to_numpy(), v[::-1])
    assert store.at_step("r1", 0, "loss")["value"].is_nan().to_list() == [True]
    assert store.series("r1", "grad_norm")["value"].to_list() == [math.inf]


def test_caller_may_reuse_its_buffers_after_write(store):
    new_run(store)
    buf = reduced([0], range(7))
    store.write_reduced("r1", buf)
    buf.value[:] = -1  # a collector reusing its buffer
    buf.step[:] = 5
    store.flush()
    assert store.at_step("r1", 0)["value"].to_list() == [value(0, m) for m in range(7)]


def test_a_million_values_in_one_call(store):
    new_run(store)
    n_metric, n_rank = 1000, 1000
    mids = np.arange(n_metric, dtype=np.int32)
    store.write_metrics(
        "r1",
        MetricDict(
            mids,
            [f"m/{i:04d}" for i in mids],
            mids,
            mids,
            mids,
            ["s"] * n_metric,
            [""] * n_metric,
            ["sum"] * n_metric,
        ),
    )
    step = np.full(n_metric * n_rank, 7, np.int64)
    mid = np.tile(mids, n_rank)
    rk = np.repeat(np.arange(n_rank, dtype=np.int32), n_metric)
    val = (mid * 0.5 + rk).astype(np.float32)
    store.write_raw("r1", ValueBatch(step, mid, val, rank=rk))
    store.flush()
    assert store.series("r1", "m/0042", rank=999).rows() == [(7, np.float32(21 + 999))]
    snap = store.at_step("r1", 7, "m/00[0-4]?", rank=3)
    assert snap["value"].to_list() == [i * 0.5 + 3 for i in range(50)]


# ---- raw values written as RawBlocks (per-rank vectors) --------------------------------------
def block(step, ranks, mids, values=None) -> RawBlock:
    r, m = np.asarray(ranks, np.int32), np.asarray(mids, np.int32)
    v = (
        value(step, m[None, :], r[:, None])
        if values is None
        else np.asarray(values, np.float32).reshape(r.size, m.size)
    )
    return RawBlock(step, r, m, np.ascontiguousarray(v, np.float32))


def cells(store, step, rank) -> dict[int, float]:
    return dict(store.at_step("r1", step, rank=rank).select("metric_id", "value").rows())


def test_block_round_trip_per_rank(store):
    new_run(store)
    store.flush()
    mids = [6, 0, 3, 2]  # any order: the layout keeps it
    for step in range(3):
        store.write_raw_block("r1", block(step, [3, 1, 0], mids))
    assert store.series("r1", "loss", rank=1).height == 0  # nothing before flush
    assert store.at_step("r1", 0, rank=1).height == 0
    store.flush()
    for rk in (0, 1, 3):
        for m in mids:
            s = store.series("r1", NAMES[m], rank=rk)
            assert schema_of(s) == SERIES_SCHEMA
            assert s.rows() == [(i, value(i, m, rk)) for i in range(3)]
        assert store.series("r1", NAMES[m], rank=rk, start=1, stop=2)["step"].to_list() == [1]
        df = store.at_step("r1", 2, "moe/*", rank=rk)
        assert schema_of(df) == AT_STEP_SCHEMA
        assert df.select("metric_id", "value").rows() == [(m, value(2, m, rk)) for m in (2, 3)]
        assert cells(store, 1, rk) == {m: value(1, m, rk) for m in mids}
    assert store.series("r1", "loss", rank=2).height == 0  # no such rank in the block
    assert store.series("r1", "grad_norm", rank=0).height == 0  # metric not in the layout
    assert store.series("r1", "loss").height == 0  # raw values are not reduced ones
    assert store.runs()["last_step"].to_list() == [2]


def test_block_then_flat_overwrite_and_the_reverse(store):
    new_run(store)
    store.write_raw_block("r1", block(0, [0, 1], range(7)))
    store.write_raw(
        "r1",
        ValueBatch(
            np.array([0, 0]), np.array([3, 5]), np.array([-3.0, -5.0]), rank=np.array([1, 1])
        ),
    )  # same flush, after
    store.flush()
    store.write_raw("r1", raw([1], [2, 4], [0]))  # flat first ...
    store.flush()
    store.write_raw_block("r1", block(1, [0], [4, 6], [[-4.0, -6.0]]))  # ... then a block
    store.write_raw(
        "r1", ValueBatch(np.array([1]), np.array([6]), np.array([-66.0]), rank=np.array([0]))
    )  # then flat again
    store.flush()
    want = {m: value(0, m, 1) for m in range(7)} | {3: -3.0, 5: -5.0}
    assert cells(store, 0, 1) == want
    assert cells(store, 0, 0) == {m: value(0, m, 0) for m in range(7)}
    assert cells(store, 1, 0) == {2: value(1, 2, 0), 4: -4.0, 6: -66.0}
    assert store.series("r1", NAMES[3], rank=1).rows() == [(0, -3.0)]
    assert store.series("r1", NAMES[4], rank=0).rows() == [(0, value(0, 4, 0)), (1, -4.0)]
    assert store.series("r1", NAMES[6], rank=0).rows() == [(0, value(0, 6, 0)), (1, -66.0)]


def test_overlapping_layouts_of_one_rank_and_step(store):
    new_run(store)
    store.write_raw_block("r1", block(5, [2], [0, 1, 2, 3], [[1, 2, 3, 4]]))
    store.write_raw_block("r1", block(5, [2], [3, 4, 1], [[40, 50, 20]]))  # same flush
    store.flush()
    assert cells(store, 5, 2) == {0: 1.0, 1: 20.0, 2: 3.0, 3: 40.0, 4: 50.0}
    store.write_raw_block("r1", block(5, [2], [2, 0], [[300, 100]]))  # later flush
    store.write_raw_block("r1", block(5, [2], [0, 1, 2, 3], [[7, 7, 7, 7]]))  # old layout
    store.write_raw_block("r1", block(5, [2], [2], [[9]]))  # again later
    store.flush()
    assert cells(store, 5, 2) == {0: 7.0, 1: 7.0, 2: 9.0, 3: 7.0, 4: 50.0}
    assert [store.series("r1", NAMES[m], rank=2)["value"].to_list() for m in range(5)] == [
        [7.0],
        [7.0],
        [9.0],
        [7.0],
        [50.0],
    ]
    store.write_raw_block("r1", block(5, [2], [0, 1, 2, 3], [[8, 8, 8, 8]]))  # resend of a
    store.flush()  # layout wins
    assert cells(store, 5, 2) == {0: 8.0, 1: 8.0, 2: 8.0, 3: 8.0, 4: 50.0}


_r, _m = np.array([0, 1]), np.array([0, 1, 2])
BAD_BLOCKS = {
    "shape": (RawBlock(0, _r, _m, np.zeros((3, 2), np.float32)), r"shape.*\(2, 3\).*\(3, 2\)"),
    "1-D value": (RawBlock(0, _r, _m, np.zeros(6, np.float32)), "shape"),
    "dtype": (RawBlock(0, _r, _m, np.full((2, 3), "x")), "dtype"),
    "complex": (RawBlock(0, _r, _m, np.zeros((2, 3), complex)), "dtype"),
    "repeated rank": (RawBlock(0, np.array([1, 1]), _m, np.zeros((2, 3))), "rank.*distinct"),
    "repeated metric": (
        RawBlock(0, _r, np.array([0, 2, 0]), np.zeros((2, 3))),
        "metric_id.*distinct",
    ),
    "negative rank": (RawBlock(0, np.array([-1, 0]), _m, np.zeros((2, 3))), "rank"),
    "float ids": (RawBlock(0, _r, np.array([0.0, 1.0, 2.0]), np.zeros((2, 3))), "metric_id"),
    "negative step": (RawBlock(-1, _r, _m, np.zeros((2, 3))), "step"),
    "float step": (RawBlock(1.5, _r, _m, np.zeros((2, 3))), "step"),
    "not a block": (ValueBatch(_r, _r, _r, rank=_r), "RawBlock"),
}


@pytest.mark.parametrize("why", list(BAD_BLOCKS))
def test_malformed_block_is_invalid_input_naming_the_problem(store, why):
    new_run(store)
    bad, match = BAD_BLOCKS[why]
    with pytest.raises(InvalidInput, match=match):
        store.write_raw_block("r1", bad)
    store.flush()  # nothing of it was buffered
    assert store.at_step("r1", 0, rank=0).height == 0
    assert store.runs()["last_step"].to_list() == [None]


def test_block_values_bit_exact_and_empty_blocks(store):
    new_run(store)
    v = np.array([[np.nan, np.inf, -np.inf, 1e38, -0.0, 1.5, 2**-149]], np.float32)
    store.write_raw_block("r1", block(0, [0], range(7), v))
    for empty in (block(1, [], range(7), np.zeros((0, 7))), block(1, [0, 1], [], np.zeros((2, 0)))):
        store.write_raw_block("r1", empty)
    store.flush()
    got = store.at_step("r1", 0, rank=0)["value"].to_numpy()
    assert got.view(np.uint32).tolist() == v[0].view(np.uint32).tolist()  # NaN, -0.0 kept
    for m in range(7):
        s = store.series("r1", NAMES[m], rank=0)["value"].to_numpy()
        assert s.view(np.uint32).tolist() == [v[0, m].view(np.uint32)]
    assert store.at_step("r1", 1, rank=0).height == 0
    assert store.runs()["last_step"].to_list() == [0]  # empty blocks do not advance the run


def test_caller_may_reuse_its_block_after_write(store):
    new_run(store)
    b = block(0, [0, 1], range(7))
    store.write_raw_block("r1", b)
    b.value[:] = -1
    b.rank[:] = 5
    b.metric_id[:] = np.arange(7)[::-1]
    store.flush()
    assert cells(store, 0, 1) == {m: value(0, m, 1) for m in range(7)}


# ---- several instances, processes, crashes (backends with shared storage) ----------------
def needs_shared(backend):
    if not backend.shared:
        pytest.skip(f"{backend.name}: instances do not share storage")


def test_data_survives_close_and_reopen(store_factory):
    needs_shared(store_factory)
    with store_factory.open() as w:
        new_run(w)
        w.write_reduced("r1", reduced(range(3), range(7)))
        w.write_steps("r1", [StepStatus(2, 4)])
        w.finish_run("r1")
    with store_factory.open() as r:  # close() flushed
        assert r.runs()["status"].to_list() == ["finished"]
        assert r.series("r1", "loss")["value"].to_list() == [value(i, 0) for i in range(3)]
        r.write_reduced("r1", reduced([1, 3], [0], values=[-1.0, -3.0]))  # resume writing
        r.flush()
        assert r.series("r1", "loss")["value"].to_list() == [value(0, 0), -1.0, value(2, 0), -3.0]
        assert r.runs()["last_step"].to_list() == [3]


def test_reader_instance_sees_each_flush_of_a_writer(store_factory):
    needs_shared(store_factory)
    writer, reader = store_factory.open(), store_factory.open()
    try:
        new_run(writer)
        writer.flush()
        assert reader.metrics("r1").height == 7
        expect = {}
        for step in range(30):
            writer.write_reduced("r1", reduced([step], [0], values=[step]))
            expect[step] = step
            if step % 3 == 0 and step:  # overwrite an older step
                writer.write_reduced("r1", reduced([step - 2], [0], values=[-step]))
                expect[step - 2] = -step
            assert reader.series("r1", "loss").height == step  # not flushed yet
            writer.flush()
            assert dict(reader.series("r1", "loss").rows()) == expect
        writer.write_metrics("r1", one_metric(7, "late/metric"))
        writer.flush()
        assert reader.metrics("r1")["name"].to_list()[-1] == "late/metric"
    finally:
        writer.close()
        reader.close()


def test_killed_writer_loses_only_unflushed_data(store_factory, tmp_path):
    needs_shared(store_factory)
    script = textwrap.dedent(f"""
        import os, numpy as np
        from store import open_store, RunInfo, MetricDict, RawBlock, ValueBatch
        st = open_store({store_factory.url!r})
        st.open_run(RunInfo("r1", 2))
        st.write_metrics("r1", MetricDict(np.array([0]), ["loss"], np.array([-1]),
                         np.array([-1]), np.array([-1]), [""], [""], ["mean"]))
        st.write_reduced("r1", ValueBatch(np.array([0, 1]), np.array([0, 0]),
                         np.array([1.0, 2.0]), n_ranks=np.array([2, 2])))
        st.write_raw_block("r1", RawBlock(1, np.array([0, 1]), np.array([0]),
                           np.array([[5.0], [6.0]], np.float32)))
        st.flush()
        st.write_reduced("r1", ValueBatch(np.array([1, 2]), np.array([0, 0]),
                         np.array([9.0, 9.0]), n_ranks=np.array([2, 2])))
        st.write_raw_block("r1", RawBlock(1, np.array([0, 1]), np.array([0]),
                           np.array([[9.0], [9.0]], np.float32)))
        os._exit(9)                                     # killed: no flush, no close
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 9, proc.stderr
    with store_factory.open() as st:
        assert st.series("r1", "loss").rows() == [(0, 1.0), (1, 2.0)]
        assert [st.series("r1", "loss", rank=r).rows() for r in (0, 1)] == [[(1, 5.0)], [(1, 6.0)]]
        st.write_reduced("r1", reduced([2], [0], values=[3.0]))  # a new writer takes over
        st.flush()
        assert st.series("r1", "loss")["value"].to_list() == [1.0, 2.0, 3.0]


def test_leftovers_of_an_interrupted_flush_are_ignored(store_factory):
    if store_factory.litter is None:
        pytest.skip(f"{store_factory.name}: no partial writes to leave behind")
    with store_factory.open() as w:
        new_run(w)
        w.write_reduced("r1", reduced(range(3), range(7)))
        w.write_steps("r1", [StepStatus(0, 4)])
    store_factory.litter("r1")
    store_factory.litter("r2")  # a run that never got its first row
    with store_factory.open() as st:  # reads ignore the debris
        assert st.runs()["run"].to_list() == ["r1"]
        assert st.series("r1", "loss")["step"].to_list() == [0, 1, 2]
        assert st.at_step("r1", 1).height == 7 and st.steps("r1").height == 1
        st.write_reduced("r1", reduced([3], range(7)))  # and a new writer works past it
        st.flush()
        assert st.series("r1", "loss")["step"].to_list() == [0, 1, 2, 3]


# ---- detector events and clip updates ----------------------------------------------------
def event(
    step,
    kind="blowup",
    site="moe/layer01/expert000",
    value=3.5,
    onset=None,
    severity="warning",
    detail='{"layer": 1}',
):
    return EventRecord(
        step=step,
        kind=kind,
        site=site,
        value=value,
        threshold=2.0,
        severity=severity,
        onset_step=step if onset is None else onset,
        detail=detail,
    )


def clip(version, layer=1, site="routed", limit=2.5, acked=-1, step=7, reason="blowup@7"):
    return ClipRecord(
        version=version,
        step=step,
        layer=layer,
        site=site,
        limit=limit,
        reason=reason,
        acked_step=acked,
    )


def test_events_round_trip_sorted_last_wins_and_leave_last_step(store):
    new_run(store)
    store.flush()
    store.write_reduced("r1", reduced(range(3), [0]))
    store.write_events(
        "r1",
        [
            event(9, onset=4),
            event(2, kind="nonfinite", site="train/loss", value=math.nan, severity="critical"),
            event(2, kind="blowup"),
        ],
    )
    assert store.events("r1").height == 0  # invisible before flush
    store.flush()
    ev = store.events("r1")
    assert schema_of(ev) == EVENTS_SCHEMA
    assert ev.select("step", "kind", "onset_step").rows() == [
        (2, "blowup", 2),
        (2, "nonfinite", 2),
        (9, "blowup", 4),
    ]
    assert math.isnan(ev["value"][1]) and ev["severity"][1] == "critical"
    assert json.loads(ev["detail"][2]) == {"layer": 1}
    assert store.runs()["last_step"].to_list() == [2]  # events do not advance a run
    store.write_events("r1", [event(9, onset=4, value=7.0, detail='{"again": true}')])
    store.flush()
    ev = store.events("r1")
    assert ev.height == 3 and ev.filter(step=9)["value"].to_list() == [7.0]
    assert json.loads(ev.filter(step=9)["detail"][0]) == {"again": True}


def test_clip_updates_round_trip_and_an_ack_rewrites_its_row(store):
    new_run(store)
    store.write_clips(
        "r1",
        [
            clip(2, layer=3, limit=math.inf),
            clip(1, layer=2),
            clip(1, layer=1, site="shared", limit=1.25),
        ],
    )
    store.flush()
    cl = store.clips("r1")
    assert schema_of(cl) == CLIPS_SCHEMA
    assert cl.select("version", "layer", "site", "limit", "acked_step").rows() == [
        (1, 1, "shared", 1.25, -1),
        (1, 2, "routed", 2.5, -1),
        (2, 3, "routed", math.inf, -1),
    ]
    store.write_clips("r1", [clip(1, layer=2, acked=9)])  # the acknowledgement
    store.flush()
    cl = store.clips("r1")
    assert cl.height == 3
    assert cl.filter(version=1, layer=2)["acked_step"].to_list() == [9]
    assert cl["reason"].to_list() == ["blowup@7"] * 3


def test_malformed_events_and_clips_are_invalid_input(store):
    new_run(store)
    bad_events = [
        event(3, severity="fatal"),
        event(3, detail="not json"),
        event(3, detail="[1, 2]"),
        event(3, onset=4),
        event(-1),
        event(3, kind=""),
        event(3, value="big"),
        "an event",
    ]
    for bad in bad_events:
        with pytest.raises(InvalidInput):
            store.write_events("r1", [event(1), bad])
    for bad in (
        clip(0),
        clip(1, limit=math.nan),
        clip(1, site=""),
        clip(1, layer=-1),
        clip(1, acked=-2),
        clip(1, step=-1),
        clip(True),
    ):
        with pytest.raises(InvalidInput):
            store.write_clips("r1", [clip(5), bad])
    with pytest.raises(NotFound):
        store.write_events("nope", [event(1)])
    with pytest.raises(NotFound):
        store.clips("nope")
    store.flush()  # nothing of a refused call was kept
    assert store.events("r1").height == 0 and store.clips("r1").height == 0


def test_events_and_clips_survive_reopen(store_factory):
    needs_shared(store_factory)
    with store_factory.open() as w:
        new_run(w)
        w.write_events("r1", [event(4)])
        w.write_clips("r1", [clip(1)])
    with store_factory.open() as r:
        assert r.events("r1")["step"].to_list() == [4]
        r.write_clips("r1", [clip(1, acked=5)])
        r.flush()
        assert r.clips("r1")["acked_step"].to_list() == [5]
