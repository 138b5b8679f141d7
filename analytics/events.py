"""What a detector says: one `Event` per anomaly onset (or end), with its evidence.

An event names the step whose values raised it, where (`site`: a metric-name prefix such as
"moe/layer04/expert003", "attn/layer02/head05", "train/loss"), the statistic (`value`) and the
threshold it crossed, a severity, and the step the anomaly began (`onset_step` <= `step`; the
difference is the detection delay in steps). `detail` holds labels and evidence as plain JSON
values. Events compare by value, so the online and offline runs of a detector can be checked
for equality with `==`.

Every event also carries how sure its detector is and why: `confidence` (0..1, the share of the
evidence channels the detector could read that agree; detail["confidence"]) and `evidence`
(detail["evidence"]: one {"channel", "value", "reference", "agrees"} entry per channel). The
decision layer (analytics/decisions.py) adds what was made of it: detail["decision"] (one of
DECISIONS) with its reason, and detail["incident"], the incident the event belongs to.

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
EXPERT_DEATH = "expert_death"  # starved, and its parameters decayed
EXPERT_STARVED = "expert_starved"  # starved for the long window, parameters intact
EXPERT_REVIVAL = "expert_revival"  # a dead expert is fed again
BLOWUP = "blowup"  # one expert's sustained growth (weights and/or activations)
MAXABS_SPIKE = "maxabs_spike"  # one site's max |activation| vs its rolling baseline
BLOWUP_RECOVERED = "blowup_recovered"  # a blown-up site back within its baseline
LR_CHANGE = "lr_change"  # the learning rate jumped: a cause, not a symptom

KINDS = (
    NONFINITE,
    LOSS_SPIKE,
    GRAD_SPIKE,
    ATTN_LOGIT,
    EXPERT_DEATH,
    EXPERT_STARVED,
    EXPERT_REVIVAL,
    BLOWUP,
    MAXABS_SPIKE,
    BLOWUP_RECOVERED,
    LR_CHANGE,
)
GROWTH_KINDS = (BLOWUP, MAXABS_SPIKE)  # activation-growth evidence (what a clamp can answer)
GLOBAL_SITES = ("train/", "grad/global_norm", "optim/")  # site prefixes of run-wide scalars

# what the decision layer made of an event (detail["decision"])
CLAMP = "clamp"  # sustained, localized activation growth: the clip policy acts on it
WARN = "warn"  # an anomaly worth a look; nothing is changed
INFO = "info"  # an end or a recovery
DECISIONS = (CLAMP, WARN, INFO)


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

    @property
    def confidence(self) -> float:
        """How sure the detector is (0..1); 1.0 for detectors with a single certain rule."""
        return float(self.detail.get("confidence", 1.0))

    @property
    def evidence(self) -> list[dict[str, Any]]:
        return list(self.detail.get("evidence", []))

    @property
    def decision(self) -> str:
        """What the decision layer made of it; "" before it has seen the event."""
        return str(self.detail.get("decision", ""))

    @property
    def incident(self) -> int:
        return int(self.detail.get("incident", -1))

    @property
    def is_global(self) -> bool:
        """A run-wide scalar (loss, gradient norm, learning rate), not one place in the model."""
        return self.site.startswith(GLOBAL_SITES) and self.layer < 0

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
