"""Heatmap cells: views equal the values they come from, starvation agrees with the detector's
own formulas (analytics), and deaths are what the detector's events say."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from analytics.detectors.expert_death import layer_relative, layer_shares
from dashboard import experts


def long_rows(
    cells: dict[tuple[int, int], dict[str, float]], step: int | None = None
) -> pl.DataFrame:
    rows = [
        {
            "name": f"moe/layer{lay:02d}/expert{e:03d}/{k}",
            "layer": lay,
            "expert": e,
            "stat": k,
            "value": v,
        }
        for (lay, e), stats in cells.items()
        for k, v in stats.items()
    ]
    rows.append(
        {
            "name": "grad/layer01/expert000/norm",
            "layer": 1,
            "expert": 0,
            "stat": "norm",
            "value": 99.0,
        }
    )  # not a moe/ metric: ignored
    rows.append(
        {
            "name": "moe/layer01/router/z_loss",
            "layer": 1,
            "expert": -1,
            "stat": "z_loss",
            "value": 5.0,
        }
    )  # not an expert: ignored
    df = pl.DataFrame(
        rows,
        schema={
            "name": pl.Utf8,
            "layer": pl.Int32,
            "expert": pl.Int32,
            "stat": pl.Utf8,
            "value": pl.Float32,
        },
    )
    return df if step is None else df.with_columns(step=pl.lit(step, pl.Int64))


CELLS = {  # layer 1: expert 3 starved of tokens, expert 1 of activation; layer 2: no tokens
    (1, 0): {"tokens": 40, "act_rms": 1.0, "out_norm": 2.0},
    (1, 1): {"tokens": 30, "act_rms": 0.05, "out_norm": 4.0},
    (1, 2): {"tokens": 29, "act_rms": 3.0, "out_norm": 12.0},
    (1, 3): {"tokens": 1, "act_rms": 0.5, "out_norm": 1.0},
    (2, 0): {"tokens": 0, "act_rms": 0.0, "out_norm": 0.0},
    (2, 1): {"tokens": 0, "act_rms": 0.0, "out_norm": 0.0},
}


def wide_of(cells, step=None) -> pl.DataFrame:
    return experts.expert_stats(long_rows(cells, step))


def test_expert_stats_pivots_moe_expert_metrics_only():
    wide = wide_of(CELLS)
    assert wide.columns == ["layer", "expert", "tokens", "act_rms", "out_norm"]
    assert wide.height == len(CELLS)
    assert experts.expert_stats(long_rows({}).head(0)).height == 0


def test_heatmap_views_equal_the_values_they_come_from():
    wide = wide_of(CELLS)
    share = experts.heatmap_at(wide, "token share")
    assert share.columns == list(experts.CELL_COLUMNS)
    l1 = share.filter(layer=1)
    np.testing.assert_allclose(l1["value"].to_numpy(), [0.4, 0.3, 0.29, 0.01])
    # expert 3: 0.01 < 0.1 x 1/4 of the tokens; expert 1: RMS 0.05 < 0.1 x median 0.75
    assert l1["starved"].to_list() == [False, True, False, True]
    l2 = share.filter(layer=2)  # a layer without tokens: no share, no verdict
    assert l2["value"].is_null().all() and not l2["starved"].any()
    assert not share["dead"].any()  # deaths come from events only

    rms = experts.heatmap_at(wide, "activation RMS")
    assert rms["value"].to_list() == pytest.approx([CELLS[k]["act_rms"] for k in sorted(CELLS)])

    ratio = experts.heatmap_at(wide, "max-to-median ratio").filter(layer=1)
    # median of out norms over experts that got tokens (all four here): median(1,2,4,12) = 3
    np.testing.assert_allclose(ratio["value"].to_numpy(), [2 / 3, 4 / 3, 4.0, 1 / 3])
    assert experts.heatmap_at(wide, "max-to-median ratio").filter(layer=2)["value"].is_null().all()


def test_starvation_agrees_with_the_detectors_formulas():
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 60, size=(5, 8)).astype(float)
    tokens[1] = 0  # a layer without tokens
    tokens[2, :3] = 0
    rms = rng.uniform(0.0, 2.0, size=(5, 8))
    rms[3, 4] = 0.01
    cells = {
        (lay, e): {"tokens": tokens[lay, e], "act_rms": rms[lay, e], "out_norm": 1.0}
        for lay in range(5)
        for e in range(8)
    }
    got = experts.heatmap_at(wide_of(cells), "token share").sort("layer", "expert")
    share, rel = layer_shares(tokens), layer_relative(rms)
    want = np.isfinite(share) & (
        (share < experts.SHARE_THRESHOLD) | (np.isfinite(rel) & (rel < experts.RMS_THRESHOLD))
    )
    assert got["starved"].to_list() == want.reshape(-1).tolist()
    assert want.any() and not want.all()  # the case is not trivial


def test_heatmap_rejects_unknown_views_missing_stats_and_several_steps():
    wide = wide_of(CELLS)
    with pytest.raises(ValueError, match="unknown heatmap view"):
        experts.heatmap_at(wide, "entropy")
    with pytest.raises(KeyError, match="out_norm"):
        experts.heatmap_at(wide.drop("out_norm"), "max-to-median ratio")
    two = experts.expert_stats(pl.concat([long_rows(CELLS, 0), long_rows(CELLS, 1)]))
    with pytest.raises(ValueError, match="one step"):
        experts.heatmap_at(two, "token share")


def test_heatmap_window_sums_tokens_and_skips_steps_without_tokens():
    later = {k: dict(v) for k, v in CELLS.items()}
    later[(1, 3)] = {"tokens": 0, "act_rms": 0.0, "out_norm": 0.0}  # starved entirely
    later[(1, 0)]["act_rms"] = 3.0
    later[(1, 1)]["act_rms"] = 2.0  # fed again
    wide = experts.expert_stats(pl.concat([long_rows(CELLS, 10), long_rows(later, 11)]))
    share = experts.heatmap_window(wide, "token share").filter(layer=1)
    np.testing.assert_allclose(share["value"].to_numpy(), np.array([80, 60, 58, 1]) / 199.0)
    assert share["steps"].to_list() == [2, 2, 2, 2]
    assert share["starved"].to_list() == [False, False, False, True]  # every step, or not
    rms = experts.heatmap_window(wide, "activation RMS").filter(layer=1)
    # expert 0: mean(1, 3); expert 3: only step 10 had tokens, so its 0.0 at step 11 is skipped
    np.testing.assert_allclose(rms["value"].to_numpy(), [2.0, 1.025, 3.0, 0.5])
    with pytest.raises(ValueError, match="step column"):
        experts.heatmap_window(wide.drop("step"), "token share")


def test_deaths_are_the_detectors_events_replayed_to_the_step():
    events = pl.DataFrame(
        {
            "step": [20, 25, 40, 41, 50],
            "kind": [
                "expert_death",
                "expert_death",
                "expert_revival",
                "loss_spike",
                "expert_death",
            ],
            "site": [
                "moe/layer04/expert003",
                "moe/layer02/expert000",
                "moe/layer04/expert003",
                "train/loss",
                "moe/layer04/expert003",
            ],
        }
    )
    assert experts.dead_experts(events, 19) == frozenset()
    assert experts.dead_experts(events, 30) == {(4, 3), (2, 0)}
    assert experts.dead_experts(events, 45) == {(2, 0)}
    assert experts.dead_experts(events, 50) == {(4, 3), (2, 0)}
    cells = experts.heatmap_at(wide_of(CELLS), "token share", dead=frozenset({(1, 2)}))
    assert cells.filter(pl.col("dead"))[["layer", "expert"]].rows() == [(1, 2)]


def test_cell_names_are_capped():
    cells = pl.DataFrame({"layer": [1] * 5, "expert": list(range(5)), "starved": [True] * 5})
    assert (
        experts.cell_names(cells, "starved", limit=2)
        == "layer01/expert000, layer01/expert001 and 3 more"
    )
    assert experts.cell_names(cells.head(0), "starved") == ""
