"""What a detector says: one `Event` per anomaly onset (or end), with its evidence.

An event names the step whose values raised it, where (`site`: a metric-name prefix such as
"moe/layer04/expert003", "attn/layer02/head05", "train/loss"), the statistic (`value`) and the
threshold it crossed, a severity, and the step the anomaly began (`onset_step` <= `step`; the
difference is the detection delay in steps). `detail` holds labels and evidence as plain JSON
values. Events compare by value, so the online and offline runs of a detector can be checked
for equality with `==`.

Stored as store.EventRecord rows (detail as JSON text): `to_records` / `from_frame`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("info", "warning", "critical")

# kinds
NONFINITE = "nonfinite"  # any NaN/inf value: critical, immediate
LOSS_SPIKE = "loss_spike"  # train/loss >= 7 sigma above its rolling trend
GRAD_SPIKE = "grad_spike"  # grad/global_norm likewise (in log space)
ATTN_LOGIT = "attn_logit_growth"  # a head's max logit above tau
EXPERT_DEATH = "expert_death"  # starved (share/RMS low) for the window
EXPERT_REVIVAL = "expert_revival"  # a dead expert is fed again
BLOWUP = "blowup"  # a layer's max/median expert output norm ratio
MAXABS_SPIKE = "maxabs_spike"  # one site's max |activation| vs its rolling baseline
BLOWUP_RECOVERED = "blowup_recovered"  # a blown-up site back within its baseline

KINDS = (
    NONFINITE,
    LOSS_SPIKE,
    GRAD_SPIKE,
    ATTN_LOGIT,
    EXPERT_DEATH,
    EXPERT_REVIVAL,
    BLOWUP,
    MAXABS_SPIKE,
    BLOWUP_RECOVERED,
)
CLIP_TRIGGERS = (BLOWUP, MAXABS_SPIKE)  # what the clip policy acts on


@dataclass(frozen=True)
class Event:
    kind: str
    run: str
    step: int
    site: str
    value: float
    threshold: float
    severity: str
    onset_step: int
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        if not 0 <= self.onset_step <= self.step:
            raise ValueError(f"onset_step {self.onset_step} must lie in [0, step={self.step}]")

    @property
    def delay(self) -> int:
        """Steps from the anomaly's first step to the step that raised the event."""
        return self.step - self.onset_step

    @property
    def layer(self) -> int:
        return int(self.detail.get("layer", -1))

    @property
    def expert(self) -> int:
        return int(self.detail.get("expert", -1))

    def key(self) -> tuple:
        """The store's natural key: one event per (step, kind, site)."""
        return (self.step, self.kind, self.site)

    def brief(self) -> str:
        return (
            f"{self.kind}@{self.step} {self.site} value={_num(self.value)} "
            f"threshold={_num(self.threshold)} onset={self.onset_step}"
        )


def _num(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _json_safe(v: Any) -> Any:
    """numpy scalars -> Python; non-finite floats -> strings (JSON has no NaN)."""
    if hasattr(v, "item") and not isinstance(v, (list, dict)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def make_event(
    kind: str,
    run: str,
    step: int,
    site: str,
    value: float,
    threshold: float,
    severity: str,
    onset_step: int,
    **detail: Any,
) -> Event:
    """An Event whose numbers are plain Python floats and whose detail is JSON-safe, so the
    event equals itself after a store round trip."""
    return Event(
        kind=kind,
        run=run,
        step=int(step),
        site=site,
        value=float(value),
        threshold=float(threshold),
        severity=severity,
        onset_step=int(onset_step),
        detail=_json_safe(detail),
    )


def to_records(events: Iterable[Event]) -> list:
    """store.EventRecord rows (store is imported lazily: detectors never need it)."""
    from store import EventRecord

    return [
        EventRecord(
            step=e.step,
            kind=e.kind,
            site=e.site,
            value=e.value,
            threshold=e.threshold,
            severity=e.severity,
            onset_step=e.onset_step,
            detail=json.dumps(e.detail, sort_keys=True),
        )
        for e in events
    ]


def from_frame(df, run: str) -> list[Event]:
    """Events back from a store.events(run) frame."""
    return [
        Event(
            kind=r["kind"],
            run=run,
            step=int(r["step"]),
            site=r["site"],
            value=float(r["value"]),
            threshold=float(r["threshold"]),
            severity=r["severity"],
            onset_step=int(r["onset_step"]),
            detail=json.loads(r["detail"] or "{}"),
        )
        for r in df.iter_rows(named=True)
    ]


def sort_events(events: Iterable[Event]) -> list[Event]:
    """The store's order: (step, kind, site)."""
    return sorted(events, key=Event.key)
