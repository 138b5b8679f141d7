"""A learning-rate jump: a cause, not a symptom.

The learning rate is an input of the step (the hooks send `train/lr`, the value the optimizer
used), so a jump in it is never a consequence of anything the model did. Schedules move it
smoothly: linear warmup, cosine or linear decay, steps of a step schedule. The learning rate a
smooth schedule gives next is the straight line through the last two (warmup doubles the rate
from its first step to its second, and the line predicts exactly that), so a step whose rate
is at least `factor` x (or at most 1/`factor` x) that prediction is a change somebody (or a
bug) made; after a jump the prediction is the last rate itself. The event marks where it happened and how long it lasted
(a `lr_change` when it jumps, once per episode; the end is in detail of the next jump back).
The decision layer (analytics/decisions.py) reads it as the cause of whatever grows in the
`cause_window` steps after it: weights and activations that follow a learning-rate spike are
not clamped (DESIGN.md: causes that are not activation growth never clamp).
Delay: 0 steps (the jump is seen on the step it is applied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from analytics.catalog import MetricIndex
from analytics.detectors.base import Detector, check_positive
from analytics.events import LR_CHANGE, Event, make_event
from analytics.frame import StepFrame


@dataclass
class LrChange(Detector):
    metric: str = "train/lr"
    """The learning rate as the loop reports it."""

    factor: float = 1.5
    """A step-to-step ratio beyond this (either way) is a jump, not a schedule."""

    _last: float = field(default=math.nan, repr=False)
    _prev: float = field(default=math.nan, repr=False)  # the one before _last
    _jumped: bool = field(default=False, repr=False)  # _last was a jump
    _since: int = field(default=-1, repr=False)  # first step of a jumped level, or -1
    _base: float = field(default=math.nan, repr=False)  # the level before the jump
    kind = LR_CHANGE

    def __post_init__(self) -> None:
        check_positive(self, "factor")
        if self.factor <= 1:
            raise ValueError(f"LrChange.factor must be > 1, got {self.factor}")

    def observe(self, frame: StepFrame, index: MetricIndex) -> list[Event]:
        lr = frame.scalar(index.find(self.metric))
        if not math.isfinite(lr) or lr <= 0:
            return []
        prev, last = self._prev, self._last
        self._prev, self._last = last, lr
        if not (math.isfinite(prev) and math.isfinite(last)):
            return []
        line = 2 * last - prev
        expected = last if self._jumped or line <= 0 else line
        ratio = lr / expected
        self._jumped = not 1 / self.factor < ratio < self.factor
        if not self._jumped:
            return []
        if self._since >= 0 and 1 / self.factor < lr / self._base < self.factor:
            self._since = -1  # back to where it was: the end of the episode
            return []
        self._since, self._base = frame.step, last
        return [
            make_event(
                LR_CHANGE,
                frame.run,
                frame.step,
                self.metric,
                value=lr,
                threshold=expected * (self.factor if ratio > 1 else 1 / self.factor),
                severity="warning",
                onset_step=frame.step,
                ratio=ratio,
                previous=last,
                expected=expected,
                confidence=1.0,
                evidence=[
                    {"channel": self.metric, "value": lr, "reference": expected, "agrees": True}
                ],
            )
        ]
