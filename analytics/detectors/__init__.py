"""The detectors, and `DetectorSet`: all of them over one run, step by step.

    NonFinite         nonfinite.py    any NaN/inf, critical, first site in forward order
    ScalarSpike       spike.py        loss and grad-norm spikes, >= 7 sigma (OLMo 2)
    AttnLogitGrowth   attn_logit.py   a head's max logit above tau = 100 (QK-Clip)
    ExpertDeath       expert_death.py starved experts, parameter-norm decay (Step 3.5 Flash)
    MaxAbsSpike       maxabs.py       per-site max|h| vs its rolling robust baseline (transients)
    ExpertBlowup      blowup.py       one expert's sustained growth: weights (CUSUM), activations
    LrChange          lr_change.py    the learning rate jumped (a cause)

The same DetectorSet runs online in the collector (one per run, fed each reduced step) and
offline over a store (analytics/offline.py), and produces the same events; its last stage is
the decision layer (analytics/decisions.py), which links the step's events into incidents and
decides which of them may move a clamp.
"""

from __future__ import annotations

from typing import Any

from analytics.catalog import MetricIndex
from analytics.decisions import Decider
from analytics.detectors.attn_logit import AttnLogitGrowth
from analytics.detectors.base import Detector
from analytics.detectors.blowup import ExpertBlowup
from analytics.detectors.expert_death import ExpertDeath
from analytics.detectors.lr_change import LrChange
from analytics.detectors.maxabs import MaxAbsSpike
from analytics.detectors.nonfinite import NonFinite
from analytics.detectors.spike import ScalarSpike, grad_spike, loss_spike
from analytics.events import Event
from analytics.frame import StepFrame

__all__ = [
    "AttnLogitGrowth",
    "Detector",
    "DetectorSet",
    "ExpertBlowup",
    "ExpertDeath",
    "LrChange",
    "MaxAbsSpike",
    "NonFinite",
    "ScalarSpike",
    "default_detectors",
    "grad_spike",
    "loss_spike",
]


def default_detectors() -> dict[str, Detector]:
    """Every detector at its literature-grounded defaults, by name."""
    return {
        "nonfinite": NonFinite(),
        "loss_spike": loss_spike(),
        "grad_spike": grad_spike(),
        "attn_logit": AttnLogitGrowth(),
        "expert_death": ExpertDeath(),
        "maxabs": MaxAbsSpike(),
        "blowup": ExpertBlowup(),
        "lr_change": LrChange(),
    }


class DetectorSet:
    """Named detectors run in a fixed order; one bad detector never silences the others
    (its error is recorded in `errors` and the step goes on)."""

    def __init__(
        self, detectors: dict[str, Detector] | None = None, decider: Decider | None = None
    ) -> None:
        self.detectors = default_detectors() if detectors is None else dict(detectors)
        self.decider = decider or Decider()
        self.errors: dict[str, int] = {}
        self.last_step = -1

    def observe(self, frame: StepFrame, index: MetricIndex) -> list[Event]:
        if frame.step <= self.last_step:  # a step is judged once, in order
            return []
        self.last_step = frame.step
        events: list[Event] = []
        for name, det in self.detectors.items():
            try:
                events += det.observe(frame, index)
            except Exception as exc:
                self.errors[name] = self.errors.get(name, 0) + 1
                if self.errors[name] == 1:
                    import logging

                    logging.getLogger("analytics").exception(
                        "detector %s failed at step %d (%s); it keeps running",
                        name,
                        frame.step,
                        exc,
                    )
        return self.decider.decide(frame.step, events) if events else events

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "detectors": {n: d.state_dict() for n, d in self.detectors.items()},
            "decider": self.decider.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.detectors) - set(state["detectors"])
        if missing:
            raise ValueError(f"state lacks detectors {sorted(missing)}")
        for name, det in self.detectors.items():
            det.load_state_dict(state["detectors"][name])
        if "decider" in state:  # a state saved before the decision layer existed
            self.decider.load_state_dict(state["decider"])
        self.last_step = int(state["last_step"])
