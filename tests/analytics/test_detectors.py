"""Each detector on a synthetic run: it fires on its fault, at the step and site the fault
implies, and stays silent on healthy noise; thresholds are validated."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analytics.catalog import MetricIndex, site_of
from analytics.detectors import (
    AttnLogitGrowth,
    DetectorSet,
    ExpertDeath,
    MaxAbsSpike,
    NonFinite,
    grad_spike,
    loss_spike,
)
from analytics.events import (
    ATTN_LOGIT,
    BLOWUP,
    BLOWUP_RECOVERED,
    EXPERT_DEATH,
    EXPERT_REVIVAL,
    EXPERT_STARVED,
    GRAD_SPIKE,
    LOSS_SPIKE,
    MAXABS_SPIKE,
    NONFINITE,
)
from analytics.frame import StepFrame
from tests.analytics.synthetic import SyntheticRun, blowup, death, run_detector, starve

STEPS = range(120)


def test_healthy_run_raises_nothing():
    for seed in range(3):
        syn = SyntheticRun(seed=seed)
        det = DetectorSet()
        events = [e for s in STEPS for e in det.observe(syn.frame(s), syn.index)]
        assert events == [] and det.errors == {}


# ---- non-finite ------------------------------------------------------------------------------
def test_nonfinite_names_the_first_site_in_forward_order_and_the_ranks(syn):
    # a NaN born in layer 2's MoE output: layer 2's residual, the loss and grads follow
    bad = ["grad/global_norm", "train/loss", "resid/layer02/rms", "grad/layer01/norm"]
    det = NonFinite()
    assert run_detector(det, syn, range(5)) == []
    v = syn.values(5)
    for n in bad:
        v[n] = float("nan")
    v["attn/layer02/head01/max_logit"] = float("inf")  # later in layer 2? no: earlier
    ranks = {
        0: {"attn/layer02/head01/max_logit": 8.0},
        1: {"attn/layer02/head01/max_logit": float("inf")},
    }
    (ev,) = det.observe(syn.frame_of(5, v, ranks), syn.index)
    assert ev.kind == NONFINITE and ev.severity == "critical" and ev.step == ev.onset_step == 5
    assert ev.site == "attn/layer02/head01" and ev.detail["metric"].endswith("max_logit")
    assert ev.value == 5 and ev.detail["ranks"] == [1] and ev.detail["layer"] == 2
    assert ev.detail["metrics"][:2] == ["attn/layer02/head01/max_logit", "resid/layer02/rms"]
    assert det.observe(syn.frame_of(6, v), syn.index) == []  # same episode
    assert det.observe(syn.frame(7), syn.index) == []  # clean: re-armed
    assert len(det.observe(syn.frame_of(8, v), syn.index)) == 1


def test_nonfinite_ignores_metrics_that_were_not_sent(syn):
    det = NonFinite()
    frame = syn.frame(3)  # params are absent on step 3: NaN, not present
    assert not frame.present[syn.index.find("params/layer01/expert000/fro_norm")]
    assert det.observe(frame, syn.index) == []


# ---- loss / grad spikes ------------------------------------------------------------------
def test_loss_spike_is_seven_sigma_above_the_trend(syn):
    def spike(step, v):
        if step == 60:
            v["train/loss"] += 0.5  # ~16 sigma of 0.03 noise

    syn.faults.append(spike)
    det = loss_spike()
    events = run_detector(det, syn, range(80))
    assert [(e.kind, e.step, e.site) for e in events] == [(LOSS_SPIKE, 60, "train/loss")]
    assert events[0].detail["z"] >= 7 and events[0].value > events[0].threshold


def test_a_falling_loss_is_no_spike_and_early_steps_are_not_judged(syn):
    def fall(step, v):
        v["train/loss"] = 5.5 * math.exp(-step / 15) + 2 + 0.03 * math.sin(step)

    syn.faults.append(fall)
    assert run_detector(loss_spike(), syn, range(100)) == []


def test_grad_spike_in_log_space_and_a_level_shift_is_learned(syn):
    def shift(step, v):
        if step >= 50:
            v["grad/global_norm"] *= 20  # jumps and stays

    syn.faults.append(shift)
    det = grad_spike()
    events = run_detector(det, syn, range(130))
    assert [(e.kind, e.step) for e in events] == [(GRAD_SPIKE, 50)]
    assert det._alarm_since == -1  # the new level became the baseline


# ---- attention logits --------------------------------------------------------------------
def test_attn_logit_above_tau_once_per_head(syn):
    def grow(step, v):
        v["attn/layer01/head01/max_logit"] = 60 + 5 * max(0, step - 20)

    syn.faults.append(grow)
    events = run_detector(AttnLogitGrowth(), syn, range(40))
    assert [(e.kind, e.step, e.site) for e in events] == [
        (ATTN_LOGIT, 29, "attn/layer01/head01")
    ]  # 60 + 5 * 9 = 105 > 100
    assert events[0].detail["value_before"] < 100 and events[0].threshold == 100


# ---- expert death ------------------------------------------------------------------------
def test_expert_death_with_parameter_decay_within_the_window(syn):
    syn.faults.append(death(2, 5, start=40))
    det = ExpertDeath()
    events = run_detector(det, syn, range(100))
    (ev,) = [e for e in events if e.kind == EXPERT_DEATH]
    assert ev.site == "moe/layer02/expert005" and ev.layer == 2 and ev.expert == 5
    assert ev.onset_step == 40 and ev.step == 40 + det.window - 1
    assert ev.detail["path"] == "parameter-decay" and ev.detail["param_norm_ratio"] <= 0.5


def test_starvation_without_decay_is_reported_starved_after_the_long_window(syn):
    syn.faults.append(starve(1, 3, start=10, stop=70))  # 60 steps: balancing's business
    assert run_detector(ExpertDeath(), syn, range(120)) == []
    syn2 = SyntheticRun(seed=1)
    syn2.faults.append(starve(1, 3, start=10, stop=140))
    det = ExpertDeath(long_window=100)
    events = run_detector(det, syn2, range(150))
    assert [(e.kind, e.step, e.onset_step) for e in events] == [
        (EXPERT_STARVED, 109, 10),
        (EXPERT_REVIVAL, 144, 140),
    ]  # fed 5 steps: revived; never called dead: its parameters did not decay
    assert events[0].site == events[1].site == "moe/layer01/expert003"
    assert events[0].detail["path"] == "starvation"


# ---- blow-ups ----------------------------------------------------------------------------
def test_maxabs_spike_names_the_site_with_onset_and_baselines(syn):
    syn.faults.append(blowup(2, 6, start=50, rate=1.25))
    det = MaxAbsSpike()
    events = run_detector(det, syn, range(75))
    ev, held = events  # the spike, and two steps later: still there, sustained
    assert (held.kind, held.step, held.site) == (BLOWUP, ev.step + 2, ev.site)
    assert held.detail["sustained"] and held.detail["rule"] == "maxabs"
    assert held.onset_step == ev.onset_step and not ev.detail["sustained"]
    assert ev.kind == MAXABS_SPIKE and ev.site == "moe/layer02/expert006"
    assert ev.detail["clip_site"] == "routed" and ev.layer == 2
    # 1.25^k reaches factor 12 at k ~ 11.1: the floor set by the threshold
    assert 50 + 9 <= ev.step <= 50 + 13 and 50 <= ev.onset_step <= 54
    base = ev.detail["layer_baseline_maxabs"]
    assert 2.0 < base < 6.0 and 2.0 < ev.detail["baseline_maxabs"] < 6.0  # ~4 x 0.8


@pytest.mark.parametrize("steps,sustained", [(2, False), (5, True)])
def test_maxabs_recovers_when_the_site_returns_to_its_baseline(steps, sustained):
    """A 2-step transient warns and recovers; held for 5 steps it is sustained (one blow-up
    event at its third step) before it recovers."""
    syn = SyntheticRun(seed=0)

    def transient(step, v):
        if 40 <= step < 40 + steps:
            v["moe/layer01/expert002/act_maxabs"] *= 30

    syn.faults.append(transient)
    events = run_detector(MaxAbsSpike(), syn, range(80))
    site = "moe/layer01/expert002"
    assert [(e.kind, e.step, e.site) for e in events] == [(MAXABS_SPIKE, 40, site)] + (
        [(BLOWUP, 42, site)] if sustained else []
    ) + [(BLOWUP_RECOVERED, 40 + steps - 1 + 10, site)]
    assert events[-1].detail["of"] == MAXABS_SPIKE


def test_shared_expert_spike(syn):
    def shared(step, v):
        if step >= 30:
            v["moe/layer01/shared/act_maxabs"] *= 40

    syn.faults.append(shared)
    ev, held = run_detector(MaxAbsSpike(), syn, range(40))
    assert ev.site == held.site == "moe/layer01/shared" and ev.detail["clip_site"] == "shared"
    assert (ev.kind, held.kind, held.step) == (MAXABS_SPIKE, BLOWUP, ev.step + 2)


# ---- configuration -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: ExpertDeath(window=0),
        lambda: ExpertDeath(window=30, long_window=20),
        lambda: MaxAbsSpike(factor=-1),
        lambda: MaxAbsSpike(clear_factor=13),
        lambda: AttnLogitGrowth(tau=0),
        lambda: loss_spike(min_history=2),
    ],
)
def test_bad_thresholds_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_site_of():
    assert site_of("moe/layer04/expert003/act_rms") == "moe/layer04/expert003"
    assert site_of("train/loss") == "train/loss" and site_of("loss") == "loss"
    assert site_of("resid/layer02/rms") == "resid/layer02"


def _loop_index() -> MetricIndex:
    rows = [
        ("resid/layer00/rms", 0, "rms"),
        ("train/loss", -1, "loss"),
        ("train/mtp_loss/1", -1, "mtp_loss"),
        ("train/lr", -1, "lr"),
        ("train/tokens", -1, "tokens"),
        ("moe/layer01/expert000/tokens", 1, "tokens"),
        ("user/probe", -1, "value"),
        ("grad/global_norm", -1, "norm"),
    ]
    return MetricIndex.from_columns(
        range(len(rows)),
        [r[0] for r in rows],
        [r[1] for r in rows],
        [-1] * len(rows),
        [-1] * len(rows),
        [r[2] for r in rows],
    )


def _loop_frame(step: int, **nan: float) -> StepFrame:
    v = {
        "resid/layer00/rms": 1.0,
        "train/loss": 3.0,
        "train/mtp_loss/1": float("nan"),  # step_end(mtp_losses=[]): never given
        "train/lr": float("nan"),  # no lr, no optimizer
        "train/tokens": 512.0,
        "moe/layer01/expert000/tokens": 64.0,
        "user/probe": 0.5,
        "grad/global_norm": 1.0,
    }
    v.update({k.replace("__", "/"): x for k, x in nan.items()})
    return StepFrame.from_rows("loop", step, np.arange(len(v)), np.array(list(v.values())), len(v))


def test_nonfinite_loop_inputs_never_given_are_no_finding_and_hide_nothing():
    """A healthy run that passes no MTP losses and no lr is quiet (it used to get a critical
    event at step 0 and then, the episode never closing, no event for a real NaN later)."""
    ix, det = _loop_index(), NonFinite()
    assert [e for s in range(40) for e in det.observe(_loop_frame(s), ix)] == []
    (ev,) = det.observe(_loop_frame(40, train__loss=float("nan")), ix)
    assert ev.step == 40 and ev.detail["metric"] == "train/loss" and ev.value == 1


def test_nonfinite_a_loop_input_once_given_is_judged():
    ix, det = _loop_index(), NonFinite()
    assert det.observe(_loop_frame(0, train__lr=1e-3), ix) == []
    (ev,) = det.observe(_loop_frame(1), ix)  # lr was given, now NaN
    assert ev.detail["metric"] == "train/lr"
    # an expert's token count is no loop input: NaN there is a finding from the start
    (ev,) = NonFinite().observe(_loop_frame(0, moe__layer01__expert000__tokens=np.nan), ix)
    assert ev.detail["metric"] == "moe/layer01/expert000/tokens"
    # and an infinity is always one
    (ev,) = NonFinite().observe(_loop_frame(0, train__mtp_loss__1=np.inf), ix)
    assert ev.detail["metric"] == "train/mtp_loss/1"


def test_nonfinite_a_stuck_metric_stops_holding_the_episode():
    ix, det = _loop_index(), NonFinite(stuck_steps=5)
    events = [e for s in range(30) for e in det.observe(_loop_frame(s, user__probe=np.nan), ix)]
    assert [(e.step, e.detail["metric"]) for e in events] == [(0, "user/probe")]
    (ev,) = det.observe(_loop_frame(30, user__probe=np.nan, grad__global_norm=np.nan), ix)
    assert ev.detail["metric"] == "grad/global_norm" and ev.value == 1
    # the stuck metric is armed again once finite
    assert det.observe(_loop_frame(31), ix) == []
    (ev,) = det.observe(_loop_frame(32, user__probe=np.nan), ix)
    assert ev.detail["metric"] == "user/probe"


def test_nonfinite_state_round_trips_what_it_learned():
    ix, det = _loop_index(), NonFinite()
    det.observe(_loop_frame(0, train__lr=1e-3), ix)
    again = NonFinite()
    again.load_state_dict(det.state_dict())
    (ev,) = again.observe(_loop_frame(1), ix)  # remembers lr was given
    assert ev.detail["metric"] == "train/lr"
