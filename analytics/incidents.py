"""Incidents: events linked by site and time, each with its own origin.

One anomaly shows up in many places: a blowing-up expert raises a blow-up event, then a
max|h| spike, a gradient spike, a loss spike, perhaps a NaN. `Linker` puts an event into an
existing incident when both

  site  it is the same site or the same layer, and the event began within `gap` steps of the
        incident (from `gap` before its first evidence to `gap` after its latest step): an
        expert of that layer starved since step 11 and reported at step 210 is a condition of
        its own, not part of a blow-up there at step 150; or
  time  the event is run-wide (loss, gradient norm, learning rate: `Event.is_global`), or the
        incident's origin is (a learning-rate change and what follows it anywhere in the
        model), and the event began within `gap` steps of the incident's evidence (from `gap`
        before its first onset - ONSET_SLACK for what follows a run-wide cause - to `gap` after
        its latest onset: a gradient spike 70 steps after an expert began to starve is not its
        consequence) - a run-wide event joins the most related incident, it never merges two;

otherwise the event opens a new incident. Unrelated anomalies (a starved expert of layer 7
since step 6, a blow-up in layer 8 at step 150) stay apart. An incident's origin is its
earliest evidence: the lowest onset step, ties going to causes (a learning-rate change), then
to the earlier layer of the forward pass, then to run-wide symptoms. A learning-rate change
counts as earlier than growth dated up to ONSET_SLACK steps before it: weights date the onset
of growth only to the measurement period it fell in (analytics/detectors/blowup.py). For the
same reason a run-wide symptom (a loss or gradient-norm spike, a non-finite loss) counts as
later than evidence at a place in the model dated up to ONSET_SLACK steps after it: the spike is
what growth there shows up as, and "where it started" names the place.

The linker runs inside the decision layer (analytics/decisions.py) online and offline alike,
and each event stores its incident id (detail["incident"]), so `summarize(events)` rebuilds the
same incidents from stored events anywhere: the report, its JSON twin, the dashboard,
`python -m analytics events`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from analytics.events import BLOWUP_RECOVERED, CLAMP, EXPERT_REVIVAL, LR_CHANGE, Event

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
ONSET_SLACK = 10  # steps: the resolution of an onset dated by parameter norms (every K = 10)
ENDINGS = (BLOWUP_RECOVERED, EXPERT_REVIVAL)  # they close an anomaly, they do not start one


def origin_key(e: Event) -> tuple:
    """Sort key of "earliest evidence": onset, then causes, then the forward pass."""
    cause = e.kind == LR_CHANGE
    symptom = e.is_global and not cause  # loss, gradient norm: run-wide, never a place
    place = (0, e.layer, e.expert) if e.layer >= 0 else (1, 0, 0)
    onset = e.onset_step - ONSET_SLACK * cause + ONSET_SLACK * symptom
    return (onset, not cause, place, e.step, e.kind, e.site)


@dataclass
class _Open:
    """What the linker remembers of an incident (plain values: it survives a restart)."""

    id: int
    first: int
    last: int
    wide: bool  # its origin is run-wide
    last_onset: int = -1
    layers: list[int] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    origin: tuple = ()  # origin_key of its earliest evidence


@dataclass
class Linker:
    gap: int = 20
    """Steps after an incident's latest step within which a new event may still join it."""

    keep: int = 256
    """Incidents remembered for linking (the most recently opened)."""

    _open: list[_Open] = field(default_factory=list, repr=False)
    _next: int = field(default=0, repr=False)

    def link(self, e: Event) -> int:
        """The incident id of `e` (a new one if nothing fits); updates the incident."""
        g = self.gap

        def fits(o: _Open) -> bool:
            if e.site in o.sites or (e.layer >= 0 and e.layer in o.layers):
                return o.first - g <= e.onset_step <= o.last + g
            if e.is_global:
                return o.first - g <= e.onset_step <= o.last_onset + g
            if o.wide:  # a consequence of a run-wide cause begins after it
                return o.first - ONSET_SLACK <= e.onset_step <= o.last_onset + g
            return False

        near = [o for o in self._open if fits(o)]
        if near:
            best = max(near, key=lambda o: (e.site in o.sites, e.layer in o.layers, o.last, o.id))
        else:
            best = _Open(self._next, e.onset_step, e.step, e.is_global, origin=origin_key(e))
            self._next += 1
            self._open.append(best)
        if origin_key(e) < best.origin:
            best.origin, best.wide = origin_key(e), e.is_global
        best.first = min(best.first, e.onset_step)
        best.last_onset = max(best.last_onset, e.onset_step)
        best.last = max(best.last, e.step)
        if e.layer >= 0 and e.layer not in best.layers:
            best.layers.append(e.layer)
        if not e.is_global and e.site not in best.sites:
            best.sites.append(e.site)
        del self._open[: -self.keep]  # bounded state: the most recent incidents
        return best.id

    def state_dict(self) -> dict[str, Any]:
        return {
            "next": self._next,
            "open": [
                [o.id, o.first, o.last, o.wide, o.last_onset, list(o.layers), list(o.sites)]
                + [list(o.origin)]
                for o in self._open
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._next = int(state["next"])
        self._open = [
            _Open(int(i), int(f), int(t), bool(w), int(lo), list(ls), list(ss), _key(k))
            for i, f, t, w, lo, ls, ss, k in state["open"]
        ]


def _key(k: list) -> tuple:
    """An origin_key back from its JSON-able list form."""
    return (k[0], k[1], tuple(k[2]), *k[3:])


@dataclass
class Incident:
    id: int
    origin: Event
    events: list[Event]

    @property
    def first_step(self) -> int:
        return self.origin.onset_step

    @property
    def last_step(self) -> int:
        return max(e.step for e in self.events)

    @property
    def severity(self) -> str:
        return max((e.severity for e in self.events), key=SEVERITY_RANK.__getitem__)

    @property
    def clamped(self) -> bool:
        return any(e.decision == CLAMP for e in self.events)

    @property
    def cause(self) -> str:
        """What the origin says the incident is: "learning rate", "activation growth", ..."""
        return {
            LR_CHANGE: "learning rate",
            "blowup": "activation growth",
            "maxabs_spike": "activation spike",
            "expert_death": "expert death",
            "expert_starved": "expert starvation",
            "nonfinite": "non-finite values",
            "loss_spike": "loss spike",
            "grad_spike": "gradient spike",
            "attn_logit_growth": "attention logits",
        }.get(self.origin.kind, self.origin.kind)

    def rank(self) -> tuple:
        """Headline order: a critical incident first, then one that moved a clamp, then
        warnings; the earlier first among equals."""
        return (-SEVERITY_RANK[self.severity], not self.clamped, self.first_step, self.id)

    def explanation(self) -> str:
        o = self.origin
        where = o.site + (f" (expert {o.expert})" if o.expert >= 0 else "")
        others = sorted({e.site for e in self.events if e is not o and e.site != o.site})
        text = (
            f"incident {self.id}: {o.kind} at {where} began at step {o.onset_step} "
            f"(detected at step {o.step}); cause: {self.cause}"
        )
        if others:
            text += f"; {len(self.events) - 1} later event(s) at {len(others)} other site(s)"
        return text + ("; a clamp answered it" if self.clamped else "")

    def to_dict(self) -> dict[str, Any]:
        o = self.origin
        return {
            "id": self.id,
            "origin": {
                "kind": o.kind,
                "site": o.site,
                "layer": o.layer,
                "expert": o.expert,
                "onset_step": o.onset_step,
                "detected_step": o.step,
                "ranks": o.detail.get("ranks"),
            },
            "cause": self.cause,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "severity": self.severity,
            "clamped": self.clamped,
            "events": len(self.events),
            "kinds": sorted({e.kind for e in self.events}),
            "sites": sorted({e.site for e in self.events}),
            "explanation": self.explanation(),
        }


def summarize(events: Iterable[Event], gap: int = 20) -> list[Incident]:
    """Incidents of a run's events, by their stored incident ids (events without one - a run
    stored before the decision layer existed - are linked here, in step order); headline
    first (`Incident.rank`)."""
    events = sorted(events, key=lambda e: (e.step, e.onset_step))
    if any(e.incident < 0 for e in events):
        linker = Linker(gap)
        ids = {id(e): linker.link(e) for e in events}
    else:
        ids = {id(e): e.incident for e in events}
    groups: dict[int, list[Event]] = {}
    for e in events:
        groups.setdefault(ids[id(e)], []).append(e)
    out = []
    for i, evs in groups.items():
        starts = [e for e in evs if e.kind not in ENDINGS] or evs
        out.append(Incident(i, min(starts, key=origin_key), evs))
    return sorted(out, key=Incident.rank)
