"""Attention logit growth: a head's maximum pre-softmax logit above tau.

QK-Clip (Kimi K2, "Kimi K2: Open Agentic Intelligence", 2025, MuonClip) rescales a head's
query/key projections whenever its max logit exceeds tau = 100: logits that large saturate the
softmax and precede loss spikes. We watch the same statistic (attn/layerNN/headNN/max_logit,
after QK-norm, RoPE and 1/sqrt(d) scaling, reduced by max across ranks) and raise one event per
head when it crosses tau, re-armed once the head is back below tau. The event carries the
head's recent growth (its value `growth_steps` steps earlier) as evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from analytics.catalog import MetricIndex, site_of
from analytics.detectors.base import Detector, check_positive, fit_state
from analytics.events import ATTN_LOGIT, Event, make_event
from analytics.frame import StepFrame
from analytics.rolling import Rolling


@dataclass
class AttnLogitGrowth(Detector):
    tau: float = 100.0
    """Max-logit threshold (QK-Clip's tau)."""

    growth_steps: int = 10
    """The event reports the head's max logit this many steps before (evidence of growth)."""

    _above: np.ndarray | None = field(default=None, repr=False)
    _past: Rolling | None = field(default=None, repr=False)
    kind = ATTN_LOGIT

    def __post_init__(self) -> None:
        check_positive(self, "tau")
        check_positive(self, "growth_steps", integer=True)

    def observe(self, frame: StepFrame, index: MetricIndex) -> list[Event]:
        ids = index.heads("max_logit")
        if ids.size == 0:
            return []
        x = frame.take(ids)
        self._above = fit_state(self._above, ids.shape, False, bool)
        if self._past is None or self._past.shape != ids.shape:
            self._past = Rolling(ids.shape, self.growth_steps)
        events = []
        over = np.isfinite(x) & (x > self.tau)
        new = np.flatnonzero(over & ~self._above)
        before = self._past.oldest() if new.size else np.empty(0)
        for j in new.tolist():
            i = int(ids[j])
            events.append(
                make_event(
                    ATTN_LOGIT,
                    frame.run,
                    frame.step,
                    site_of(index.names[i]),
                    value=x[j],
                    threshold=self.tau,
                    severity="warning",
                    onset_step=frame.step,
                    layer=int(index.layer[i]),
                    head=int(index.head[i]),
                    value_before=before[j],
                    steps_before=self.growth_steps,
                    confidence=1.0,
                    evidence=[
                        {
                            "channel": "max_logit",
                            "value": x[j],
                            "reference": self.tau,
                            "agrees": True,
                        }
                    ],
                )
            )
        self._above = np.where(np.isfinite(x), over, self._above)
        self._past.push(x)
        return events
