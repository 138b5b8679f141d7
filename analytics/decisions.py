"""The decision layer between detector events and control (DESIGN.md, "Decisions").

Detectors produce evidence; a clamp changes a live training run, so only some evidence may move
one. `Decider.decide(step, events)` links each event into an incident (analytics/incidents.py)
and writes into its detail what was made of it - `decision` (events.CLAMP, WARN or INFO) and
`reason` - before the event is stored or shown to the clip policy:

  clamp  activation growth (a `blowup` event) that is sustained (its rule held over time:
         weights that grew across a measurement period, activations above `runaway` for
         several steps), localized (few experts of the model grow at once) and believed
         (confidence >= `min_confidence`), whose cause is not a learning-rate change, and,
         for the activations rule over several ranks, that at least half the ranks that fed
         the expert see on their own (`rank_votes`: its max|h| >= runaway / 2 x that rank's
         layer median; the reduced max of one rank's outlier over another rank's median is
         no expert's growth - the through-agent run's two independently trained ranks, one
         routing a layer's every token to two experts, clamped at step 142 on that);
  warn   everything else that is an anomaly: one-step max|h| spikes (transients), growth of
         many experts at once (a global cause: the data, the optimizer), growth that follows a
         learning-rate change within `cause_window` steps (the cause is the learning rate, a
         clamp would treat a symptom), activation growth of a routed expert whose weights were
         measured and do not grow beyond their allowance (`weights_agree` False: a healthy
         expert's activation excursion; the through-agent run clamped at step 135 on act_rms
         8.6x while its weights grew x1.018 a period - when the weights then do grow, the
         detector raises a second event, rule weights, `confirms`, which clamps), loss/gradient
         spikes, attention logits, dead experts,
         NaN (severity critical: a clamp cannot fix it);
  info   ends and recoveries.

The clip policy (analytics/clip_policy.py) acts on `clamp` events only. The decider runs as
the last stage of DetectorSet.observe, so online and offline runs make the same decisions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from analytics.events import BLOWUP, CLAMP, INFO, LR_CHANGE, WARN, Event
from analytics.incidents import ONSET_SLACK, Linker, origin_key


@dataclass
class Decider:
    min_confidence: float = 0.3
    """A blow-up event below this confidence warns instead of clamping. The rule that fired is
    one agreeing channel of the (up to three) an expert has, so at 0.3 a fired rule clamps even
    when the others are quiet - the activations agree at 1.3x their reference and lag the
    weights by up to a measurement period on the demo preset; 0.5+ asks for corroboration."""

    cause_window: int = 30
    """Growth beginning up to this many steps after a learning-rate change is blamed on it
    (weights show it one measurement period late, so the window spans a few periods)."""

    onset_slack: int = ONSET_SLACK
    """... and so is growth dated up to this many steps before it: weights date an onset only
    to the measurement period it fell in (K = 10 steps)."""

    link_gap: int = 20
    """Incidents: see analytics/incidents.py (Linker.gap)."""

    _linker: Linker = field(default_factory=Linker, repr=False)
    _lr_steps: list[int] = field(default_factory=list, repr=False)  # recent lr changes

    def __post_init__(self) -> None:
        if not 0 <= self.min_confidence <= 1:
            raise ValueError(f"Decider.min_confidence must be in [0, 1], got {self.min_confidence}")
        for name in ("cause_window", "onset_slack", "link_gap"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Decider.{name} must be a positive integer, got {v!r}")
        self._linker.gap = self.link_gap

    def decide(self, step: int, events: list[Event]) -> list[Event]:
        """The same events (same order), each with decision, reason and incident in detail."""
        out: dict[int, Event] = {}
        for i in sorted(range(len(events)), key=lambda i: origin_key(events[i])):
            e = events[i]
            if e.kind == LR_CHANGE:
                self._lr_steps = [s for s in self._lr_steps if s >= step - self.cause_window]
                self._lr_steps.append(e.step)
            decision, reason = self._judge(e)
            incident = self._linker.link(e)
            detail = {**e.detail, "decision": decision, "reason": reason, "incident": incident}
            out[i] = dataclasses.replace(e, detail=detail)
        return [out[i] for i in range(len(events))]

    def _judge(self, e: Event) -> tuple[str, str]:
        if e.severity == "info":
            return INFO, "an end or recovery"
        if e.kind != BLOWUP:
            if e.detail.get("clip_site"):
                return WARN, "transient: one step above its baseline, not sustained growth"
            return WARN, f"{e.kind}: not activation growth, nothing to clamp"
        lr = [
            s
            for s in self._lr_steps
            if s - self.onset_slack <= e.onset_step <= s + self.cause_window
        ]
        if lr:
            return WARN, f"cause: learning-rate change at step {lr[-1]}"
        if not e.detail.get("sustained", False):
            return WARN, "transient: not sustained"
        votes = e.detail.get("rank_votes")
        if votes and 2 * votes[0] < votes[1]:
            return WARN, (
                f"not seen on the ranks: {votes[0]} of the {votes[1]} ranks that fed it show it"
                " (an artifact of reducing ranks that route differently)"
            )
        if not e.detail.get("localized", False):
            n = e.detail.get("growing_sites", "many")
            return WARN, f"not localized: {n} experts grow at once (a global cause)"
        if e.confidence < self.min_confidence:
            return WARN, f"confidence {e.confidence:.2f} < {self.min_confidence}"
        if e.detail.get("rule") == "activations" and e.detail.get("weights_agree") is False:
            w: dict[str, Any] = next(
                (c for c in e.detail.get("evidence", []) if c["channel"] == "weights"), {}
            )
            return WARN, (
                "activation growth its weights do not show (last period x"
                f"{w.get('period_growth', float('nan')):.3f}, allowance x"
                f"{w.get('reference', float('nan')):.2f}): a clamp waits for the weights"
            )
        return CLAMP, f"sustained, localized growth ({e.detail.get('rule', '?')})"

    def state_dict(self) -> dict[str, Any]:
        return {"linker": self._linker.state_dict(), "lr_steps": list(self._lr_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._linker.load_state_dict(state["linker"])
        self._lr_steps = [int(s) for s in state["lr_steps"]]
