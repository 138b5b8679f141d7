"""Per-site max |activation| spikes against a rolling robust baseline (localized blow-up).

Step 3.5 Flash (StepFun, 2026, Fig. 4 and appendix B) traces its loss spikes to a few routed
experts in the deep layers whose SwiGLU activations grow by orders of magnitude while the rest
of the layer stays put. A site is one routed expert (or a layer's shared expert); its
statistic is act_maxabs (max |h| of the SwiGLU intermediate, the clamp site's input).

Training moves every expert's scale together, so a routed expert is first normalised by its
layer (max|h|_e / median over the layer's fed experts), then compared with the rolling median
of that ratio over its own last `window` fed steps (a robust baseline: a few outliers do not
move it). The site is in alarm when the ratio reaches `factor` x baseline; experts fed less
than `min_share` of the uniform share are not judged (a handful of tokens gives a noisy max).
Shared experts see every token: their raw max|h| against its own median, `shared_factor`.
Its events are transient evidence (`sustained=False`): the decision layer makes them warnings.
A site still at `factor` x its baseline `sustain_steps` consecutive judged steps after its
spike did not come back: it raises one `blowup` event (rule "maxabs", sustained), which the
decision layer may clamp on - a jump of max|h| that stays (no clean run of the tiny or demo
preset held even the spike's threshold for one step). Delay: `sustain_steps` - 1 steps after
the spike.

Why `factor` = 12: over nine clean runs (tiny: 3 seeds x 150 steps; demo: 3 seeds x 100 and
3 x 60 steps) the statistic reached 8.4 at most - experts of young models do grow 8x against
their layer for a few steps - and 12 leaves a margin of 1.4. That margin sets the detection
floor: a blow-up growing by r per step is seen about ln(12)/ln(r) steps after it starts
(r ~ 1.2 per step for the injected `blowup` fault: 11-14 steps, less when it starts from an
expert that was already above its baseline). Steps in alarm stay out of the baseline, so a clamped but
still elevated site stays in alarm; it recovers (a `blowup_recovered` event, which lets the
clip policy relax) after `clear_steps` consecutive steps below `clear_factor` x baseline.
The event's onset is the first step of the unbroken run above `clear_factor` x baseline that
led to it: where the growth became visible, not where it crossed the alarm threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from analytics.catalog import MetricIndex, site_of
from analytics.detectors.base import Detector, check_positive, fit_state
from analytics.detectors.blowup import rank_votes
from analytics.detectors.expert_death import layer_shares
from analytics.events import BLOWUP, BLOWUP_RECOVERED, MAXABS_SPIKE, Event, make_event
from analytics.frame import StepFrame
from analytics.rolling import Rolling, nanmedian


@dataclass
class MaxAbsSpike(Detector):
    factor: float = 12.0
    """Alarm when a routed expert's layer-relative max|h| reaches this x its rolling median."""

    shared_factor: float = 16.0
    """Alarm when a shared expert's max|h| reaches this x its rolling median."""

    window: int = 40
    """Fed steps in the rolling baseline."""

    min_history: int = 10
    """Fed steps needed before a site is judged."""

    min_share: float = 0.25
    """Routed experts fed less than this fraction of the uniform share are not judged."""

    clear_factor: float = 2.0
    """A site in alarm recovers below this x baseline ..."""

    clear_steps: int = 10
    """... held for this many consecutive judged steps."""

    sustain_steps: int = 3
    """A spike still at its threshold for this many consecutive judged steps is sustained."""

    max_sites: int = 3
    """Sustained spikes are localized when at most this many sites hold one at once."""

    _rel: Rolling | None = field(default=None, repr=False)  # layer-relative, routed
    _abs: Rolling | None = field(default=None, repr=False)  # absolute max|h|, routed
    _shared: Rolling | None = field(default=None, repr=False)  # absolute max|h|, shared
    _alarm: np.ndarray | None = field(default=None, repr=False)  # onset step or -1
    _calm: np.ndarray | None = field(default=None, repr=False)  # steps below clear
    _rising: np.ndarray | None = field(default=None, repr=False)  # first step >= clear
    _held: np.ndarray | None = field(default=None, repr=False)  # steps at the threshold
    _onset: np.ndarray | None = field(default=None, repr=False)  # the spike's onset, or -1
    kind = MAXABS_SPIKE

    def __post_init__(self) -> None:
        check_positive(self, "factor", "shared_factor", "min_share", "clear_factor")
        check_positive(self, "window", "min_history", "clear_steps", integer=True)
        check_positive(self, "sustain_steps", "max_sites", integer=True)
        if self.clear_factor >= self.factor:
            raise ValueError("MaxAbsSpike.clear_factor must be below factor")

    def observe(self, frame: StepFrame, index: MetricIndex) -> list[Event]:
        ids = index.expert_grid("moe/", "act_maxabs")
        if ids.size == 0:
            return []
        L, E = ids.shape
        shared_ids = index.shared_ids("act_maxabs")
        if self._rel is None or self._rel.shape != (L, E):
            self._rel, self._abs = Rolling((L, E), self.window), Rolling((L, E), self.window)
        if self._shared is None or self._shared.shape != (L,):
            self._shared = Rolling((L,), self.window)
        self._alarm = fit_state(self._alarm, (L, E + 1), -1, np.int64)  # column E = shared
        self._calm = fit_state(self._calm, (L, E + 1), 0, np.int64)
        self._rising = fit_state(self._rising, (L, E + 1), -1, np.int64)
        self._held = fit_state(self._held, (L, E + 1), 0, np.int64)
        self._onset = fit_state(self._onset, (L, E + 1), -1, np.int64)
        assert self._rel is not None and self._abs is not None and self._shared is not None

        x = frame.take(ids)
        tok = index.expert_grid("moe/", "tokens")
        share = layer_shares(frame.take(tok)) if tok.shape == ids.shape else np.ones((L, E))
        fed = np.isfinite(x) & (share >= self.min_share)
        med_layer = nanmedian(np.where(fed, x, np.nan), axis=1)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.where(fed & (med_layer > 0), x / med_layer, np.nan)
        xs = frame.take(shared_ids)

        judged_r = fed & (self._rel.count() >= self.min_history)
        in_alarm = self._alarm >= 0
        # A routed site below clear_factor x the smallest value of its window is below
        # clear_factor x its median too: calm, neither rising nor firing. Only the others
        # (and sites in alarm, whose ratio is evidence) need the median, which costs a sort.
        lo = self._rel.min()
        with np.errstate(invalid="ignore"):
            quiet_r = judged_r & (lo > 0) & (rel < self.clear_factor * lo)
        base_rel = self._rel.median((judged_r & ~quiet_r) | in_alarm[:, :E])
        base_sh = self._shared.median()
        judged = np.concatenate(
            [judged_r, (np.isfinite(xs) & (self._shared.count() >= self.min_history))[:, None]],
            axis=1,
        )
        quiet = np.concatenate([quiet_r, np.zeros((L, 1), bool)], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN where quiet: not needed
            ratio = np.concatenate([rel / base_rel, (xs / base_sh)[:, None]], axis=1)
        limit = np.concatenate(
            [np.full((L, E), self.factor), np.full((L, 1), self.shared_factor)], axis=1
        )
        # onset: the first step of the unbroken run above clear_factor that led here
        above = judged & ~quiet & (ratio >= self.clear_factor)
        self._rising = np.where(
            above,
            np.where(self._rising < 0, frame.step, self._rising),
            np.where(judged, -1, self._rising),
        )
        fire = judged & ~quiet & (ratio >= limit) & ~in_alarm
        calm = judged & (quiet | (ratio < self.clear_factor))
        self._calm = np.where(
            in_alarm & calm, self._calm + 1, np.where(in_alarm & judged, 0, self._calm)
        )
        done = in_alarm & (self._calm >= self.clear_steps)

        # held: consecutive judged steps at the threshold since the spike (the spike's included)
        at = judged & ~quiet & (ratio >= limit) & (in_alarm | fire)
        short = self._held < self.sustain_steps  # once sustained, it stays so until recovery
        self._held = np.where(at, self._held + 1, np.where((judged & short) | done, 0, self._held))
        escalate = in_alarm & (self._held == self.sustain_steps)
        n_held = int((in_alarm & (self._held >= self.sustain_steps)).sum())

        events = []
        layers = index.moe_layers
        # the absolute baseline is evidence for the clip policy only: sorted for fired layers
        fired = (fire | escalate).any(axis=1)
        base_abs = (
            self._abs.median(np.repeat(fired[:, None], E, axis=1))
            if fired.any()
            else np.empty((L, E))  # never read: nothing fired
        )
        for kind, sites in ((MAXABS_SPIKE, fire), (BLOWUP, escalate)):
            for r, c in zip(*np.nonzero(sites)):
                shared = c == E
                i = int(shared_ids[r]) if shared else int(ids[r, c])
                # healthy scale of the layer: the largest rolling-median max|h| of its experts
                # not in alarm (what a clamp must leave alone), for the clip policy's threshold
                ok = (self._alarm[r, :E] < 0) & np.isfinite(base_abs[r])
                if not shared:
                    ok[c] = False  # not the site itself
                layer_base = float(np.max(base_abs[r][ok])) if ok.any() else float("nan")
                own = base_sh[r] if shared else base_abs[r, c]
                sustained = kind == BLOWUP
                extra = (
                    {
                        "rule": "maxabs",
                        "detector": MAXABS_SPIKE,
                        "localized": n_held <= self.max_sites,
                        "growing_sites": n_held,
                        "held_steps": self.sustain_steps,
                        "rank_votes": rank_votes(frame, index, int(r), int(c)),
                    }
                    if sustained
                    else {}
                )
                events.append(
                    make_event(
                        kind,
                        frame.run,
                        frame.step,
                        site_of(index.names[i]),
                        value=xs[r] if shared else x[r, c],
                        threshold=limit[r, c]
                        * (base_sh[r] if shared else base_rel[r, c] * med_layer[r, 0]),
                        severity="warning",
                        onset_step=self._onset[r, c] if sustained else self._rising[r, c],
                        layer=layers[r],
                        expert=-1 if shared else int(c),
                        clip_site="shared" if shared else "routed",
                        ratio=ratio[r, c],
                        factor=limit[r, c],
                        baseline_maxabs=own,
                        layer_baseline_maxabs=base_sh[r] if shared else layer_base,
                        sustained=sustained,  # a spike is a transient until it stays
                        confidence=1.0,
                        evidence=[
                            {
                                "channel": "act_maxabs",
                                "value": ratio[r, c],
                                "reference": limit[r, c],
                                "steps": self.sustain_steps if sustained else 1,
                                "agrees": True,
                            }
                        ],
                        **extra,
                    )
                )
        for r, c in zip(*np.nonzero(done)):
            shared = c == E
            i = int(shared_ids[r]) if shared else int(ids[r, c])
            events.append(
                make_event(
                    BLOWUP_RECOVERED,
                    frame.run,
                    frame.step,
                    site_of(index.names[i]),
                    value=ratio[r, c],
                    threshold=self.clear_factor,
                    severity="info",
                    onset_step=int(self._alarm[r, c]),
                    layer=layers[r],
                    expert=-1 if shared else int(c),
                    clip_site="shared" if shared else "routed",
                    of=MAXABS_SPIKE,
                    calm_steps=self.clear_steps,
                )
            )
        self._alarm = np.where(fire, frame.step, np.where(done, -1, self._alarm))
        self._onset = np.where(fire, self._rising, np.where(done, -1, self._onset))
        self._calm = np.where(fire | done, 0, self._calm)

        # baselines learn only from healthy, fed steps
        healthy = self._alarm < 0
        self._rel.push(rel, healthy[:, :E])
        self._abs.push(np.where(fed, x, np.nan), healthy[:, :E])
        self._shared.push(xs, healthy[:, E])
        return events
