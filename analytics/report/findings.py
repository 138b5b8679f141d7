"""What the report says, as data: read a stored run once, replay the detectors, explain.

`collect(store, run)` reads every step (analytics/offline.py's frames) into a dense
[steps x metrics] matrix, runs the detectors over it (the offline twin of the collector's
online run) and compares their events with the stored ones. `findings(data)` then derives the
machine-readable answer the HTML page renders and the JSON twin carries: run summary, the
incidents (events linked by site and time, analytics/incidents.py), each with its origin - the
headline incident's origin is "where it started" -, dead experts with onset and evidence,
blow-ups with what the decision layer made of them, the clip thresholds applied and their
effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from analytics.catalog import MetricIndex
from analytics.detectors import DetectorSet
from analytics.events import (
    BLOWUP_RECOVERED,
    EXPERT_DEATH,
    EXPERT_REVIVAL,
    GROWTH_KINDS,
    Event,
    from_frame,
    sort_events,
)
from analytics.incidents import summarize
from analytics.offline import iter_frames


@dataclass
class RunData:
    run: str
    info: dict
    index: MetricIndex
    steps: np.ndarray  # int64 [S]
    values: np.ndarray  # float64 [S, M], NaN where absent
    step_status: list[dict]
    stored_events: list[Event]
    offline_events: list[Event]
    clips: list[dict] = field(default_factory=list)

    def series(self, name: str) -> np.ndarray:
        i = self.index.find(name)
        return self.values[:, i] if i >= 0 else np.full(self.steps.size, np.nan)

    @property
    def events(self) -> list[Event]:
        """The stored (online) events when the collector detected, else the offline ones."""
        return self.stored_events if self.stored_events else self.offline_events


def collect(store, run: str) -> RunData:
    index = MetricIndex.from_frame(store.metrics(run))
    detectors = DetectorSet()
    steps, rows, offline = [], [], []
    for frame in iter_frames(store, run, index):
        offline += detectors.observe(frame, index)
        steps.append(frame.step)
        rows.append(np.where(frame.present, frame.values, np.nan))
    info = store.runs().filter(run=run).row(0, named=True)
    values = np.vstack(rows) if rows else np.zeros((0, index.size))
    return RunData(
        run=run,
        info=info,
        index=index,
        steps=np.asarray(steps, np.int64),
        values=values,
        step_status=store.steps(run).to_dicts(),
        stored_events=sort_events(from_frame(store.events(run), run)),
        offline_events=sort_events(offline),
        clips=store.clips(run).to_dicts(),
    )


def _num(v) -> float | str | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else str(v)


def event_dict(e: Event) -> dict:
    return {
        "kind": e.kind,
        "step": e.step,
        "onset_step": e.onset_step,
        "delay": e.delay,
        "site": e.site,
        "value": _num(e.value),
        "threshold": _num(e.threshold),
        "severity": e.severity,
        "confidence": e.confidence,
        "decision": e.decision,
        "reason": e.detail.get("reason", ""),
        "incident": e.incident,
        "detail": e.detail,
    }


def summary(d: RunData) -> dict:
    loss = d.series("train/loss")
    finite = loss[np.isfinite(loss)]
    kinds: dict[str, int] = {}
    for e in d.events:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    return {
        "run": d.run,
        "world_size": d.info["world_size"],
        "status": d.info["status"],
        "steps": int(d.steps.size),
        "first_step": int(d.steps[0]) if d.steps.size else None,
        "last_step": int(d.steps[-1]) if d.steps.size else None,
        "incomplete_steps": sum(1 for s in d.step_status if not s["complete"]),
        "metrics": d.index.size,
        "moe_layers": d.index.moe_layers,
        "loss_first": _num(finite[0]) if finite.size else None,
        "loss_last": _num(finite[-1]) if finite.size else None,
        "loss_min": _num(finite.min()) if finite.size else None,
        "nonfinite_loss_steps": [int(s) for s in d.steps[~np.isfinite(loss)]]
        if d.index.find("train/loss") >= 0
        else [],
        "events_by_kind": kinds,
        "event_source": "online (stored by the collector)"
        if d.stored_events
        else "offline (replayed from the store)",
        "offline_matches_online": (d.offline_events == d.stored_events)
        if d.stored_events
        else None,
    }


def dead_experts(d: RunData) -> list[dict]:
    out = []
    for e in d.events:
        if e.kind != EXPERT_DEATH:
            continue
        revived = next(
            (
                r.step
                for r in d.events
                if r.kind == EXPERT_REVIVAL and r.site == e.site and r.step > e.step
            ),
            None,
        )
        out.append(
            {
                "site": e.site,
                "layer": e.layer,
                "expert": e.expert,
                "onset_step": e.onset_step,
                "detected_step": e.step,
                "delay": e.delay,
                "evidence": {
                    k: e.detail.get(k)
                    for k in (
                        "path",
                        "starved_steps",
                        "share",
                        "rms_ratio",
                        "param_norm_ratio",
                        "param_norm_step",
                    )
                },
                "revived_step": revived,
            }
        )
    return out


def blowups(d: RunData) -> list[dict]:
    """One entry per site that raised activation-growth evidence (its first event, or its
    first clamp decision), with what was decided, the clips of its (layer, clamp site) decided
    from then on and the effect on the site's max|h|."""
    out, seen = [], set()
    growth = [e for e in d.events if e.kind in GROWTH_KINDS]
    chosen: dict[str, Event] = {}
    for e in growth:  # a site's clamp decision if it had one, else its first event
        if e.site not in chosen or (e.decision == "clamp" and chosen[e.site].decision != "clamp"):
            chosen[e.site] = e
    for e in sorted(chosen.values(), key=lambda e: (e.step, e.site)):
        if e.site in seen:
            continue
        seen.add(e.site)
        layer, clip_site = e.detail.get("layer"), e.detail.get("clip_site")
        clips = [
            c
            for c in d.clips
            if c["layer"] == layer and c["site"] == clip_site and c["step"] >= e.step
        ]
        maxabs = d.series(f"{e.site}/act_maxabs")
        entry = {
            "site": e.site,
            "kind": e.kind,
            "layer": layer,
            "expert": e.expert,
            "clip_site": clip_site,
            "decision": e.decision,
            "reason": e.detail.get("reason", ""),
            "confidence": e.confidence,
            "rule": e.detail.get("rule"),
            "onset_step": e.onset_step,
            "detected_step": e.step,
            "value_at_detection": _num(e.value),
            "threshold": _num(e.threshold),
            "recovered_step": next(
                (
                    r.step
                    for r in d.events
                    if r.kind == BLOWUP_RECOVERED
                    and r.site == e.site
                    and r.step > e.step
                    and r.detail.get("of") == e.detail.get("detector", e.kind)
                ),
                None,
            ),
            "clips": [
                {
                    "version": c["version"],
                    "limit": _num(c["limit"]),
                    "bound_maxabs": _num(c["limit"] ** 2) if math.isfinite(c["limit"]) else "inf",
                    "acked_step": c["acked_step"],
                    "reason": c["reason"],
                }
                for c in clips
            ],
        }
        first = next((c for c in clips if math.isfinite(c["limit"])), None)
        after_from = first["acked_step"] if first and first["acked_step"] >= 0 else None
        if first is not None and after_from is not None:
            after = maxabs[d.steps >= after_from]
            after = after[np.isfinite(after)]
            bound = first["limit"] ** 2
            entry["effect"] = {
                "clip_in_effect_from": after_from,
                "max_after_clip": _num(after.max()) if after.size else None,
                "bound": _num(bound),
                "bounded": bool(after.size and after.max() <= bound * (1 + 1e-5)),
                "last_value": _num(after[-1]) if after.size else None,
            }
        else:
            later = maxabs[d.steps >= e.step]
            later = later[np.isfinite(later)]
            entry["effect"] = {
                "clip_in_effect_from": None,
                "max_after_detection": _num(later.max()) if later.size else None,
                "growth_since_detection": _num(later[-1] / later[0])
                if later.size and later[0] > 0
                else None,
                "note": "no clip applied (observe-only, frozen, or the collector did not "
                "detect online)",
            }
        out.append(entry)
    return out


def origin(d: RunData, incidents: list[dict]) -> dict | None:
    """Where it started: the headline incident's origin (the most severe incident, one that
    moved a clamp before one that did not, the earliest among equals)."""
    if not incidents:
        return None
    inc = incidents[0]
    o = inc["origin"]
    return {
        "step": o["onset_step"],
        "site": o["site"],
        "kind": o["kind"],
        "layer": o["layer"],
        "expert": o["expert"],
        "ranks": o["ranks"],
        "detected_step": o["detected_step"],
        "incident": inc["id"],
        "cause": inc["cause"],
        "explanation": inc["explanation"]
        + (f"; {len(incidents) - 1} other incident(s)" if len(incidents) > 1 else ""),
    }


def findings(d: RunData) -> dict:
    anomalies = [e for e in d.events if e.severity != "info"]
    incidents = [i.to_dict() for i in summarize(anomalies)] if anomalies else []
    return {
        "summary": summary(d),
        "origin": origin(d, incidents),
        "incidents": incidents,
        "dead_experts": dead_experts(d),
        "blowups": blowups(d),
        "events": [event_dict(e) for e in d.events],
        "clips": [{k: _num(v) if k == "limit" else v for k, v in c.items()} for c in d.clips],
    }
