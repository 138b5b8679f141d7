"""Any NaN or inf in a step: immediate and critical, naming the first site in forward order.

A value that was *sent* and is not finite is always a finding; a metric that was not sent
this step (periodic parameter norms) is not. Reduction propagates NaN on purpose (a NaN on one
rank is a NaN in the reduced value), so the reduced step is enough to see it; the per-rank
values are read only once something was found, to name the ranks it came from.

"First" follows the data flow of a training step (catalog.MetricIndex.forward_order): a NaN
born in layer 3's MoE output shows up in every later layer, the loss and every gradient; the
earliest of them points at the origin. The event names that site, its layer and expert (an
expert's own statistic comes before its layer's residual stream, so a NaN born inside an
expert names the expert), and the ranks whose own values of it were not finite (`rank`: the
first of them). One event per episode: a run whose weights became NaN
is reported once, not on every following step, and re-armed by the first clean step.

Two kinds of NaN are not findings, so that they cannot hold an episode open and hide the next
real one:
- a training-loop input the caller does not pass (`train/loss`, `train/mtp_loss/*`,
  `train/lr`, `train/tokens`, `train/tokens_per_s`: the hooks send NaN for "not given", e.g.
  `step_end(mtp_losses=[])` on a model with MTP heads, or no lr and no optimizer) until it
  has once been finite in the run; from then on a NaN there is a finding like any other;
- a metric that has been non-finite on more than `stuck_steps` consecutive steps it was sent
  (reported when it went bad; the episode is then judged on the others). Once finite again it
  is armed again.
Infinities are always findings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analytics.catalog import MetricIndex, site_of
from analytics.detectors.base import Detector, check_positive
from analytics.events import NONFINITE, Event, make_event
from analytics.frame import StepFrame


@dataclass
class NonFinite(Detector):
    max_listed: int = 8
    """How many non-finite metrics (in forward order) the event's detail lists."""
    stuck_steps: int = 20
    """A metric non-finite on more sent steps in a row than this no longer holds the episode
    open (it was reported when it went bad)."""

    _active: bool = field(default=False, repr=False)
    _bad_run: np.ndarray | None = field(default=None, repr=False)  # int32: sent steps in a row
    _given: np.ndarray | None = field(default=None, repr=False)  # bool: finite once in the run
    kind = NONFINITE

    def __post_init__(self) -> None:
        check_positive(self, "max_listed", "stuck_steps", integer=True)
        self._optional_of: tuple[int, int, np.ndarray] | None = None  # a cache, not state

    def observe(self, frame: StepFrame, index: MetricIndex) -> list[Event]:
        n = frame.values.size
        bad_run = self._bad_run = _grown(self._bad_run, n, 0, np.int32)
        given = self._given = _grown(self._given, n, False, bool)
        finite = np.isfinite(frame.values)
        sent_bad = frame.present & ~finite
        given |= frame.present & finite
        if self._optional_of is None or self._optional_of[:2] != (id(index), n):
            self._optional_of = (id(index), n, optional_inputs(index, n))
        optional = self._optional_of[2]
        bad = sent_bad & ~(np.isnan(frame.values) & ~given & optional)
        bad_run[bad] += 1
        bad_run[frame.present & ~bad] = 0
        bad &= bad_run <= self.stuck_steps
        if not bad.any():
            self._active = False
            return []
        if self._active:
            return []
        self._active = True
        order = index.forward_order()
        order = order[order < bad.size]
        hits = order[bad[order]]
        first = int(hits[0])
        name = index.names[first]
        ranks = frame.rank_nonfinite(first)
        return [
            make_event(
                NONFINITE,
                frame.run,
                frame.step,
                site_of(name),
                value=int(bad.sum()),
                threshold=0,
                severity="critical",
                onset_step=frame.step,
                metric=name,
                first_value=str(frame.values[first]),
                layer=int(index.layer[first]),
                expert=int(index.expert[first]),
                head=int(index.head[first]),
                metrics=[index.names[i] for i in hits[: self.max_listed].tolist()],
                ranks=ranks,
                rank=ranks[0] if ranks else -1,
                confidence=1.0,
                evidence=[
                    {"channel": index.names[i], "value": str(frame.values[i]), "agrees": True}
                    for i in hits[: self.max_listed].tolist()
                ],
            )
        ]


_OPTIONAL_STATS = ("loss", "mtp_loss", "lr", "tokens", "tokens_per_s")


def optional_inputs(index: MetricIndex, n: int) -> np.ndarray:
    """bool [n]: the training-loop inputs a caller may leave out (train/<stat> above)."""
    out = np.zeros(n, dtype=bool)
    m = min(n, index.size)
    if m:
        names, stats = index.names[:m], index.stat[:m]
        out[:m] = (names.str.starts_with("train/") & stats.is_in(_OPTIONAL_STATS)).to_numpy()
    return out


def _grown(arr: np.ndarray | None, n: int, fill: Any, dtype: Any) -> np.ndarray:
    """A per-metric state array of size n that keeps what it held (the dictionary only grows)."""
    if arr is not None and arr.size == n:
        return arr
    out = np.full(n, fill, dtype=dtype)
    if arr is not None:
        k = min(n, arr.size)
        out[:k] = arr[:k]
    return out
