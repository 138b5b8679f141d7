"""The dashboard's pure data functions: downsampling, alignment, metric search, optional tables."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from dashboard import data
from store import InvalidInput


def series(values, steps=None) -> pl.DataFrame:
    values = np.asarray(values, dtype=np.float32)
    steps = np.arange(values.size) if steps is None else np.asarray(steps)
    return pl.DataFrame({"step": steps.astype(np.int64), "value": values})


# ---- downsampling ------------------------------------------------------------------------
def test_downsampling_keeps_min_and_max_of_every_bucket():
    rng = np.random.default_rng(1)
    v = rng.standard_normal(50_000).astype(np.float32)
    ds = data.downsample_minmax(series(v), max_points=500)
    assert ds.downsampled and ds.width == 200 and ds.n_in == 50_000
    assert ds.frame.height <= 500
    out = dict(zip(ds.frame["step"].to_list(), ds.frame["value"].to_list()))
    for b in range(50_000 // ds.width):
        chunk = v[b * ds.width : (b + 1) * ds.width]
        lo_step = b * ds.width + int(chunk.argmin())
        hi_step = b * ds.width + int(chunk.argmax())
        assert out[lo_step] == chunk.min() and out[hi_step] == chunk.max()
    # every kept row is an input row, at its own step
    np.testing.assert_array_equal(ds.frame["value"].to_numpy(), v[ds.frame["step"].to_numpy()])
    assert ds.frame["step"].is_sorted()


def test_a_spike_a_nan_and_an_inf_survive():
    v = np.sin(np.arange(100_000) / 500.0).astype(np.float32)
    v[31_337] = 25.0
    v[70_001] = np.nan
    v[90_000] = -np.inf
    ds = data.downsample_minmax(series(v), max_points=200)
    f = ds.frame
    assert f.filter(pl.col("step") == 31_337)["value"].to_list() == [25.0]
    assert f.filter(pl.col("value").is_nan())["step"].to_list() == [70_001]
    assert f.filter(pl.col("value").is_infinite())["step"].to_list() == [90_000]
    assert f["value"].max() == 25.0


def test_short_series_are_not_touched_and_the_caption_says_so():
    s = series([3.0, 1.0, 2.0], steps=[5, 6, 9])
    ds = data.downsample_minmax(s, max_points=10)
    assert not ds.downsampled and ds.frame.equals(s)
    assert ds.caption() == "3 points (all shown)"
    big = data.downsample_minmax(series(np.zeros(1000)), max_points=100)
    assert "1,000 points →" in big.caption() and "every 20 steps" in big.caption()
    with pytest.raises(ValueError):
        data.downsample_minmax(s, max_points=1)


def test_buckets_follow_steps_not_rows_so_gaps_stay_gaps():
    steps = np.concatenate([np.arange(0, 1000), np.arange(9000, 10_000)])
    ds = data.downsample_minmax(series(np.arange(2000), steps), max_points=100)
    assert ds.width == 200
    kept = ds.frame["step"].to_numpy()
    assert not ((kept >= 1000) & (kept < 9000)).any()
    assert {0, 999, 9000, 9999} <= set(kept.tolist())  # monotone data: ends of each bucket


def test_align_runs_puts_every_run_on_one_bucket_grid():
    a = series(np.random.default_rng(0).standard_normal(20_000))
    b = series(np.random.default_rng(1).standard_normal(5_000), steps=np.arange(5_000, 10_000))
    long, notes = data.align_runs({"a": a, "b": b, "empty": series([])}, max_points=400)
    assert set(long["run"].unique().to_list()) == {"a", "b"}
    assert notes[0].width == notes[1].width == 100  # 20,000 steps / 200 buckets
    # bucket k covers the same steps in both runs: b's kept points sit in a's bucket grid
    bk = long.filter(run="b")
    for bucket in range(50, 100):
        rows = bk.filter((pl.col("step") // 100) == bucket)
        chunk = b["value"].to_numpy()[(bucket - 50) * 100 : (bucket - 49) * 100]
        assert sorted(rows["value"].to_list()) == sorted({float(chunk.min()), float(chunk.max())})


# ---- metric search, optional tables -------------------------------------------------------
DICT = pl.DataFrame(
    {
        "metric_id": [0, 1, 2, 3, 4],
        "name": [
            "train/loss",
            "moe/layer01/expert000/act_rms",
            "moe/layer01/expert001/act_rms",
            "moe/layer02/expert000/tokens",
            "attn/layer03/head05/max_logit",
        ],
        "layer": [-1, 1, 1, 2, 3],
        "expert": [-1, 0, 1, 0, -1],
        "head": [-1, -1, -1, -1, 5],
        "stat": ["loss", "act_rms", "act_rms", "tokens", "max_logit"],
    }
)


def test_filter_metrics_by_glob_and_labels():
    names = lambda df: df["name"].to_list()
    assert names(data.filter_metrics(DICT, "moe/*/act_rms")) == [
        "moe/layer01/expert000/act_rms",
        "moe/layer01/expert001/act_rms",
    ]
    assert names(data.filter_metrics(DICT, "moe/*", experts=[0])) == [
        "moe/layer01/expert000/act_rms",
        "moe/layer02/expert000/tokens",
    ]
    assert names(data.filter_metrics(DICT, "*", heads=[5])) == ["attn/layer03/head05/max_logit"]
    assert names(data.filter_metrics(DICT, "moe/layer0[2-9]/*", stats=["tokens"])) == [
        "moe/layer02/expert000/tokens"
    ]
    assert data.filter_metrics(DICT, "train/?oss").height == 1
    assert data.filter_metrics(DICT, "").height == 5  # empty pattern = everything
    assert data.filter_metrics(DICT, "(.*)").height == 0  # a glob, not a regex
    with pytest.raises(InvalidInput):
        data.filter_metrics(DICT, 3)


def test_events_are_conformed_whatever_the_store_returns():
    assert data.normalize_events(None).columns == list(data.EVENT_COLUMNS)
    partial = pl.DataFrame({"step": [9, 2], "kind": ["blowup", "loss_spike"], "extra": ["x", "y"]})
    ev = data.normalize_events(partial)
    assert ev.columns == list(data.EVENT_COLUMNS) and ev["step"].to_list() == [2, 9]
    assert ev["severity"].is_null().all()


def test_clip_timeline_uses_the_acknowledged_step_and_treats_inf_as_off():
    clips = pl.DataFrame(
        {
            "version": [1, 1, 2, 3],
            "step": [10, 10, 30, 50],
            "layer": [4, 4, 4, 4],
            "site": ["routed", "shared", "routed", "routed"],
            "limit": [7.0, 9.0, 5.0, math.inf],
            "reason": ["blowup"] * 4,
            "acked_step": [12, -1, 31, 52],
        }
    )
    t = data.clip_timeline(clips)
    routed = t.filter(site="layer04/routed")
    assert routed["step"].to_list() == [12, 31, 52]
    assert routed["limit"].to_list() == [7.0, 5.0, None]
    shared = t.filter(site="layer04/shared").row(0, named=True)
    assert shared["step"] == 10 and shared["acked"] is False
    assert data.clip_timeline(None).height == 0


def test_clip_segments_hold_each_limit_until_the_next_update():
    t = data.clip_timeline(
        pl.DataFrame(
            {
                "version": [1, 2, 3, 1],
                "step": [10, 20, 30, 15],
                "layer": [4, 4, 4, 2],
                "site": ["routed"] * 3 + ["shared"],
                "limit": [7.0, math.inf, 5.0, 9.0],
                "reason": ["x"] * 4,
                "acked_step": [11, 21, 31, -1],
            }
        )
    )
    seg = data.clip_segments(t, until=40)
    routed = seg.filter(site="layer04/routed")
    # 7 from 11 to 21, off from 21 to 31 (nothing drawn), 5 from 31 to the replay step
    assert routed.select("step", "limit").rows() == [(11, 7.0), (21, 7.0), (31, 5.0), (40, 5.0)]
    assert routed["segment"].n_unique() == 2
    assert seg.filter(site="layer02/shared").select("step", "limit").rows() == [
        (15, 9.0),
        (40, 9.0),
    ]
    early = data.clip_segments(t, until=25)  # the replay has not reached 31 yet
    assert early.filter(site="layer04/routed")["step"].to_list() == [11, 21]
    assert data.clip_segments(data.clip_timeline(None), until=5).height == 0
