"""Localized blow-up: one expert's sustained growth, from its weights and from its activations.

Step 3.5 Flash (StepFun, 2026, section 4.1, Fig. 4, appendix B) traces its loss spikes to a few
routed experts whose SwiGLU activations grow by orders of magnitude while the rest of their
layer stays put. Such an expert grows because its weights grow, so its parameter norm is
evidence that does not depend on how many tokens it gets: an expert starved by the router
while its up-projection grows has no activation to look at, but its norm grows all the same.
Every expert is judged, however few tokens it gets. Two rules, each sustained by construction:

weights (every K steps, when params/.../fro_norm arrives). Training moves all experts of a
  layer together, so the statistic is the expert's log growth since the previous measurement
  minus the layer's median log growth (r). A one-sided CUSUM (Page, "Continuous inspection
  schemes", Biometrika 1954) accumulates the excess over a healthy allowance,
  C = max(0, C + r - ln(allowance)), and fires at C >= ln(growth). Weights integrate their
  updates, so growth seen across a whole period is not a transient. On clean runs (tiny: 4
  seeds, demo: 8 seeds, 300 steps; benchmarks/detection.py) one period reached 1.147x relative
  growth and the CUSUM at most 1.091x; allowance 1.06 and growth 1.12 fire on one period of
  relative growth >= 1.19 (or on a run of smaller ones above 1.06) and never on them.
  Delay bound: an up-projection growing x rho per step makes the norm of [W_gate; W_up; W_down]
  (equal shares at init) grow by g(n) = sqrt((2 + rho^(2n)) / 3) over n steps. The rule fires at
  the first measurement with g(n) >= 1.19, n counted from the onset: n >= 3 at x1.2, 5 at x1.1,
  8 at x1.05. With K = 10 the delay is n - 1 steps when the onset falls at least n - 1 steps
  before a measurement, and at most K + n - 1 (x1.2: 12, x1.1: 14, x1.05: 17) otherwise.
activations (every step, an expert that got tokens; a shared expert too). act_rms and
  act_maxabs over the layer's median (the shared expert's over the routed median), in log,
  against the median of the same expert's last `window` values that ended `lag` steps ago: a
  reference that a growth younger than `lag` steps has not touched, and that needs more than
  window / 2 grown values (the median's breakdown point) to move. Fires when both are >=
  `runaway` x the larger of that reference and the layer's median on `runaway_steps`
  consecutive steps (the layer's median being the larger of today's and its median over the
  last `window` steps: when the router sends nearly every token to one or two experts, the
  median of the rest - a token or two each, and (before act_rms reduced as mean_nonzero) a
  mean over ranks that counted a rank that routed an expert nothing as 0 - halves or drops 5x
  from one step to the next, and a
  steady expert crossed `runaway` against it: the tiny preset's through-agent run, act_rms
  0.12 over a median of 0.013 at step 134, of 0.07 at step 136; a blow-up of one expert
  does not lower its layer's median, so it is judged as before): a blow-up is growth beyond the layer's scale, and an expert climbing from
  far below its layer's median up to it is coming back (from starvation, or specialising), not
  blowing up - on clean demo runs such experts rose 6-16x against their own reference. Young
  models also move experts by 4x against their layer within a few steps, so `runaway` sits at
  6: this rule answers growth that outruns the weight measurements, never the first 3x. Delay bound at x rho per step: ln(6) / ln(rho) + 1 steps
  (x1.2: 11, x1.1: 20) while the optimizer does not slow the growth down.

The event (kind blowup, one per expert and episode; a second, rule weights with `confirms`, when
the weights take up growth the activations raised while they did not agree) names the expert,
the rule that fired, whether its weights agree (`weights_agree`: measured and grown beyond the
allowance, C > 0; None where they cannot speak - a shared expert, a run without parameter
norms - and the activations then decide alone), its
confidence (the share of the channels weights / act_rms / act_maxabs that could be read and
agree: a channel agrees at >= `agree` x its reference, the weights at C > 0) and the evidence,
whether the growth is localized (at most `max_sites` experts of the model growing at once) and
the layer's healthy max|h| for the clip policy. Its onset is the earliest evidence: the
measurement before the weights' first growing period, or the first step of the activations'
unbroken run above `rise` x reference, whichever came first (the weights date it to the step after
the last measurement before growth was seen). Steps in alarm stay out of the
reference; the expert recovers (blowup_recovered) after `clear_steps` steps with its weights
not growing and its activations below `clear` x reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analytics.catalog import MetricIndex, site_of
from analytics.detectors.base import Detector, check_positive, fit_state
from analytics.events import BLOWUP, BLOWUP_RECOVERED, Event, make_event
from analytics.frame import StepFrame
from analytics.rolling import Rolling, nanmedian

CHANNELS = ("act_rms", "act_maxabs")  # activation channels, in this order
RANK_FACTOR = 3.0  # a rank sees an expert's growth at max|h| >= this x its own layer median


def rank_votes(frame: StepFrame, index: MetricIndex, row: int, col: int) -> list[int] | None:
    """[ranks whose own act_maxabs of the expert (column E: the layer's shared one) is
    >= RANK_FACTOR x their own layer median, ranks that fed it], from the ranks' raw values,
    when fewer than half of them see it (the decision layer then warns: the reduced max of one
    rank's outlier over another rank's median is no expert's growth); None when they do, or
    with fewer than two ranks' values (a one-rank run's reduced values are its own)."""
    if len(frame.rank_values()) < 2:
        return None
    tok_ids = index.expert_grid("moe/", "tokens")[row]
    x_ids = index.expert_grid("moe/", "act_maxabs")[row]
    shared = col == x_ids.size
    own_id = int(index.shared_ids("act_maxabs")[row]) if shared else int(x_ids[col])
    n_e = x_ids.size
    # one gather of the few ids asked, every rank at once (not one dense vector per rank)
    _, m = frame.rank_matrix(np.concatenate([tok_ids, x_ids, [own_id]]))
    tok, x, own = m[:, : tok_ids.size], m[:, tok_ids.size : tok_ids.size + n_e], m[:, -1]
    if tok.shape[1] < n_e:  # fewer token counts than experts: the missing ones unknown
        tok = np.pad(tok, ((0, 0), (0, n_e - tok.shape[1])), constant_values=np.nan)
    tok = tok[:, :n_e]
    with np.errstate(invalid="ignore"):
        on = np.isfinite(tok) & (tok > 0) & np.isfinite(x) & (x > 0)
    votes = on.any(axis=1) & np.isfinite(own)  # ranks that fed the layer and sent the site
    if not shared:
        votes &= on[:, col]  # and fed this expert
    fed = int(votes.sum())
    if not fed:
        return None
    xs = np.where(on[votes], x[votes], np.nan)
    agree = int((own[votes] >= RANK_FACTOR * np.nanmedian(xs, axis=1)).sum())
    return [agree, fed] if 2 * agree < fed else None


@dataclass
class ExpertBlowup(Detector):
    allowance: float = 1.06
    """Weights: relative growth per measurement period that healthy training may show."""

    growth: float = 1.12
    """Weights: fire when the CUSUM of relative growth beyond the allowance reaches this factor."""

    runaway: float = 6.0
    """Activations: fire when act_rms and act_maxabs reach this x their lagged reference ..."""

    runaway_steps: int = 2
    """... on this many consecutive steps with tokens."""

    window: int = 40
    """Steps with tokens in an expert's activation reference."""

    lag: int = 5
    """The reference ends this many steps before the step judged."""

    min_history: int = 32
    """Reference values needed before the activations of an expert are judged: it was fed on
    most steps of its window (a starved expert's activations say nothing; its weights do)."""

    agree: float = 1.3
    """An activation channel agrees (confidence) at this x its reference."""

    rise: float = 1.3
    """Onset: the first step of the unbroken run of act_maxabs above this x reference."""

    max_sites: int = 3
    """Localized: at most this many experts of the model grow at once."""

    clear: float = 2.0
    """Recovered: activations below this x reference (and the weights not growing) ..."""

    clear_steps: int = 10
    """... for this many consecutive steps."""

    _delay: Rolling | None = field(default=None, repr=False)  # [C, L, E+1] last `lag` values
    _ref: Rolling | None = field(default=None, repr=False)  # [C, L, E+1] the reference window
    _streak: np.ndarray | None = field(default=None, repr=False)  # [L, E+1] runaway steps
    _rising: np.ndarray | None = field(default=None, repr=False)  # [L, E+1] run start or -1
    _alarm: np.ndarray | None = field(default=None, repr=False)  # [L, E+1] fired step or -1
    _calm: np.ndarray | None = field(default=None, repr=False)  # [L, E+1]
    _p_last: np.ndarray | None = field(default=None, repr=False)  # [L, E] log norm
    _cusum: np.ndarray | None = field(default=None, repr=False)  # [L, E]
    _w_onset: np.ndarray | None = field(default=None, repr=False)  # [L, E] or -1
    _w_rel: np.ndarray | None = field(default=None, repr=False)  # [L, E] last period's r
    _held: np.ndarray | None = field(default=None, repr=False)  # [L, E+1] alarms the weights
    # did not agree with when the activations raised them (a clamp waits for the weights)
    _p_step: int = field(default=-1, repr=False)  # last measurement
    _scale: Rolling | None = field(default=None, repr=False)  # [C, L] layer log medians
    kind = BLOWUP

    def __post_init__(self) -> None:
        check_positive(self, "allowance", "growth", "runaway", "agree", "rise", "clear")
        check_positive(self, "runaway_steps", "window", "lag", "min_history", integer=True)
        check_positive(self, "max_sites", "clear_steps", integer=True)
        if self.min_history > self.window:
            raise ValueError("ExpertBlowup.min_history must be <= window")
        if not 1 < self.rise <= self.clear < self.runaway:
            raise ValueError("ExpertBlowup needs 1 < rise <= clear < runaway")
        if not 1 < self.allowance < self.allowance * self.growth:
            raise ValueError("ExpertBlowup needs allowance > 1 and growth > 1")

    # ---- the two rules ------------------------------------------------------------------
    def _activations(self, frame: StepFrame, index: MetricIndex):
        """(log layer-relative channels [C, L, E+1], seen [L, E+1] (had tokens, finite), log
        layer scale of act_maxabs [L], this step's log layer medians [C, L] for `_scale`);
        column E is the layer's shared expert. The layer's scale is the larger of its median
        today and its median over the last `window` steps."""
        assert self._ref is not None and self._alarm is not None
        assert self._scale is not None
        tok = frame.take(index.expert_grid("moe/", "tokens"))
        fed = np.isfinite(tok) & (tok > 0)
        xs, meds = [], []
        for stat in CHANNELS:
            x = np.where(fed, frame.take(index.expert_grid("moe/", stat)), np.nan)
            xs.append(np.concatenate([x, frame.take(index.shared_ids(stat))[:, None]], axis=1))
            meds.append(nanmedian(np.where(x > 0, x, np.nan), axis=1))  # [L]
        with np.errstate(invalid="ignore", divide="ignore"):
            lmed_now = np.log(np.stack(meds))  # [C, L]
            usual = self._scale.median()  # the layer's scale over the last `window` steps
            # a median that fell below the layer's usual scale lost its experts' tokens, not
            # its scale: judge against the larger (see `ExpertBlowup` on the layer's median)
            lmed = np.where(np.isfinite(usual), np.fmax(lmed_now, usual), lmed_now)
            full = np.stack(xs)
            lx = np.log(np.where(full > 0, full, np.nan)) - lmed[:, :, None]
        has_shared = (index.shared_ids(CHANNELS[0]) >= 0)[:, None]
        seen = np.concatenate([fed, has_shared], axis=1) & np.isfinite(lx).all(axis=0)
        return lx, seen, lmed[1], lmed_now

    def _reference(self, lx: np.ndarray, judged: np.ndarray) -> np.ndarray:
        """The lagged reference [C, L, E+1] (log), computed where it can matter: a site whose
        channels all sit below `agree` x the smallest value of their window is below `agree` x
        its median too (the sort is the whole cost)."""
        assert self._ref is not None and self._alarm is not None
        with np.errstate(invalid="ignore"):
            lo = self._ref.min()  # the window holds logs
            need = (judged & ((lx - lo) >= np.log(self.agree)).any(axis=0)) | (self._alarm >= 0)
        return self._ref.median(np.broadcast_to(need, lx.shape))

    def _weights(self, frame: StepFrame, index: MetricIndex) -> None:
        """On a step with parameter norms: each expert's log growth since the previous
        measurement over its layer's median growth (r), into the CUSUM."""
        assert self._cusum is not None and self._p_last is not None and self._w_onset is not None
        assert self._w_rel is not None
        ids = index.expert_grid("params/", "fro_norm")
        if ids.shape != self._cusum.shape:
            return
        p = frame.take(ids)
        if not np.isfinite(p).any():
            return
        with np.errstate(invalid="ignore", divide="ignore"):
            lp = np.log(np.where(p > 0, p, np.nan))
        g = lp - self._p_last
        r: np.ndarray = g - nanmedian(g, axis=1)[:, None]
        ok = np.isfinite(r)
        new = np.maximum(0.0, self._cusum + np.where(ok, r, 0.0) - np.log(self.allowance))
        onset = np.where((self._cusum <= 0) & (new > 0), self._p_step + 1, self._w_onset)
        self._w_onset = np.where(ok, np.where(new > 0, onset, -1), self._w_onset)
        self._cusum = np.where(ok, new, self._cusum)
        self._w_rel = np.where(ok, r, self._w_rel)
        self._p_last = np.where(np.isfinite(lp), lp, self._p_last)
        self._p_step = frame.step

    # ---- a step ---------------------------------------------------------------------------
    def observe(self, frame: StepFrame, index: MetricIndex) -> list[Event]:
        grid = index.expert_grid("moe/", "act_maxabs")
        if grid.size == 0 or index.expert_grid("moe/", "act_rms").shape != grid.shape:
            return []
        L, E = grid.shape
        shape, C = (L, E + 1), len(CHANNELS)
        if self._ref is None or self._ref.shape != (C, *shape):
            self._ref = Rolling((C, *shape), self.window)
            self._delay = Rolling((C, *shape), self.lag)
        if self._scale is None or self._scale.shape != (C, L):
            self._scale = Rolling((C, L), self.window)
        assert self._delay is not None
        self._streak = fit_state(self._streak, shape, 0, np.int64)
        self._rising = fit_state(self._rising, shape, -1, np.int64)
        self._alarm = fit_state(self._alarm, shape, -1, np.int64)
        self._calm = fit_state(self._calm, shape, 0, np.int64)
        self._p_last = fit_state(self._p_last, (L, E), np.nan)
        self._cusum = fit_state(self._cusum, (L, E), 0.0)
        self._w_onset = fit_state(self._w_onset, (L, E), -1, np.int64)
        self._w_rel = fit_state(self._w_rel, (L, E), np.nan)
        self._held = fit_state(self._held, shape, False, bool)

        lx, seen, lmed, lmed_now = self._activations(frame, index)
        self._scale.push(lmed_now)
        judged = seen & (self._ref.count() >= self.min_history).all(axis=0)
        ref = self._reference(lx, judged)
        d = lx - ref  # log growth against the reference, [C, L, E+1]
        with np.errstate(invalid="ignore"):
            above = lx - np.fmax(ref, 0.0)  # ... and against the layer median (0 in log)
            run = judged & (above >= np.log(self.runaway)).all(axis=0)
            up = judged & (d[1] >= np.log(self.rise))
            calm_act = ~judged | (d < np.log(self.clear)).all(axis=0)
        self._streak = np.where(run, self._streak + 1, np.where(judged, 0, self._streak))
        start = np.where(self._rising < 0, frame.step, self._rising)
        self._rising = np.where(up, start, np.where(judged, -1, self._rising))
        self._weights(frame, index)

        pad = np.zeros((L, 1), bool)
        w_fire = np.concatenate([self._cusum >= np.log(self.growth), pad], axis=1)
        a_fire = self._streak >= self.runaway_steps
        n_growing = int((w_fire | a_fire).sum())  # localized: few experts grow at once
        fire = (w_fire | a_fire) & (self._alarm < 0)
        # an alarm the activations raised while the weights did not agree, now confirmed
        confirm = w_fire & self._held & (self._alarm >= 0)
        events = [
            self._event(
                frame,
                index,
                int(r),
                int(c),
                "weights" if w_fire[r, c] else "activations",
                d,
                ref,
                lmed,
                n_growing,
                confirms=int(self._alarm[r, c]) if confirm[r, c] else None,
            )
            for r, c in zip(*np.nonzero(fire | confirm))
        ]
        # weights that were measured and show no growth beyond the allowance disagree
        w_flat = np.concatenate([np.isfinite(self._w_rel) & (self._cusum <= 0), pad], axis=1)
        held = fire & ~w_fire & w_flat
        in_alarm = self._alarm >= 0
        calm = in_alarm & calm_act & np.concatenate([self._cusum <= 0, ~pad], axis=1)
        self._calm = np.where(calm, self._calm + 1, np.where(in_alarm, 0, self._calm))
        done = in_alarm & (self._calm >= self.clear_steps)
        events += [self._recovered(frame, index, int(r), int(c)) for r, c in zip(*np.nonzero(done))]
        self._held = (self._held | held) & ~confirm & ~done
        self._alarm = np.where(fire, frame.step, np.where(done, -1, self._alarm))
        self._calm = np.where(fire | done, 0, self._calm)
        self._streak = np.where(done, 0, self._streak)

        # the reference learns from healthy steps only, `lag` steps late
        self._ref.push(self._delay.oldest())
        self._delay.push(np.where(self._alarm < 0, lx, np.nan), np.broadcast_to(seen, lx.shape))
        return events

    # ---- events -----------------------------------------------------------------------------
    def _site(self, index: MetricIndex, row: int, col: int) -> tuple[str, bool]:
        E = index.expert_grid("moe/", "act_maxabs").shape[1]
        shared = col == E
        ids = index.shared_ids("act_maxabs") if shared else index.expert_grid("moe/", "act_maxabs")
        return site_of(index.names[int(ids[row] if shared else ids[row, col])]), shared

    def _event(self, frame, index, row, col, rule, d, ref, lmed, n_growing, confirms=None) -> Event:
        assert self._ref is not None and self._alarm is not None and self._cusum is not None
        assert self._w_rel is not None and self._w_onset is not None and self._rising is not None
        site, shared = self._site(index, row, col)
        evidence: list[dict[str, Any]] = []
        if not shared and np.isfinite(self._w_rel[row, col]):
            evidence.append(
                {
                    "channel": "weights",
                    "value": float(np.exp(self._cusum[row, col])),
                    "reference": self.allowance,
                    "period_growth": float(np.exp(self._w_rel[row, col])),
                    "agrees": bool(self._cusum[row, col] > 0),
                }
            )
        for c, stat in enumerate(CHANNELS):
            if np.isfinite(d[c, row, col]):
                evidence.append(
                    {
                        "channel": stat,
                        "value": float(np.exp(d[c, row, col])),
                        "reference": float(np.exp(ref[c, row, col])),
                        "agrees": bool(d[c, row, col] >= np.log(self.agree)),
                    }
                )
        # onset: the weights date growth to a measurement period, the activations (when they
        # rose inside that period) to a step
        w_on = int(self._w_onset[row, col]) if not shared else -1
        a_on = int(self._rising[row, col])
        onsets = [frame.step] + [o for o in (w_on, a_on) if o >= 0]
        if 0 <= w_on <= a_on:
            onsets = [a_on]
        # the healthy max|h| a clamp must leave alone: the layer's other routed experts not in
        # alarm (a shared expert: its own), their reference at the layer's scale of today
        E = self._cusum.shape[1]
        mask = np.zeros(self._ref.shape, bool)
        mask[1, row] = True
        base = np.exp(self._ref.median(mask)[1, row] + lmed[row])
        pick = np.zeros(E + 1, bool)
        if shared:
            pick[E] = True
        else:
            pick[:E] = True
            pick[col] = False
        ok = pick & np.isfinite(base) & (self._alarm[row] < 0)
        weights = rule == "weights"
        # the weights' say on activation growth: None where they cannot speak (a shared
        # expert, a run without parameter norms, no measurement yet)
        w_known = not shared and bool(np.isfinite(self._w_rel[row, col]))
        extra: dict[str, Any] = {
            "weights_agree": bool(self._cusum[row, col] > 0) if w_known else None
        }
        if confirms is not None:
            extra["confirms"] = confirms
        return make_event(
            BLOWUP,
            frame.run,
            frame.step,
            site,
            value=float(
                np.exp(
                    self._cusum[row, col]
                    if weights
                    else d[1, row, col] + ref[1, row, col] - max(ref[1, row, col], 0.0)
                )
            ),
            threshold=self.growth if weights else self.runaway,
            severity="warning",
            onset_step=min(onsets),
            layer=index.moe_layers[row],
            expert=-1 if shared else col,
            clip_site="shared" if shared else "routed",
            rule=rule,
            rank_votes=None if weights else rank_votes(frame, index, row, col),
            sustained=True,
            localized=n_growing <= self.max_sites,
            growing_sites=n_growing,
            confidence=sum(bool(e["agrees"]) for e in evidence) / len(evidence)
            if evidence
            else 1.0,
            evidence=evidence,
            layer_baseline_maxabs=float(base[ok].max()) if ok.any() else float("nan"),
            **extra,
        )

    def _recovered(self, frame: StepFrame, index: MetricIndex, row: int, col: int) -> Event:
        assert self._alarm is not None
        site, shared = self._site(index, row, col)
        return make_event(
            BLOWUP_RECOVERED,
            frame.run,
            frame.step,
            site,
            value=float(self.clear_steps),
            threshold=self.clear,
            severity="info",
            onset_step=int(self._alarm[row, col]),
            layer=index.moe_layers[row],
            expert=-1 if shared else col,
            clip_site="shared" if shared else "routed",
            of=BLOWUP,
            calm_steps=self.clear_steps,
        )
