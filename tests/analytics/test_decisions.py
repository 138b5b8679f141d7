"""The decision layer and incidents: only sustained, localized growth that no learning-rate
change explains is marked `clamp`; transients and global causes warn; events are linked into
incidents by site and time, each with its own origin, and unrelated anomalies stay apart."""

from __future__ import annotations

import copy
import re

import pytest

from analytics.decisions import Decider
from analytics.events import (
    BLOWUP,
    BLOWUP_RECOVERED,
    CLAMP,
    EXPERT_DEATH,
    EXPERT_STARVED,
    GRAD_SPIKE,
    INFO,
    LOSS_SPIKE,
    LR_CHANGE,
    MAXABS_SPIKE,
    NONFINITE,
    WARN,
    make_event,
)
from analytics.incidents import summarize


def ev(kind, step, site, onset=None, severity="warning", **detail):
    m = re.search(r"layer(\d+)", site)
    detail.setdefault("layer", int(m.group(1)) if m else -1)
    return make_event(
        kind, "r", step, site, 1.0, 1.0, severity, step if onset is None else onset, **detail
    )


def growth(step, site="moe/layer04/expert003", onset=None, **kw):
    d = {
        "sustained": True,
        "localized": True,
        "confidence": 1.0,
        "rule": "weights",
        "clip_site": "routed",
        "expert": int(site[-3:]),
    }
    d.update(kw)
    return ev(BLOWUP, step, site, onset, **d)


def decide(events, decider=None):
    decider = decider or Decider()
    out = []
    for step in sorted({e.step for e in events}):
        out += decider.decide(step, [e for e in events if e.step == step])
    return out


def test_only_sustained_localized_believed_growth_clamps():
    out = decide(
        [
            growth(10),
            growth(11, "moe/layer05/expert001", localized=False, growing_sites=9),
            growth(12, "moe/layer06/expert002", sustained=False),
            growth(13, "moe/layer07/expert004", confidence=0.2),
            ev(MAXABS_SPIKE, 14, "moe/layer02/expert001", clip_site="routed", expert=1),
            ev(NONFINITE, 15, "resid/layer03", severity="critical"),
            ev(BLOWUP_RECOVERED, 40, "moe/layer04/expert003", severity="info"),
        ]
    )
    assert [e.decision for e in out] == [CLAMP, WARN, WARN, WARN, WARN, WARN, INFO]
    reasons = [e.detail["reason"] for e in out]
    assert "not localized: 9 experts" in reasons[1] and "not sustained" in reasons[2]
    assert "confidence 0.20" in reasons[3] and reasons[4].startswith("transient")


def test_growth_after_a_learning_rate_change_never_clamps():
    d = Decider()
    events = [ev(LR_CHANGE, 100, "train/lr"), ev(LOSS_SPIKE, 101, "train/loss")]
    # weights date growth to their measurement period: onset 91 still follows the change
    events += [growth(110, f"moe/layer0{l}/expert00{l}", onset=91) for l in (1, 2, 3)]
    events += [growth(200, "moe/layer04/expert003", onset=160)]  # long after: judged anew
    out = decide(events, d)
    assert [e.decision for e in out[2:5]] == [WARN] * 3
    assert all("learning-rate change at step 100" in e.detail["reason"] for e in out[2:5])
    assert out[5].decision == CLAMP
    (lr_inc, late) = sorted(summarize(out), key=lambda i: i.first_step)
    assert lr_inc.origin.kind == LR_CHANGE and lr_inc.cause == "learning rate"
    assert len(lr_inc.events) == 5 and not lr_inc.clamped  # all layers' growth is its symptom
    assert late.origin.site == "moe/layer04/expert003" and late.clamped


def test_a_blowup_and_its_consequences_are_one_incident_unrelated_ones_stay_apart():
    events = [
        ev(EXPERT_DEATH, 200, "moe/layer07/expert003", onset=6, expert=3),  # since step 6
        # starved since step 11 in the blow-up's layer, reported after it: a condition apart
        ev(EXPERT_STARVED, 210, "moe/layer08/expert004", onset=11, expert=4),
        ev(GRAD_SPIKE, 25, "grad/global_norm"),  # early noise, far from everything
        growth(160, "moe/layer08/expert001", onset=151),
        ev(MAXABS_SPIKE, 163, "moe/layer08/expert001", onset=155, clip_site="routed", expert=1),
        ev(GRAD_SPIKE, 164, "grad/global_norm"),
        ev(LOSS_SPIKE, 165, "train/loss"),
        ev(NONFINITE, 170, "resid/layer08", severity="critical"),
    ]
    out = decide(sorted(events, key=lambda e: e.step))
    incidents = summarize(out)
    assert len(incidents) == 4
    head = incidents[0]  # critical (the NaN), and it moved a clamp: the headline
    assert head.origin.site == "moe/layer08/expert001" and head.origin.onset_step == 151
    assert head.severity == "critical" and head.clamped and head.cause == "activation growth"
    assert {e.kind for e in head.events} == {
        BLOWUP,
        MAXABS_SPIKE,
        GRAD_SPIKE,
        LOSS_SPIKE,
        NONFINITE,
    }
    others = {i.origin.kind: i for i in incidents[1:]}
    assert set(others) == {EXPERT_DEATH, EXPERT_STARVED, GRAD_SPIKE}
    assert others[EXPERT_STARVED].first_step == 11 and len(others[EXPERT_STARVED].events) == 1
    assert others[EXPERT_DEATH].first_step == 6 and len(others[EXPERT_DEATH].events) == 1
    assert others[GRAD_SPIKE].first_step == 25
    d = head.to_dict()
    assert (
        d["origin"]["site"] == "moe/layer08/expert001" and "began at step 151" in d["explanation"]
    )


def test_growth_dated_after_the_gradient_spike_it_caused_is_still_the_origin():
    """Weights date growth to their measurement period (onset 35 for growth that began by
    step 30); the gradient spike it caused (step 33) opened the incident first. The origin is
    the expert, not the gradient norm; a spike more than ONSET_SLACK (10) steps before the
    growth's onset keeps the origin."""
    for spike, origin_site in ((33, "moe/layer04/expert003"), (24, "grad/global_norm")):
        out = decide([ev(GRAD_SPIKE, spike, "grad/global_norm"), growth(40, onset=35)])
        (inc,) = summarize(out)
        assert inc.origin.site == origin_site, spike
        assert [e.decision for e in out] == [WARN, CLAMP] and inc.clamped
    (inc,) = summarize(decide([ev(GRAD_SPIKE, 33, "grad/global_norm"), growth(40, onset=35)]))
    assert inc.cause == "activation growth" and inc.first_step == 35


def test_stored_incident_ids_rebuild_the_same_incidents_and_old_events_are_linked():
    events = [
        growth(60),
        ev(GRAD_SPIKE, 62, "grad/global_norm"),
        growth(300, "moe/layer01/expert002"),
    ]
    out = decide(events)
    assert [e.incident for e in out] == [0, 0, 1]
    a = [(i.id, i.origin.site, len(i.events)) for i in summarize(out)]
    b = [(i.id, i.origin.site, len(i.events)) for i in summarize(events)]  # no ids: linked here
    assert a == b == [(0, "moe/layer04/expert003", 2), (1, "moe/layer01/expert002", 1)]


def test_decider_state_survives_a_restart():
    events = [
        ev(LR_CHANGE, 100, "train/lr"),
        growth(110, onset=91),
        growth(111, "moe/layer02/expert001"),
    ]
    straight = decide(events)
    first = Decider()
    part = decide(events[:1], first)
    again = Decider()
    again.load_state_dict(copy.deepcopy(first.state_dict()))
    assert part + decide(events[1:], again) == straight
    with pytest.raises(ValueError):
        Decider(min_confidence=2)
