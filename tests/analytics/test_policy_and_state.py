"""The clip policy's thresholds, relaxation and operator overrides; detectors and policy
survive a restart through state_dict (same events as an uninterrupted run)."""

from __future__ import annotations

import copy
import math

import pytest

from analytics.clip_policy import ClipPolicy
from analytics.detectors import DetectorSet
from analytics.events import BLOWUP, BLOWUP_RECOVERED, CLAMP, make_event
from tests.analytics.synthetic import SyntheticRun, blowup, death


def trigger(step, layer=3, site="routed", base=4.0, name="moe/layer03/expert001", decision=CLAMP):
    """A blow-up event as the decision layer hands it on (decision "clamp" by default)."""
    return make_event(
        BLOWUP,
        "r",
        step,
        name,
        50.0,
        20.0,
        "warning",
        step,
        layer=layer,
        clip_site=site,
        layer_baseline_maxabs=base,
        decision=decision,
    )


def recovered(step, layer=3, site="routed", name="moe/layer03/expert001"):
    return make_event(
        BLOWUP_RECOVERED,
        "r",
        step,
        name,
        1.0,
        2.0,
        "info",
        max(0, step - 10),
        layer=layer,
        clip_site=site,
        of=BLOWUP,
    )


def test_limit_sits_margin_above_the_healthy_scale_with_a_floor():
    p = ClipPolicy(margin=4.0, floor=1.0)
    (d,) = p.step(10, [trigger(10, base=9.0)])
    assert (d.layer, d.site, d.limit, d.step) == (3, "routed", 6.0, 10)  # sqrt(4 * 9)
    assert d.reason == "blowup@10 moe/layer03/expert001" and d.event.step == 10
    (d,) = ClipPolicy(floor=1.0).step(10, [trigger(10, base=0.01)])
    assert d.limit == 1.0  # the floor
    (d,) = ClipPolicy().step(10, [trigger(10, base=float("nan"))])
    assert d.limit == 1.0  # no baseline


def test_one_decision_per_site_and_a_second_trigger_tightens():
    p = ClipPolicy()
    ds = p.step(
        5,
        [
            trigger(5),
            trigger(5, name="moe/layer03/expert002"),
            trigger(5, site="shared", name="moe/layer03/shared"),
        ],
    )
    assert sorted((d.layer, d.site) for d in ds) == [(3, "routed"), (3, "shared")]
    assert p.step(6, [trigger(6)]) == []  # the same site again while clamped at 4.0?
    (d,) = p.step(7, [trigger(7, name="moe/layer03/expert005")])
    assert d.limit == pytest.approx(2.0)  # still blowing up under the clamp: halve


def test_relax_after_every_trigger_recovered_and_the_window_passed():
    p = ClipPolicy(relax_after=20)
    p.step(10, [trigger(10), trigger(10, name="moe/layer03/expert002")])
    assert p.step(30, [recovered(30)]) == []  # expert002 still in alarm
    assert p.step(35, [recovered(35, name="moe/layer03/expert002")]) == []
    assert p.step(54, []) == []
    (d,) = p.step(55, [])
    assert d.limit == math.inf and d.reason.startswith("relax:") and p.limits() == {}


def test_frozen_and_operator_set_sites_are_left_alone():
    p = ClipPolicy(relax_after=5)
    p.freeze(3, "routed")
    assert p.step(1, [trigger(1)]) == []
    p.unfreeze(3, "routed")
    assert len(p.step(2, [trigger(2, name="moe/layer03/expert009")])) == 1
    p.operator_set(4, "shared", 2.5)
    assert p.step(3, [trigger(3, layer=4, site="shared")]) == []
    assert p.limits()[(4, "shared")] == 2.5 and (4, "shared") in p.frozen
    p.step(4, [recovered(4, layer=4, site="shared")])
    # never relax an operator's limit: every step for long past relax_after, the site calm
    # (max|h| far under the clamp, weights flat), the limit stays and no decision touches it
    for s in range(5, 300):
        calm = {(4, "shared"): 0.01}
        touched = [
            d
            for d in p.step(s, [], calm, {(4, "shared"): 1.0})
            if (d.layer, d.site) == (4, "shared")
        ]
        assert touched == [], f"step {s}: {touched}"
        assert p.limits()[(4, "shared")] == 2.5
    p.operator_clear(4, "shared")
    assert (4, "shared") not in p.limits() and (4, "shared") not in p.frozen
    with pytest.raises(ValueError):
        p.freeze(-1, "routed")
    with pytest.raises(ValueError):
        p.operator_set(1, "dense", 1.0)
    with pytest.raises(ValueError):
        ClipPolicy(margin=0)


def test_policy_state_round_trip():
    p = ClipPolicy(relax_after=10)
    p.step(1, [trigger(1)])
    p.freeze(2, "shared")
    p.step(5, [recovered(5)])
    q = ClipPolicy(relax_after=10)
    q.load_state_dict(copy.deepcopy(p.state_dict()))
    assert q.step(15, []) == p.step(15, []) and q.state_dict() == p.state_dict()


def test_detectors_resume_from_state_with_identical_events():
    def run_faulty():
        syn = SyntheticRun(seed=4)
        syn.faults += [blowup(2, 1, start=40), death(1, 6, start=30)]
        return syn

    full = DetectorSet()
    syn = run_faulty()
    straight = [e for s in range(90) for e in full.observe(syn.frame(s), syn.index)]
    assert {e.kind for e in straight} >= {"maxabs_spike", "expert_death"}

    first, syn = DetectorSet(), run_faulty()
    events = [e for s in range(45) for e in first.observe(syn.frame(s), syn.index)]
    resumed = DetectorSet()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))  # "after a restart"
    events += [e for s in range(45, 90) for e in resumed.observe(syn.frame(s), syn.index)]
    assert events == straight
    assert resumed.observe(syn.frame(10), syn.index) == []  # an old step: judged once


def test_a_clamp_that_still_binds_is_not_relaxed():
    """'Recovered' under a clamp may only mean the clamp holds a still-growing expert: while the
    site's max|h| sits at the clamp's bound L^2 the calm window restarts."""
    p = ClipPolicy(relax_after=20)
    (d,) = p.step(10, [trigger(10)])
    key, bound = (3, "routed"), d.limit**2
    assert p.clamped() == [key]
    p.step(30, [recovered(30)], {key: bound})  # held at the bound
    for s in range(31, 80):
        assert p.step(s, [], {key: 0.99 * bound}) == [], f"relaxed at {s} while binding"
    for s in range(80, 99):  # the expert really calmed down
        assert p.step(s, [], {key: 0.1 * bound}) == []
    (d,) = p.step(99, [], {key: 0.1 * bound})  # 20 calm steps after the last bind
    assert d.limit == math.inf and p.clamped() == []


def test_a_non_finite_clamped_site_counts_as_binding():
    p = ClipPolicy(relax_after=5)
    p.step(1, [trigger(1)])
    p.step(2, [recovered(2)])
    for s in range(3, 30):
        assert p.step(s, [], {(3, "routed"): math.nan}) == []


def test_weights_still_growing_under_the_clamp_block_relaxation():
    """A clamp on `up` alone leaves max|h| small while W_up keeps growing: the site's expert
    parameter norm (every K steps) growing past param_growth restarts the calm window."""
    p = ClipPolicy(relax_after=20, param_growth=0.25)
    p.step(10, [trigger(10)])
    key = (3, "routed")
    p.step(30, [recovered(30)], {key: 0.01}, {key: 10.0})  # reference norm 10
    norm = 10.0
    for s in range(31, 111):
        if s % 10 == 0:
            norm *= 1.5  # weights keep growing
        norms = {key: norm} if s % 10 == 0 else None
        assert p.step(s, [], {key: 0.01}, norms) == [], f"relaxed at {s} while growing"
    for s in range(111, 130):  # growth stopped: last restart at step 110
        assert p.step(s, [], {key: 0.01}, {key: norm} if s % 10 == 0 else None) == []
    (d,) = p.step(130, [], {key: 0.01})
    assert d.limit == math.inf
    state = p.state_dict()
    assert "norm_ref" in state


def test_binding_is_judged_on_the_experts_that_triggered_the_clamp():
    """The issue's clean run whose clamp never relaxed: the layer's healthy experts sit at about
    half the clamp's bound for good. Only the expert that triggered it is read, so once it is
    calm the clamp relaxes; while it sits at the bound, it does not."""
    import numpy as np

    from analytics.clip_policy import site_readings
    from analytics.frame import StepFrame
    from tests.analytics.synthetic import make_index

    index = make_index()

    def frame(step, trigger_maxabs):
        names = [f"moe/layer02/expert{e:03d}/act_maxabs" for e in range(8)]
        vals = [trigger_maxabs if e == 1 else 0.6 * bound for e in range(8)]  # healthy: half
        ids = np.array([index.find(n) for n in names])
        return StepFrame.from_rows("r", step, ids, np.array(vals), index.size)

    p = ClipPolicy(relax_after=20)
    (d,) = p.step(10, [trigger(10, layer=2, name="moe/layer02/expert001")])
    bound = d.limit**2
    assert p.watched() == {(2, "routed"): ["moe/layer02/expert001"]}
    p.step(12, [recovered(12, layer=2, name="moe/layer02/expert001")])
    for s in range(13, 60):  # the trigger held at the bound: never relaxed
        held, norms = site_readings(frame(s, 0.95 * bound), index, p.watched())
        assert held == {(2, "routed"): pytest.approx(0.95 * bound)} and norms == {}
        assert p.step(s, [], held, norms) == [], f"relaxed at {s} while binding"
    relaxed = []
    for s in range(60, 100):  # the trigger calm, its layer's healthy experts still at 0.6
        relaxed += p.step(s, [], *site_readings(frame(s, 0.1 * bound), index, p.watched()))
    assert [(d.step, d.limit) for d in relaxed] == [(79, math.inf)]  # 20 calm steps after 59
