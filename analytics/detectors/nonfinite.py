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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from analytics.catalog import MetricIndex, site_of
from analytics.detectors.base import Detector
from analytics.events import NONFINITE, Event, make_event
from analytics.frame import StepFrame


@dataclass
class NonFinite(Detector):
    max_listed: int = 8
    """How many non-finite metrics (in forward order) the event's detail lists."""

    _active: bool = field(default=False, repr=False)
    kind = NONFINITE

    def observe(self, frame: StepFrame, index: MetricIndex) -> list[Event]:
        bad = frame.present & ~np.isfinite(frame.values)
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
        ranks = sorted(
            r
            for r, vec in frame.rank_values().items()  # NaN or inf there
            if first < vec.size and not np.isfinite(vec[first])
        )
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
