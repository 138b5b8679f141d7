"""Loss and gradient-norm spikes: a value at least 7 sigma above its rolling trend.

OLMo 2 (Team OLMo, "2 OLMo 2 Furious", 2024, section 3) defines the spike score of a run as
the fraction of steps whose value lies at least 7 standard deviations from the rolling average
of the preceding window; we raise an event at each such step. Two adjustments for short and
early runs, both conservative: the rolling level is a least-squares line through the window
(a falling loss is not a spike because it falls), and sigma is the spread of the window's
residuals around that line. Gradient norms are multiplicative, so they are judged in log
space (`log=True`): a 7-sigma excursion of log ||g||.

A spike raises one event; values inside it stay out of the baseline, so a long spike cannot
teach the detector that it is normal. If the level itself moved (the alarm lasts `window`
steps) the new level is accepted as the baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from analytics.catalog import MetricIndex
from analytics.detectors.base import Detector, check_positive
from analytics.events import GRAD_SPIKE, LOSS_SPIKE, Event, make_event
from analytics.frame import StepFrame


def trend_z(history: np.ndarray, x: float) -> tuple[float, float, float]:
    """(z, predicted level, sigma) of x against a line fitted through `history` (oldest
    first). sigma has a floor of 1e-3 of the level's magnitude so a flat window is no trap."""
    n = history.size
    t = np.arange(n, dtype=np.float64)
    slope, icept = np.polyfit(t, history, 1)
    resid = history - (slope * t + icept)
    pred = slope * n + icept
    sigma = max(float(np.sqrt(resid @ resid / max(n - 2, 1))), 1e-3 * abs(pred), 1e-12)
    return (x - pred) / sigma, float(pred), sigma


@dataclass
class ScalarSpike(Detector):
    metric: str = "train/loss"
    """Metric name (reduced across ranks) to watch."""

    kind: str = LOSS_SPIKE
    """Event kind raised."""

    sigmas: float = 7.0
    """Threshold in residual standard deviations (OLMo 2: 7)."""

    window: int = 50
    """Steps in the rolling window (OLMo 2 uses 1000 over long runs; ours are short)."""

    min_history: int = 20
    """No judgement before this many baseline values: the first steps of training have no
    trend to compare with."""

    log: bool = False
    """Judge log(value) (for positive, multiplicative quantities like gradient norms)."""

    _hist: list = field(default_factory=list, repr=False)
    _alarm_since: int = field(default=-1, repr=False)

    def __post_init__(self) -> None:
        check_positive(self, "sigmas")
        check_positive(self, "window", "min_history", integer=True)
        if self.min_history < 3 or self.min_history > self.window:
            raise ValueError(
                f"ScalarSpike.min_history must be in [3, window={self.window}], "
                f"got {self.min_history}"
            )

    def observe(self, frame: StepFrame, index: MetricIndex) -> list[Event]:
        x = frame.scalar(index.find(self.metric))
        if not math.isfinite(x) or (self.log and x <= 0):
            return []  # NonFinite reports it, not us
        y = math.log(x) if self.log else x
        events = []
        if len(self._hist) >= self.min_history:
            z, pred, sigma = trend_z(np.asarray(self._hist), y)
            if z >= self.sigmas:
                if self._alarm_since < 0:
                    self._alarm_since = frame.step
                    level = pred + self.sigmas * sigma
                    events.append(
                        make_event(
                            self.kind,
                            frame.run,
                            frame.step,
                            self.metric,
                            value=x,
                            threshold=math.exp(level) if self.log else level,
                            severity="warning",
                            onset_step=frame.step,
                            z=round(z, 3),
                            expected=math.exp(pred) if self.log else pred,
                            window=len(self._hist),
                            log=self.log,
                            confidence=1.0,
                            evidence=[
                                {
                                    "channel": self.metric,
                                    "value": x,
                                    "reference": math.exp(pred) if self.log else pred,
                                    "z": round(z, 3),
                                    "agrees": True,
                                }
                            ],
                        )
                    )
                if frame.step - self._alarm_since < self.window:
                    return events  # keep the spike out of the baseline
            self._alarm_since = -1 if z < self.sigmas else self._alarm_since
        self._hist.append(y)
        del self._hist[: -self.window]
        return events

    def state_dict(self) -> dict:
        return {"_hist": list(self._hist), "_alarm_since": self._alarm_since}


def loss_spike(**kw) -> ScalarSpike:
    return ScalarSpike(metric="train/loss", kind=LOSS_SPIKE, **kw)


def grad_spike(**kw) -> ScalarSpike:
    return ScalarSpike(metric="grad/global_norm", kind=GRAD_SPIKE, log=True, **kw)
