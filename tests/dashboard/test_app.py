"""The app driven through its widgets (Streamlit AppTest) against a store that real monitored
runs filled; what the charts draw is decoded from their Vega-Lite datasets and compared with
the store's own reads."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dashboard.charts import STARVED_COLOR
from store import Store, open_store
from tests.dashboard.conftest import STEPS, charts, check, run_app, table_with, texts
from tests.dashboard.runs import DEAD, DEAD_FROM


def loss_of(url: str, run: str) -> pl.DataFrame:
    with open_store(url) as s:
        return s.series(run, "train/loss")


def at_step(url: str, run: str, step: int, pattern: str) -> pl.DataFrame:
    with open_store(url) as s:
        return s.at_step(run, step, pattern)


def test_runs_list_and_selecting_a_run(recorded, monkeypatch):
    at = run_app(recorded.url, monkeypatch)
    assert at.multiselect(key="runs").value == ["tiny-b"]  # the newest run by default
    table = table_with(at, "world size")
    assert table["run"].tolist() == ["tiny-b", "tiny-a"]
    assert table["status"].tolist() == ["finished", "finished"]
    assert table["steps"].tolist() == [STEPS["tiny-b"], STEPS["tiny-a"]]
    assert table["world size"].tolist() == [1, 1]
    loss = charts(at)["loss"].layer(0).filter(series="train/loss")
    assert loss.select("step", "value").equals(loss_of(recorded.url, "tiny-b"))

    check(at.multiselect(key="runs").set_value(["tiny-a"]).run())
    assert any(t == "tiny-a" for t in texts(at))  # the header names it
    assert at.slider(key="step").max == STEPS["tiny-a"] - 1
    loss = charts(at)["loss"].layer(0)
    assert (
        loss.filter(series="train/loss")
        .select("step", "value")
        .equals(loss_of(recorded.url, "tiny-a"))
    )
    assert set(loss["series"].unique()) == {"train/loss", "train/mtp_loss/1"}


def test_moving_the_slider_moves_the_heatmaps_and_the_curves(recorded, monkeypatch):
    run, url = "tiny-a", recorded.url
    at = run_app(url, monkeypatch, runs=[run])
    assert charts(at)["heatmap_step"].meta["step"] == STEPS[run] - 1

    check(at.slider(key="step").set_value(1).run())
    c = charts(at)
    assert c["heatmap_step"].meta["step"] == 1
    assert c["heatmap_window"].meta["window"] == [0, 1]
    assert "Heatmap at step 1" in texts(at)
    assert c["loss"].layer(0)["step"].max() == 1  # the curve is drawn up to it
    assert c["loss"].meta["step"] == 1

    # token share cells = the store's token counts at step 1 over their layer's total
    tokens = at_step(url, run, 1, "moe/*/expert*/tokens")
    expected = tokens.with_columns(share=pl.col("value") / pl.col("value").sum().over("layer"))
    cells = c["heatmap_step"].layer(0).sort("layer", "expert")
    assert cells.height == expected.height == 4 * 8  # tiny: 4 MoE layers x 8
    np.testing.assert_allclose(cells["value"].to_numpy(), expected["share"].to_numpy(), rtol=1e-6)
    np.testing.assert_array_equal(cells["tokens"].to_numpy(), expected["value"].to_numpy())

    # activation RMS cells are the stored values themselves
    check(at.radio(key="hm_view").set_value("activation RMS").run())
    rms = at_step(url, run, 1, "moe/*/expert*/act_rms")
    cells = charts(at)["heatmap_step"].layer(0).sort("layer", "expert")
    np.testing.assert_array_equal(
        cells["value"].cast(pl.Float32).to_numpy(), rms["value"].to_numpy()
    )
    assert at.slider(key="step").value == 1  # the view change kept it


def test_the_killed_expert_is_drawn_starved_until_the_detector_says_dead(recorded, monkeypatch):
    at = run_app(recorded.url, monkeypatch, runs=["tiny-a"])
    cells = charts(at)["heatmap_step"].layer(0)
    killed = cells.filter(layer=DEAD[0], expert=DEAD[1]).row(0, named=True)
    assert killed["tokens"] == 0 and killed["starved"] is True
    assert killed["dead"] is False  # 8 steps: no expert_death event yet
    assert killed["outline"] == STARVED_COLOR  # drawn orange, not crossed
    assert (DEAD[0], DEAD[1]) not in charts(at)["heatmap_step"].layer(1)[["layer", "expert"]].rows()
    assert any(t.startswith("starved at this step") for t in texts(at))
    assert any(t.startswith("no expert declared dead by step 7") for t in texts(at))
    # the window ending before the fault saw the expert route tokens
    check(at.slider(key="step").set_value(DEAD_FROM - 1).run())
    window = charts(at)["heatmap_window"].layer(0)
    before = window.filter(layer=DEAD[0], expert=DEAD[1]).row(0, named=True)
    assert before["tokens"] > 0 and before["starved"] is False


def test_play_advances_the_step_and_stops_at_the_end(recorded, monkeypatch):
    """Play's clock is the body rerunning itself (replay.next_tick); AppTest follows those
    reruns within one run(), so each tick's step is recorded on its way (tick length 0)."""
    import streamlit as st

    from dashboard.panels import replay

    ticks: list[int] = []
    real_tick = replay.next_tick

    def tick(started: float, tick_s: float) -> None:
        assert tick_s > 0
        ticks.append(int(st.session_state.step))
        real_tick(started, 0.0)

    monkeypatch.setattr(replay, "next_tick", tick)
    at = run_app(recorded.url, monkeypatch, runs=["tiny-b"])
    last = STEPS["tiny-b"] - 1
    assert at.slider(key="step").value == last and not ticks  # not playing: no tick
    check(at.button(key="play").click().run())  # at the end: start over, to the end
    assert ticks == list(range(1, last))  # one step per tick, none after the end
    assert at.slider(key="step").value == last
    assert charts(at)["heatmap_step"].meta["step"] == last
    assert not at.session_state["playing"]
    assert at.button(key="play").label == "▶ Play"
    check(at.run())  # and it stays put
    assert at.slider(key="step").value == last and len(ticks) == last - 1


def test_events_table_jumps_the_replay_and_clips_are_drawn(recorded, monkeypatch, tmp_path):
    if not hasattr(Store, "write_events"):
        pytest.skip("this store has no events yet")
    from store import ClipRecord, EventRecord

    url = recorded.copy(tmp_path / "store")
    with open_store(url) as s:
        s.write_events(
            "tiny-a",
            [
                EventRecord(
                    step=5,
                    kind="expert_death",
                    site="moe/layer04/expert003",
                    value=0.0,
                    threshold=0.1,
                    severity="warning",
                    onset_step=3,
                ),
                EventRecord(
                    step=2,
                    kind="loss_spike",
                    site="train/loss",
                    value=9.0,
                    threshold=7.0,
                    severity="critical",
                    onset_step=2,
                ),
            ],
        )
        s.write_clips(
            "tiny-a",
            [
                ClipRecord(
                    version=1,
                    step=5,
                    layer=4,
                    site="routed",
                    limit=7.0,
                    reason="blowup",
                    acked_step=6,
                )
            ],
        )
    at = run_app(url, monkeypatch, runs=["tiny-a"])
    table = table_with(at, "onset_step")
    assert table["step"].tolist() == [2, 5]
    assert table["kind"].tolist() == ["loss_spike", "expert_death"]
    assert sorted(charts(at)["loss"].layer(1)["step"].to_list()) == [2, 5]  # markers
    heat = charts(at)["heatmap_step"]  # the event's verdict ...
    assert heat.layer(0).filter(pl.col("dead"))[["layer", "expert"]].rows() == [DEAD]
    assert heat.layer(1)[["layer", "expert"]].rows() == [DEAD]  # ... drawn as a cross
    clips = charts(at)["clips"].layer(0)
    assert clips.select("site", "step", "limit").rows() == [
        ("layer04/routed", 6, 7.0),
        ("layer04/routed", 7, 7.0),
    ]

    check(at.selectbox(key="event_pick").set_value(0).run())
    check(at.button(key="event_jump").click().run())
    assert at.slider(key="step").value == 2
    c = charts(at)
    assert c["heatmap_step"].meta["step"] == 2 and c["loss"].meta["step"] == 2
    assert c["loss"].layer(1)["step"].to_list() == [2]  # later events not yet drawn
    assert not c["heatmap_step"].layer(0)["dead"].any()  # nor later deaths
    assert "clips" not in c
    assert any("no clip in effect yet at step 2" in t for t in texts(at))


def test_a_store_without_events_or_clips_says_so(recorded, monkeypatch):
    at = run_app(recorded.url, monkeypatch, runs=["tiny-a"])
    assert {"no events recorded", "no clip updates recorded"} <= set(texts(at))
    assert len(charts(at)["loss"].spec["layer"]) == 2  # line + step rule, no events


def test_compare_overlays_runs_by_step(recorded, monkeypatch):
    at = run_app(recorded.url, monkeypatch, runs=["tiny-a", "tiny-b"], view="Compare")
    c = charts(at)
    assert {"compare:train/loss", "compare:grad/global_norm"} <= set(c)
    drawn = c["compare:train/loss"].layer(0)
    for run in ("tiny-a", "tiny-b"):
        assert drawn.filter(run=run).select("step", "value").equals(loss_of(recorded.url, run))
    check(at.multiselect(key="cmp_metrics").set_value(["train/lr"]).run())
    assert [k for k in charts(at) if k.startswith("compare:")] == ["compare:train/lr"]

    check(at.multiselect(key="runs").set_value(["tiny-a"]).run())
    assert "pick two or more runs in the sidebar to overlay their curves" in texts(at)


def test_metric_explorer_by_pattern_and_labels(recorded, monkeypatch):
    url = recorded.url
    at = run_app(url, monkeypatch, runs=["tiny-a"], view="Explorer")
    assert set(charts(at)["explorer"].meta["names"]) >= {"train/loss", "train/lr"}

    check(at.text_input(key="ex_pattern").input("moe/layer04/expert*/act_rms").run())
    assert charts(at)["explorer"].meta["names"] == [
        f"moe/layer04/expert{e:03d}/act_rms" for e in range(8)
    ]
    check(at.multiselect(key="ex_expert").set_value([DEAD[1]]).run())
    chart = charts(at)["explorer"]
    name = f"moe/layer04/expert{DEAD[1]:03d}/act_rms"
    assert chart.meta["names"] == [name]
    with open_store(url) as s:
        assert chart.layer(0).select("step", "value").equals(s.series("tiny-a", name))

    check(at.multiselect(key="ex_expert").set_value([]).run())
    check(at.text_input(key="ex_pattern").input("*").run())
    n = open_store(url).metrics("tiny-a").height
    assert any(f"{n} metrics match; plotting the first 12" in w.value for w in at.warning)
    assert len(charts(at)["explorer"].meta["names"]) == 12

    check(at.text_input(key="ex_pattern").input("nothing/*").run())
    assert not any(k == "explorer" for k in charts(at))
    assert any("matches 'nothing/*'" in t for t in texts(at))


def test_an_empty_store_and_a_missing_url(tmp_path, monkeypatch):
    at = run_app(f"parquet:{tmp_path / 'empty'}", monkeypatch)
    assert {"no runs recorded yet", "pick a run in the sidebar"} <= set(texts(at))
    from streamlit.testing.v1 import AppTest

    from tests.dashboard.conftest import APP

    monkeypatch.delenv("STEPWATCH_STORE")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert "no store given" in at.error[0].value


def test_a_link_with_run_parameters_picks_those_runs(recorded, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from tests.dashboard.conftest import APP

    monkeypatch.setenv("STEPWATCH_STORE", recorded.url)
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["run"] = ["tiny-a", "no-such-run", "tiny-b"]
    check(at.run())
    assert at.multiselect(key="runs").value == ["tiny-a", "tiny-b"]
    assert at.selectbox(key="replay_run").value == "tiny-a"
