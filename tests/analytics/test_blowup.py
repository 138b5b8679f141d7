"""ExpertBlowup (weights CUSUM, activation runaway) and LrChange on synthetic runs: each rule
fires where and when its documented delay bound says, on the expert that grows however few
tokens it gets, and stays silent on what healthy training does (level shifts, a learning-rate
schedule, every expert growing together)."""

from __future__ import annotations

import math

import pytest

from analytics.clip_policy import ClipPolicy
from analytics.detectors import DetectorSet, ExpertBlowup, LrChange
from analytics.events import BLOWUP, BLOWUP_RECOVERED, CLAMP, LR_CHANGE, WARN
from tests.analytics.synthetic import PARAM_EVERY, SyntheticRun, blowup, run_detector, starve

SITE = "moe/layer02/expert005"


def first_n(rho: float, need: float = 1.19) -> int:
    """Steps of x rho on W_up until the expert's parameter norm has grown by `need`."""
    return next(n for n in range(1, 200) if math.sqrt((2 + rho ** (2 * n)) / 3) >= need)


@pytest.mark.parametrize("rho", [1.2, 1.1, 1.05])
def test_weights_catch_a_starved_expert_within_the_documented_bound(rho):
    """No token reaches the expert, so it has no activation to look at; its up-projection
    grows all the same and the weights rule names it (the tiny preset's blowup@30 case)."""
    start = 41  # just after a measurement: the worst alignment
    syn = SyntheticRun(seed=1)
    syn.faults += [starve(2, 5, start=20), blowup(2, 5, start=start, rate=rho)]
    (ev,) = [e for e in run_detector(ExpertBlowup(), syn, range(100)) if e.kind == BLOWUP]
    assert ev.site == SITE and (ev.layer, ev.expert) == (2, 5) and ev.detail["rule"] == "weights"
    n = first_n(rho)
    # the first measurement that saw n steps of growth; at most K + n - 1 steps after onset
    expected = next(m for m in range(0, 200, PARAM_EVERY) if m - start + 1 >= n)
    assert ev.step == expected and ev.step - start <= PARAM_EVERY + n - 1
    assert start - PARAM_EVERY <= ev.onset_step <= start  # dated to the measurement period
    assert ev.detail["localized"] and ev.detail["confidence"] == 1.0  # weights: the only channel
    assert ev.detail["clip_site"] == "routed" and 1.0 < ev.detail["layer_baseline_maxabs"] < 8


def test_slow_growth_of_a_fed_expert_is_caught_by_its_weights_and_clamped():
    syn = SyntheticRun(seed=2)
    syn.faults.append(blowup(2, 5, start=60, rate=1.05))
    det = DetectorSet()
    events = [e for s in range(120) for e in det.observe(syn.frame(s), syn.index)]
    blow = [e for e in events if e.kind == BLOWUP]
    assert [e.site for e in blow] == [SITE]
    (ev,) = blow
    assert ev.step == 70 and ev.decision == CLAMP  # 10 steps at x1.05: g(10) = 1.25 >= 1.19
    evidence = {c["channel"]: c for c in ev.evidence}
    assert evidence["weights"]["agrees"] and evidence["weights"]["period_growth"] > 1.19
    assert evidence["act_rms"]["value"] > 1.3  # the activations grew 1.6x: they agree


def test_activation_runaway_without_weight_growth():
    """Activations that outrun the weights (here: the weights do not move at all)."""
    syn = SyntheticRun(seed=3)
    syn.faults.append(blowup(1, 2, start=50, rate=1.3, weights=False))
    (ev,) = [e for e in run_detector(ExpertBlowup(), syn, range(90)) if e.kind == BLOWUP]
    assert ev.site == "moe/layer01/expert002" and ev.detail["rule"] == "activations"
    k = math.ceil(math.log(6) / math.log(1.3))  # 1.3^7 = 6.3: >= 6 from step 56, twice: 57
    assert 50 + k <= ev.step <= 50 + k + 3  # the channels' noise (10-20% per step) delays it
    assert 50 <= ev.onset_step <= 52
    assert ev.value >= 6 and ev.threshold == 6


def test_healthy_level_shift_and_noise_raise_nothing():
    """An expert that moves 4x against its layer and stays there (specialisation), another
    that starves and comes back: neither grows like a blow-up."""

    def shift(step, v):
        if step >= 40:
            for stat in ("act_rms", "act_maxabs", "out_norm"):
                v[f"moe/layer01/expert003/{stat}"] *= 4.0

    syn = SyntheticRun(seed=4)
    syn.faults += [shift, starve(2, 1, start=30, stop=70)]
    assert [e for e in run_detector(ExpertBlowup(), syn, range(150)) if e.kind == BLOWUP] == []


def test_every_expert_growing_at_once_is_not_localized():
    """Weights of many experts jump together (a learning-rate spike without train/lr, or a
    bad batch): the growth is seen, but it is no localized blow-up and nothing is clamped."""

    def jump(step, v):
        if step >= 50 and step % PARAM_EVERY == 0:
            for l in (1, 2):
                for e in (0, 3, 6):
                    v[f"params/layer{l:02d}/expert{e:03d}/fro_norm"] *= 1.6

    syn = SyntheticRun(seed=5)
    syn.faults.append(jump)
    det = DetectorSet()
    events = [e for s in range(70) for e in det.observe(syn.frame(s), syn.index)]
    blow = [e for e in events if e.kind == BLOWUP]
    assert len(blow) == 6 and all(not e.detail["localized"] for e in blow)
    assert {e.decision for e in blow} == {WARN} and "not localized" in blow[0].detail["reason"]


def test_recovery_when_the_cause_goes_away_and_none_while_weights_grow():
    def transient(step, v):  # 12 steps of x1.25, then back where it was
        if 60 <= step < 72:
            g = 1.25 ** (step - 59)
            for stat in ("act_rms", "act_maxabs", "out_norm"):
                v[f"moe/layer02/expert005/{stat}"] *= g
            if step % PARAM_EVERY == 0:
                v["params/layer02/expert005/fro_norm"] *= math.sqrt((2 + g * g) / 3)

    syn = SyntheticRun(seed=6)
    syn.faults.append(transient)
    events = run_detector(ExpertBlowup(), syn, range(130))
    kinds = [(e.kind, e.site) for e in events]
    assert kinds == [(BLOWUP, SITE), (BLOWUP_RECOVERED, SITE)]
    assert events[1].step >= 72 + 10 and events[1].detail["of"] == BLOWUP
    syn = SyntheticRun(seed=6)
    syn.faults.append(blowup(2, 5, start=60, rate=1.1))  # keeps growing: never recovered
    events = run_detector(ExpertBlowup(), syn, range(200))
    assert [e.kind for e in events] == [BLOWUP]


def test_detector_state_survives_a_restart():
    import copy

    def run(det, steps, syn):
        return [e for s in steps for e in det.observe(syn.frame(s), syn.index)]

    syn = SyntheticRun(seed=7)
    syn.faults.append(blowup(1, 4, start=45, rate=1.1))
    straight = run(ExpertBlowup(), range(90), syn)
    syn = SyntheticRun(seed=7)
    syn.faults.append(blowup(1, 4, start=45, rate=1.1))
    first = ExpertBlowup()
    events = run(first, range(47), syn)
    again = ExpertBlowup()
    again.load_state_dict(copy.deepcopy(first.state_dict()))
    events += run(again, range(47, 90), syn)
    assert straight and events == straight


# ---- learning-rate changes ----------------------------------------------------------------
def lr_run(spike_at: int | None):
    def schedule(step, v):
        warm, total, lr = 10, 150, 3e-3
        if step < warm:
            x = lr * (step + 1) / warm
        else:
            x = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm))))
        if spike_at is not None and spike_at <= step < spike_at + 5:
            x *= 30
        v["train/lr"] = x

    syn = SyntheticRun(seed=8)
    syn.index.extend([syn.index.size], ["train/lr"], [-1], [-1], [-1], ["lr"])
    syn.faults.append(schedule)
    return syn


def test_lr_schedule_is_no_change_and_a_spike_is_one():
    assert run_detector(LrChange(), lr_run(None), range(150)) == []
    (ev,) = run_detector(LrChange(), lr_run(60), range(150))
    assert (ev.kind, ev.step, ev.site) == (LR_CHANGE, 60, "train/lr")
    assert ev.detail["ratio"] == pytest.approx(30, rel=0.01) and ev.is_global


def test_bad_thresholds_are_refused():
    for make in (
        lambda: ExpertBlowup(allowance=0.9),
        lambda: ExpertBlowup(min_history=50),
        lambda: ExpertBlowup(rise=3.0),
        lambda: ExpertBlowup(lag=0),
        lambda: LrChange(factor=1.0),
    ):
        with pytest.raises(ValueError):
            make()


def collapse(layer: int, keep: tuple[int, ...], start: int, drop: float = 0.125):
    """The router sends nearly every token of `layer` to the experts in `keep`; the others
    get a token or two, and on 2 steps of every 10 their statistics fall `drop`x (act_rms is a
    mean over ranks that counts a rank that routed an expert nothing as 0) - what the tiny
    preset's through-agent run showed at layer 2, steps 120-150."""

    def f(step, v):
        if step < start:
            return
        for e in range(8):
            key = f"moe/layer{layer:02d}/expert{e:03d}"
            if e in keep:
                v[f"{key}/tokens"] = 2000.0
                continue
            v[f"{key}/tokens"] = 1.0 + e % 2
            if (step - start) % 10 in (5, 6):
                for stat in ("act_rms", "act_maxabs", "out_norm"):
                    v[f"{key}/{stat}"] *= drop

    return f


def test_a_layer_median_that_collapses_for_two_steps_is_no_blowup():
    """The through-agent false positive (blowup@135, then a clamp of a healthy run): the
    steady experts that take every token sat 8x above a median of few-token experts on two
    consecutive steps. Judged against the layer's usual scale, nothing fires and nothing is
    clamped, over 25 such episodes."""
    syn = SyntheticRun(seed=6)
    syn.faults.append(collapse(2, keep=(2, 3), start=20))
    det, policy = DetectorSet(), ClipPolicy()
    events = []
    for s in range(270):
        evs = det.observe(syn.frame(s), syn.index)
        events += evs
        assert policy.step(s, evs) == [], s
    assert [e for e in events if e.kind == BLOWUP] == []


def test_a_real_runaway_inside_a_collapsed_layer_is_still_caught():
    """The same collapsed layer, and one of its steady experts then grows x1.3 per step
    (activations only): caught by the activations rule as on a healthy layer."""
    syn = SyntheticRun(seed=6)
    syn.faults += [
        collapse(2, keep=(2, 3), start=20),
        blowup(2, 3, start=120, rate=1.3, weights=False),
    ]
    (ev,) = [e for e in run_detector(ExpertBlowup(), syn, range(160)) if e.kind == BLOWUP]
    assert ev.site == "moe/layer02/expert003" and ev.detail["rule"] == "activations"
    k = math.ceil(math.log(6) / math.log(1.3))
    assert 120 + k <= ev.step <= 120 + k + 3


@pytest.mark.parametrize("ranks_see_it", [True, False])
def test_activation_growth_the_ranks_do_not_see_warns_instead_of_clamping(ranks_see_it):
    """Two ranks: the reduced values carry an expert's runaway. When each rank's own values
    show it too, it is clamped as for one rank; when neither rank's do (the reduced max of
    one rank's outlier over another rank's median: the through-agent run's step 142), it is
    an event that warns, and nothing is clamped."""
    syn, grown = SyntheticRun(seed=3), SyntheticRun(seed=3)
    grown.faults.append(blowup(1, 2, start=50, rate=1.3))  # the weights agree (C > 0 at 57)
    det, policy, events, clips = DetectorSet(), ClipPolicy(), [], []
    for s in range(80):
        healthy, v = syn.values(s), grown.values(s)
        per_rank = {0: v, 1: v} if ranks_see_it else {0: healthy, 1: healthy}
        evs = det.observe(grown.frame_of(s, v, per_rank), grown.index)
        events += [e for e in evs if e.kind == BLOWUP]
        clips += policy.step(s, evs)
    # the activations rule, then the max|h| spike that stays (detector maxabs_spike)
    assert [(e.site, e.detail["rule"]) for e in events] == [
        ("moe/layer01/expert002", "activations"),
        ("moe/layer01/expert002", "maxabs"),
    ]
    for ev in events:
        assert ev.detail["rank_votes"] == (None if ranks_see_it else [0, 2])
        assert ev.decision == (CLAMP if ranks_see_it else WARN)
        if not ranks_see_it:
            assert "not seen on the ranks: 0 of the 2" in ev.detail["reason"]
    assert len(clips) == (1 if ranks_see_it else 0)


def excursion(layer: int, expert: int, start: int, peak: float, weights_from: int = -1):
    """An expert's activations climb x1.3 a step from `start` and stay at `peak` x (a healthy
    excursion: the through-agent run's blowup@135, act_rms 8.6x, max|h| 6.1x); from
    `weights_from` on (when >= 0) its parameter norm grows x1.1 a step as well."""

    def f(step, v):
        if step >= start:
            g = min(1.3 ** (step - start + 1), peak)
            for stat in ("act_rms", "act_maxabs", "out_norm"):
                v[f"moe/layer{layer:02d}/expert{expert:03d}/{stat}"] *= g
        name = f"params/layer{layer:02d}/expert{expert:03d}/fro_norm"
        if 0 <= weights_from <= step and name in v:  # measured every PARAM_EVERY steps
            v[name] *= 1.1 ** (step - weights_from + 1)

    return f


@pytest.mark.parametrize("weights_from", [-1, 72])
def test_activation_growth_its_weights_do_not_show_waits_for_them(weights_from):
    """Activations 8x above their reference while the expert's measured weights do not grow:
    an event that warns and clamps nothing (the through-agent false clamp). When the weights
    then grow, a second event (rule weights, confirming the first) clamps."""
    site = "moe/layer01/expert002"
    syn = SyntheticRun(seed=3)
    syn.faults.append(excursion(1, 2, start=50, peak=8.0, weights_from=weights_from))
    det, policy, events, clips = DetectorSet(), ClipPolicy(), [], []
    for s in range(110):
        evs = det.observe(syn.frame(s), syn.index)
        events += [e for e in evs if e.kind == BLOWUP]
        clips += [(s, c) for c in policy.step(s, evs)]
    first = events[0]
    assert (first.site, first.detail["rule"], first.decision) == (site, "activations", WARN)
    assert first.detail["weights_agree"] is False and 57 <= first.step <= 62
    assert "weights do not show (last period x1.0" in first.detail["reason"]
    if weights_from < 0:
        assert events == [first] and clips == []
        return
    # weights x1.1 a step from 72: the measurement at 80 sees 1.1^9 beyond the layer's
    (_, second) = events
    assert (second.site, second.detail["rule"], second.decision) == (site, "weights", CLAMP)
    assert second.step == 80 and second.detail["confirms"] == first.step
    assert [s for s, _ in clips] == [80]
    assert second.detail["incident"] == first.detail["incident"]


def test_a_held_alarm_survives_a_restart():
    """Restarted while the activations' event waits for the weights (state through the
    store's codec): the restored detectors raise the same confirming event at 80."""
    from analytics import state

    def run(det, steps, syn):
        return [e for s in steps for e in det.observe(syn.frame(s), syn.index)]

    def synthetic():  # its noise is drawn step by step: one instance per whole run
        syn = SyntheticRun(seed=3)
        syn.faults.append(excursion(1, 2, start=50, peak=8.0, weights_from=72))
        return syn

    straight = run(DetectorSet(), range(100), synthetic())
    syn, first = synthetic(), DetectorSet()
    events = run(first, range(66), syn)
    again = DetectorSet()
    again.load_state_dict(state.decode(state.encode(first.state_dict())))
    events += run(again, range(66, 100), syn)
    assert [e.detail.get("confirms") for e in straight if e.kind == BLOWUP][-1] is not None
    assert events == straight


def test_activation_growth_the_weights_cannot_judge_still_clamps():
    """No parameter norms in the run (hooks' param_norm_every off): the weights cannot
    speak, so activation growth is judged by the activations as before."""
    syn = SyntheticRun(seed=3)
    syn.faults.append(excursion(1, 2, start=50, peak=8.0))
    names = [n for n in syn.index.names if n.startswith("params/")]

    def no_params(step, v):
        for n in names:
            v.pop(n, None)

    syn.faults.append(no_params)
    det, events = DetectorSet(), []
    for s in range(80):
        events += [e for e in det.observe(syn.frame(s), syn.index) if e.kind == BLOWUP]
    (ev,) = events
    assert ev.detail["rule"] == "activations" and ev.detail["weights_agree"] is None
    assert ev.decision == CLAMP
