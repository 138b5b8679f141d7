"""Expert death (and revival), per MoE layer and expert.

Step 3.5 Flash (StepFun, 2026, section 4.1) watches per-expert activation norms during
pre-training and calls an expert dead when its norm falls far below its layer's (the
min-to-median ratio collapses); its parameters decay from then on because nothing trains
them. Routing tells the same story from the other side: a dead expert receives (almost) no
tokens. An expert is *starved* on a step when either

    token share      tokens_e / (tokens_layer / E)            < share_threshold  (0.1), or
    activation RMS   act_rms_e / median_e'(act_rms_e')        < rms_threshold    (0.1).

Starvation alone is not death: with aux-loss-free balancing (DeepSeek-V3) a starved expert's
selection bias rises every step until it is fed again, and in small or young runs experts are
starved for tens of steps and come back (we measured runs of 30+ steps in clean runs of the
demo preset, and experts starved for 200+ steps whose parameters never moved and that came
back later). So

  * expert_death: starved for `window` steps (20) AND its parameter norm (params/.../fro_norm,
    every K steps) has decayed to <= `param_decay` (0.5) of its last value before the
    starvation began - the Step 3.5 Flash signature. Reported `window` - 1 steps after the
    onset at the earliest (when the decay is measured by then), else at the first parameter
    measurement showing it.
  * expert_starved: starved for `long_window` steps (200) with its parameters intact: a fact
    about routing (balancing may still bring it back), not a verdict, and the clock alone
    decides it - deterministic, never a coin toss between "dead" and "not dead".

The event's onset is the first starved step, so `step - onset` is the detection delay. An
expert that died or starved and is fed again (share >= revive_share for revive_steps
consecutive steps) raises an `expert_revival` event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from analytics.catalog import MetricIndex, site_of
from analytics.detectors.base import Detector, check_positive, fit_state
from analytics.events import EXPERT_DEATH, EXPERT_REVIVAL, EXPERT_STARVED, Event, make_event
from analytics.frame import StepFrame
from analytics.rolling import nanmedian


def layer_shares(tokens_LE: np.ndarray) -> np.ndarray:
    """tokens / uniform share per layer (1.0 = exactly its fair share); NaN where unknown."""
    n_E = np.isfinite(tokens_LE).sum(axis=1, keepdims=True)
    total = np.nansum(tokens_LE, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, tokens_LE * n_E / total, np.nan)


def layer_relative(x_LE: np.ndarray) -> np.ndarray:
    """x / median over the layer's experts; NaN where the median is 0 or unknown."""
    med = nanmedian(x_LE, axis=1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(med > 0, x_LE / med, np.nan)


@dataclass
class ExpertDeath(Detector):
    share_threshold: float = 0.1
    """Starved when its token share is below this fraction of the uniform share."""

    rms_threshold: float = 0.1
    """... or its activation RMS is below this fraction of the layer median (min-to-median)."""

    window: int = 20
    """Starved steps after which parameter-norm decay confirms death."""

    param_decay: float = 0.5
    """Confirming decay: fro_norm now <= this x its last value before starvation began."""

    long_window: int = 200
    """Starved steps after which the expert is reported starved (without parameter evidence)."""

    revive_share: float = 0.5
    """A dead expert whose share is at least this fraction of uniform ..."""

    revive_steps: int = 5
    """... for this many consecutive steps has revived."""

    _starved: np.ndarray | None = field(default=None, repr=False)  # consecutive steps
    _onset: np.ndarray | None = field(default=None, repr=False)
    _dead: np.ndarray | None = field(default=None, repr=False)
    _fed: np.ndarray | None = field(default=None, repr=False)  # revival streak
    _norm_ref: np.ndarray | None = field(default=None, repr=False)  # last healthy fro_norm
    _norm_now: np.ndarray | None = field(default=None, repr=False)
    _norm_step: np.ndarray | None = field(default=None, repr=False)
    kind = EXPERT_DEATH

    def __post_init__(self) -> None:
        check_positive(self, "share_threshold", "rms_threshold", "param_decay", "revive_share")
        check_positive(self, "window", "long_window", "revive_steps", integer=True)
        if self.long_window < self.window:
            raise ValueError("ExpertDeath.long_window must be >= window")

    def observe(self, frame: StepFrame, index: MetricIndex) -> list[Event]:
        tok_ids = index.expert_grid("moe/", "tokens")
        if tok_ids.size == 0:
            return []
        shape = tok_ids.shape
        self._starved = fit_state(self._starved, shape, 0, np.int64)
        self._onset = fit_state(self._onset, shape, -1, np.int64)
        self._dead = fit_state(self._dead, shape, False, bool)
        self._fed = fit_state(self._fed, shape, 0, np.int64)
        self._norm_ref = fit_state(self._norm_ref, shape, np.nan)
        self._norm_now = fit_state(self._norm_now, shape, np.nan)
        self._norm_step = fit_state(self._norm_step, shape, -1, np.int64)

        share = layer_shares(frame.take(tok_ids))
        rms_ids = index.expert_grid("moe/", "act_rms")
        rel_rms = (
            layer_relative(frame.take(rms_ids))
            if rms_ids.shape == shape
            else np.full(shape, np.nan)
        )
        seen = np.isfinite(share)
        starved = seen & (
            (share < self.share_threshold) | (np.isfinite(rel_rms) & (rel_rms < self.rms_threshold))
        )

        # parameter norms arrive every K steps; the reference is the last one before starving
        norm_ids = index.expert_grid("params/", "fro_norm")
        if norm_ids.shape == shape:
            norm = frame.take(norm_ids)
            got = np.isfinite(norm)
            self._norm_now = np.where(got, norm, self._norm_now)
            self._norm_step = np.where(got, frame.step, self._norm_step)
            healthy = got & ~starved & ~self._dead
            self._norm_ref = np.where(healthy, norm, self._norm_ref)

        alive = ~self._dead
        newly = alive & starved & (self._starved == 0)
        self._onset = np.where(newly, frame.step, self._onset)
        self._starved = np.where(
            alive & starved, self._starved + 1, np.where(alive & seen, 0, self._starved)
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            decay = np.where(self._norm_ref > 0, self._norm_now / self._norm_ref, np.nan)
        measured_since = self._norm_step >= self._onset
        fast = (self._starved >= self.window) & measured_since & (decay <= self.param_decay)
        slow = self._starved >= self.long_window
        die = alive & (fast | slow)

        events = []
        layers = index.moe_layers
        for r, e in zip(*np.nonzero(die)):
            layer, expert = layers[r], int(e)
            path = "parameter-decay" if fast[r, e] else "starvation"
            events.append(
                make_event(
                    EXPERT_DEATH if fast[r, e] else EXPERT_STARVED,
                    frame.run,
                    frame.step,
                    site_of(index.names[int(tok_ids[r, e])]),
                    value=share[r, e],
                    threshold=self.share_threshold,
                    severity="warning",
                    onset_step=self._onset[r, e],
                    layer=layer,
                    expert=expert,
                    path=path,
                    starved_steps=self._starved[r, e],
                    share=share[r, e],
                    rms_ratio=rel_rms[r, e],
                    param_norm_ratio=decay[r, e],
                    param_norm_step=self._norm_step[r, e],
                    confidence=1.0,
                    evidence=[
                        {"channel": "share", "value": share[r, e], "agrees": True},
                        {
                            "channel": "param_norm",
                            "value": decay[r, e],
                            "reference": self.param_decay,
                            "agrees": bool(fast[r, e]),
                        },
                    ],
                )
            )
        self._dead = self._dead | die
        self._fed = np.where(die, 0, self._fed)

        # revival of the dead
        fed = self._dead & seen & (share >= self.revive_share)
        self._fed = np.where(fed, self._fed + 1, np.where(self._dead & seen, 0, self._fed))
        back = self._dead & (self._fed >= self.revive_steps)
        for r, e in zip(*np.nonzero(back)):
            layer, expert = layers[r], int(e)
            events.append(
                make_event(
                    EXPERT_REVIVAL,
                    frame.run,
                    frame.step,
                    site_of(index.names[int(tok_ids[r, e])]),
                    value=share[r, e],
                    threshold=self.revive_share,
                    severity="info",
                    onset_step=frame.step - self.revive_steps + 1,
                    layer=layer,
                    expert=expert,
                    share=share[r, e],
                )
            )
        self._dead = self._dead & ~back
        self._starved = np.where(back, 0, self._starved)
        self._fed = np.where(back, 0, self._fed)
        return events
