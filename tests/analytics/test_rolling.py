"""The rolling window and the sort-based NaN median that baselines are judged by: the same
numbers as numpy's nanmedian over the last `size` pushes, through NaN, rejected values,
wrap-around and a restart; and the benchmark workload's injected anomalies are still flagged."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

from analytics.detectors import DetectorSet, MaxAbsSpike
from analytics.events import BLOWUP, BLOWUP_RECOVERED, EXPERT_STARVED, MAXABS_SPIKE
from analytics.frame import StepFrame
from analytics.rolling import START_SLOTS, Rolling, nanmedian
from benchmarks.detect_cost import reduced_steps, run_index
from benchmarks.workload import Workload
from tests.analytics.synthetic import SyntheticRun, blowup


def reference_median(x: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=axis)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_nanmedian_is_numpys_through_nan_inf_and_empty_slices(axis):
    rng = np.random.default_rng(0)
    x = rng.lognormal(0, 1, (7, 9))
    x[rng.random(x.shape) < 0.3] = np.nan
    x[0] = np.nan  # an all-NaN row
    x[:, 0] = np.nan  # an all-NaN column
    x[2, 3], x[4, 5], x[4, 6] = np.inf, -np.inf, np.inf  # inf is a value, not a gap
    np.testing.assert_array_equal(nanmedian(x, axis), reference_median(x, axis))
    even = np.array([[1.0, 4.0, np.nan, 2.0, 8.0]])  # 4 values: mean of the middle two
    assert nanmedian(even, 1)[0] == 3.0
    assert (
        nanmedian(np.empty((3, 0)), 1).shape == (3,)
        and np.isnan(nanmedian(np.empty((3, 0)), 1)).all()
    )


def test_rolling_matches_nanmedian_over_the_last_size_pushes():
    rng = np.random.default_rng(1)
    size, shape = 5, (3, 4)
    roll = Rolling(shape, size)
    pushed = []  # what the window should hold, float64
    for _ in range(17):  # wraps around three times
        row = rng.normal(10, 3, shape)
        accept = rng.random(shape) < 0.8
        row[rng.random(shape) < 0.1] = np.inf  # not finite: never counts
        kept = np.where(accept & np.isfinite(row), row.astype(np.float32), np.nan)
        roll.push(row, accept)
        pushed.append(kept)
        window = np.stack(pushed[-size:])
        np.testing.assert_array_equal(roll.count(), np.isfinite(window).sum(axis=0))
        np.testing.assert_allclose(roll.median(), reference_median(window, 0), rtol=1e-6)
        np.testing.assert_array_equal(np.isnan(roll.median()), ~np.isfinite(window).any(axis=0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            np.testing.assert_array_equal(roll.min(), np.nanmin(window, axis=0))
        select = rng.random(shape) < 0.5
        np.testing.assert_array_equal(roll.median(select), np.where(select, roll.median(), np.nan))
    assert np.array_equal(roll.oldest(), pushed[-size], equal_nan=True)


def test_a_window_grows_as_pushes_need_and_judges_as_a_full_one():
    """A window of 20 starts with START_SLOTS rows and doubles up to 20: its counts, medians,
    minimum and oldest row are those of the last 20 pushes all along, past the wrap too."""
    rng = np.random.default_rng(3)
    roll, pushed, rows = Rolling((6,), 20), [], []
    for _ in range(45):
        row = rng.normal(5, 2, 6)
        row[rng.random(6) < 0.2] = np.nan
        roll.push(row)
        pushed.append(row.astype(np.float32))
        rows.append(roll.buf.shape[0])
        window = np.stack(pushed[-20:])
        np.testing.assert_array_equal(roll.count(), np.isfinite(window).sum(axis=0))
        np.testing.assert_allclose(roll.median(), reference_median(window, 0), rtol=1e-6)
        expect_oldest = pushed[-20] if len(pushed) >= 20 else np.full(6, np.nan)
        np.testing.assert_array_equal(roll.oldest(), expect_oldest)
    assert rows[0] == START_SLOTS and rows[START_SLOTS] == 2 * START_SLOTS and rows[-1] == 20
    assert max(rows) == 20


def test_rolling_state_round_trip_and_bad_input():
    roll = Rolling((2, 3), 4)
    for k in range(6):
        roll.push(np.full((2, 3), float(k)), np.array([[True, False, True]] * 2))
    state = roll.state_dict()
    assert state["buf"].shape == (4, 2, 3) and state["pos"] == 2
    back = Rolling((2, 3), 4)
    back.load_state_dict(copy.deepcopy(state))
    np.testing.assert_array_equal(back.median(), roll.median())
    np.testing.assert_array_equal(back.count(), [[4, 0, 4]] * 2)
    for r in (roll, back):
        r.push(np.full((2, 3), 100.0))
    np.testing.assert_array_equal(back.median(), roll.median())
    assert back.median()[0, 0] == 4.5 and back.median()[0, 1] == 100.0  # {3,4,5,100}; {100}
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*\(3, 2\)"):
        roll.push(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="expected"):
        Rolling((2, 2), 4).load_state_dict(state)
    with pytest.raises(ValueError, match="pos 7"):
        Rolling((2, 3), 4).load_state_dict({"buf": state["buf"], "pos": 7})
    with pytest.raises(ValueError, match="size >= 1"):
        Rolling((2,), 0)


def test_the_benchmark_workloads_injected_anomalies_are_flagged():
    """benchmarks/detect_cost.py's workload, scaled down: its blow-up (x40 max|h| from step 20,
    a spike at once and sustained growth - a clamp - two steps later)
    and its dying expert (starved from ~step 17, no parameter norms: the 200-step long window)
    are found at the site and step they imply (starved, not dead: no parameter norms say it
    decayed), and nothing else is."""
    w = Workload(world=64, metrics_per_rank=200, n_layers=4, n_experts=16)
    index = run_index(w)
    ids = np.arange(index.size)
    det = DetectorSet()
    events = []
    for s, vec in enumerate(reduced_steps(w, index, 240)):
        events += det.observe(StepFrame.from_rows("wl", s, ids, vec, index.size), index)
    assert det.errors == {}
    spike_site = w.spike_site.name.rsplit("/", 1)[0]
    dying = f"moe/layer{w.n_layers // 2:02d}/expert{w.n_experts - 1:03d}"
    assert [(e.kind, e.site, e.step) for e in events] == [
        (MAXABS_SPIKE, spike_site, w.spike_step),
        (BLOWUP, spike_site, w.spike_step + 2),  # still x40 two steps later: sustained
        (EXPERT_STARVED, dying, events[2].step),
    ]
    assert events[1].decision == "clamp" and events[1].detail["rule"] == "maxabs"
    death = events[2]
    assert death.detail["path"] == "starvation" and death.delay == 199
    assert w.death_step < death.onset_step <= w.death_step + 10


def test_maxabs_lower_bound_shortcut_changes_nothing(monkeypatch):
    """MaxAbsSpike sorts only the windows of sites not proven calm by the window minimum: on
    a noisy run with excursions near and above the thresholds it gives the same events and
    state as with every window sorted."""

    def noisy_run():
        syn = SyntheticRun(seed=5)
        rng = np.random.default_rng(5)

        def noise(step, v):
            for e in range(8):  # heavy tails: ratios of 2-10 are common
                v[f"moe/layer01/expert{e:03d}/act_maxabs"] *= rng.lognormal(0, 0.6)
            if step % 37 == 5:  # transients that fire and recover
                v["moe/layer02/expert003/act_maxabs"] *= 30

        syn.faults += [noise, blowup(2, 6, start=120, rate=1.2)]
        return syn

    def run(det):
        syn = noisy_run()
        return [e for s in range(200) for e in det.observe(syn.frame(s), syn.index)], det

    fast, fast_det = run(MaxAbsSpike())
    monkeypatch.setattr(Rolling, "min", lambda self: np.full(self.shape, np.nan))  # no proof
    full, full_det = run(MaxAbsSpike())
    kinds = {e.kind for e in fast}
    assert kinds == {MAXABS_SPIKE, BLOWUP, BLOWUP_RECOVERED} and len(fast) >= 6  # the
    # blow-up from step 120 stays above the threshold: sustained
    assert fast == full
    for name in ("_alarm", "_calm", "_rising"):
        np.testing.assert_array_equal(getattr(fast_det, name), getattr(full_det, name))


def test_a_window_not_yet_full_saves_only_its_held_slots_and_goes_on_the_same():
    roll = Rolling((3,), 40)
    for k in range(5):
        roll.push(np.array([k, 2.0 * k, np.nan]))
    state = roll.state_dict()
    assert state["buf"].shape == (5, 3) and state["pos"] == 5
    back = Rolling((3,), 40)
    back.load_state_dict(copy.deepcopy(state))
    np.testing.assert_array_equal(back.buf, roll.buf)
    np.testing.assert_array_equal(back.count(), roll.count())
    for k in range(5, 50):  # past the wrap: the same window, the same medians
        for r in (roll, back):
            r.push(np.array([k, 2.0 * k, 1.0]))
        np.testing.assert_array_equal(back.median(), roll.median())
        np.testing.assert_array_equal(back.oldest(), roll.oldest())
    assert Rolling((3,), 40).state_dict()["buf"].shape == (0, 3)  # empty: nothing saved
