"""Localized blow-up at layer level: the max-to-median ratio of expert output norms.

Step 3.5 Flash (StepFun, 2026, Fig. 4) shows the signature of its localized activation
blow-ups: within one MoE layer, the ratio of the largest per-expert output norm to the median
climbs for many steps while the median stays flat. We compute, per layer and step,

    r = max_e out_norm_e / median_e out_norm_e      over experts fed >= min_share

and raise a `blowup` event when r >= `ratio_threshold` AND r is trending up: the same expert
has held the maximum for the last `trend_steps` steps and r rose by `min_rise` over them. The site is that
expert. Clean runs of the tiny and demo presets reach r = 15 at most (transient peaks, never
a sustained climb of one expert), hence 20. The per-site detector (maxabs.py) usually fires
first; this one names the layer-level picture and covers layers whose experts are all new.
The layer recovers (`blowup_recovered`) after `clear_steps` steps below half the threshold.
The onset is the first step of the unbroken run at or above half the threshold.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from analytics.catalog import MetricIndex, site_of
from analytics.detectors.base import Detector, check_positive, fit_state
from analytics.detectors.expert_death import layer_shares
from analytics.events import BLOWUP, BLOWUP_RECOVERED, Event, make_event
from analytics.frame import StepFrame
from analytics.rolling import nanmedian


@dataclass
class LocalizedBlowup(Detector):
    ratio_threshold: float = 20.0
    """Max-to-median ratio of expert output norms at which a layer is blowing up."""

    trend_steps: int = 3
    """The same expert must hold the maximum for this many steps, with the ratio rising."""

    min_rise: float = 1.2
    """Rising means: the ratio grew by at least this factor over those steps."""

    min_share: float = 0.25
    """Experts fed less than this fraction of the uniform share are left out of max and median."""

    clear_steps: int = 10
    """Steps below ratio_threshold / 2 after which the layer has recovered."""

    _hist_r: np.ndarray | None = field(default=None, repr=False)  # [trend_steps + 1, L]
    _hist_e: np.ndarray | None = field(default=None, repr=False)  # argmax experts
    _alarm: np.ndarray | None = field(default=None, repr=False)  # [L] onset or -1
    _alarm_e: np.ndarray | None = field(default=None, repr=False)
    _calm: np.ndarray | None = field(default=None, repr=False)
    _rising: np.ndarray | None = field(default=None, repr=False)  # first step >= half
    kind = BLOWUP

    def __post_init__(self) -> None:
        check_positive(self, "ratio_threshold", "min_share", "min_rise")
        check_positive(self, "trend_steps", "clear_steps", integer=True)

    def observe(self, frame: StepFrame, index: MetricIndex) -> list[Event]:
        ids = index.expert_grid("moe/", "out_norm")
        tok = index.expert_grid("moe/", "tokens")
        if ids.size == 0 or tok.shape != ids.shape:
            return []
        L, E = ids.shape
        k = self.trend_steps + 1
        self._hist_r = fit_state(self._hist_r, (k, L), np.nan)
        self._hist_e = fit_state(self._hist_e, (k, L), -1, np.int64)
        self._alarm = fit_state(self._alarm, (L,), -1, np.int64)
        self._alarm_e = fit_state(self._alarm_e, (L,), -1, np.int64)
        self._calm = fit_state(self._calm, (L,), 0, np.int64)
        self._rising = fit_state(self._rising, (L,), -1, np.int64)

        out = frame.take(ids)
        fed = np.isfinite(out) & (layer_shares(frame.take(tok)) >= self.min_share)
        x = np.where(fed, out, np.nan)
        med = nanmedian(x, axis=1)
        masked = np.where(fed, out, -np.inf)
        top = masked.max(axis=1)  # -inf where no expert is fed (not judged)
        enough = fed.sum(axis=1) >= 2
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(enough & (med > 0), top / med, np.nan)
        arg = np.where(enough, np.argmax(masked, axis=1), -1)
        self._hist_r = np.concatenate([self._hist_r[1:], r[None]])
        self._hist_e = np.concatenate([self._hist_e[1:], arg[None]])

        half = np.isfinite(r) & (r >= self.ratio_threshold / 2)  # onset: start of the climb
        self._rising = np.where(
            half,
            np.where(self._rising < 0, frame.step, self._rising),
            np.where(np.isfinite(r), -1, self._rising),
        )
        same = (self._hist_e[1:] == arg[None]).all(axis=0) & (arg >= 0)
        rising = np.isfinite(self._hist_r[0]) & (r >= self.min_rise * self._hist_r[0])
        fire = (self._alarm < 0) & np.isfinite(r) & (r >= self.ratio_threshold) & same & rising
        in_alarm = self._alarm >= 0
        calm = np.isfinite(r) & (r < self.ratio_threshold / 2)
        self._calm = np.where(
            in_alarm & calm, self._calm + 1, np.where(in_alarm & np.isfinite(r), 0, self._calm)
        )
        done = in_alarm & (self._calm >= self.clear_steps)

        events = []
        layers = index.moe_layers
        mx_ids = index.expert_grid("moe/", "act_maxabs")
        mx = frame.take(mx_ids) if mx_ids.shape == ids.shape else np.full((L, E), np.nan)
        for l in np.flatnonzero(fire).tolist():
            e = int(arg[l])
            others = np.where(fed[l], mx[l], np.nan)
            others[e] = np.nan
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                layer_base = float(np.nanmax(others)) if np.isfinite(others).any() else float("nan")
            events.append(
                make_event(
                    BLOWUP,
                    frame.run,
                    frame.step,
                    site_of(index.names[int(ids[l, e])]),
                    value=r[l],
                    threshold=self.ratio_threshold,
                    severity="warning",
                    onset_step=self._rising[l],
                    layer=layers[l],
                    expert=e,
                    clip_site="routed",
                    ratios=[float(v) for v in self._hist_r[:, l]],
                    median_out_norm=med[l],
                    layer_baseline_maxabs=layer_base,
                )
            )
        for l in np.flatnonzero(done).tolist():
            e = int(self._alarm_e[l])
            events.append(
                make_event(
                    BLOWUP_RECOVERED,
                    frame.run,
                    frame.step,
                    site_of(index.names[int(ids[l, e])]),
                    value=r[l],
                    threshold=self.ratio_threshold / 2,
                    severity="info",
                    onset_step=int(self._alarm[l]),
                    layer=layers[l],
                    expert=e,
                    clip_site="routed",
                    calm_steps=self.clear_steps,
                )
            )
        self._alarm_e = np.where(fire, arg, self._alarm_e)
        self._alarm = np.where(fire, frame.step, np.where(done, -1, self._alarm))
        self._calm = np.where(fire | done, 0, self._calm)
        return events
