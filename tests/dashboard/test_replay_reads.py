"""Replay at scale and live: a 100k-step run scrubs without touching the store again, and a live
run's page follows new steps (or stays where the user put it) with one read per step moved."""

from __future__ import annotations

from collections import Counter

import numpy as np

from dashboard import data, reads
from store import open_store
from tests.dashboard.conftest import charts, check, run_app, texts
from tests.dashboard.runs import synthetic_dict, write_synthetic_run

STEPS = 100_000
SPIKE = (54_321, 40.0)


class CountingStore:
    """Delegates to a real store and counts the reads the dashboard makes."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, Counter()

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name not in ("series", "at_step", "metrics", "events", "clips"):
            return attr

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


def counting(monkeypatch, url: str) -> CountingStore:
    store = CountingStore(open_store(url))
    real = reads.open_store
    monkeypatch.setattr(reads, "open_store", lambda u: store if u == url else real(u))
    return store


def test_a_100k_step_run_opens_and_scrubs_from_memory(tmp_path, monkeypatch):
    url = f"parquet:{tmp_path / 'big'}"
    values = write_synthetic_run(url, "big", STEPS, spike=SPIKE)
    md = synthetic_dict((1, 2), 4)
    store = counting(monkeypatch, url)
    at = run_app(url, monkeypatch)
    check(at.radio(key="hm_view").set_value("activation RMS").run())
    check(at.radio(key="hm_view").set_value("token share").run())
    loss = charts(at)["loss"].layer(0)
    assert loss.height <= data.MAX_POINTS + 1  # bounded, whatever the length
    assert loss.filter(step=SPIKE[0])["value"].to_list() == [SPIKE[1]]
    assert any("downsampled for display: 100,000 points" in t for t in texts(at))
    opened = dict(store.calls)
    assert opened["series"] == 3 + 2 * 8  # 3 curves; tokens and act_rms of 8 experts

    for step in (60_000, SPIKE[0], SPIKE[0] - 1, 30_000, 99_998):
        check(at.slider(key="step").set_value(step).run())
        c = charts(at)
        loss = c["loss"].layer(0)
        assert loss["step"].max() <= step and loss.height <= data.MAX_POINTS + 1
        assert (SPIKE[0] in loss["step"].to_list()) == (step >= SPIKE[0])
        cells = c["heatmap_step"].layer(0).sort("layer", "expert")
        tokens = np.array(
            [
                values[
                    step, md.name.index(f"moe/layer{r['layer']:02d}/expert{r['expert']:03d}/tokens")
                ]
                for r in cells.iter_rows(named=True)
            ],
            dtype=np.float64,
        )
        share = tokens / np.repeat(tokens.reshape(2, 4).sum(axis=1), 4)
        np.testing.assert_allclose(cells["value"].to_numpy(), share, rtol=1e-6)
        assert c["heatmap_window"].meta["window"] == [step - 15, step]
    assert dict(store.calls) == opened  # scrubbing read nothing


def test_a_live_run_is_followed_unless_the_user_scrubbed_back(tmp_path, monkeypatch):
    url = f"parquet:{tmp_path / 'live'}"
    write_synthetic_run(url, "live", 50, finished=False, layers=(1,), experts=4)
    store = counting(monkeypatch, url)
    at = run_app(url, monkeypatch)
    assert any("last step received" in t and "live" in t for t in texts(at))
    assert at.slider(key="step").value == 49

    write_synthetic_run(url, "live", 60, start=50, finished=False, layers=(1,), experts=4)
    reads.runs.clear()  # as if the 2 s TTL ran out
    check(at.run())  # a refresh tick
    assert at.slider(key="step").value == 59 and at.slider(key="step").max == 59
    assert charts(at)["loss"].layer(0)["step"].max() == 59

    check(at.slider(key="step").set_value(20).run())  # the user looks back ...
    write_synthetic_run(url, "live", 70, start=60, finished=False, layers=(1,), experts=4)
    reads.runs.clear()
    check(at.run())
    assert at.slider(key="step").value == 20  # ... and stays there
    assert at.slider(key="step").max == 69
    assert charts(at)["heatmap_step"].meta["step"] == 20

    before = store.calls["at_step"]
    check(at.slider(key="step").set_value(21).run())  # window 6..21: one new step
    assert store.calls["at_step"] == before + 1

    write_synthetic_run(url, "live", 70, start=70, finished=True, layers=(1,), experts=4)
    reads.runs.clear()
    check(at.run())
    assert not any("last step received" in t for t in texts(at))
    assert at.slider(key="step").value == 21
    finished = reads.runs(url).row(0, named=True)
    assert finished["status"] == "finished"
