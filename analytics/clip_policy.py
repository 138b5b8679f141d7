"""ClipPolicy: turns clamp decisions into SwiGLU clamp settings, and relaxes them.

The remedy of Step 3.5 Flash (StepFun, 2026, section 4.1 and appendix B) for localized
activation blow-ups is activation clipping inside the expert SwiGLU:

    h = min(silu(x W_gate^T), L) * clamp(x W_up^T, -L, L)        (model/moe.py, per layer and
                                                                   site "routed" | "shared")

with L = 7 published for routed experts of the full-size model. A clamp at L bounds |h| by
L^2 (silu is >= -0.28), whatever the weights do. We derive L from the site's healthy scale
instead of a constant, so it fits any model size: with B the largest healthy max|h| among the
layer's experts (detectors report it as `layer_baseline_maxabs`),

    L = max(floor, sqrt(margin * B))      =>  the clamp's bound L^2 sits `margin` x above B.

Healthy experts of the layer are thus left (almost) alone while the blown-up one is held
below margin x its layer's healthy maximum. A site is one (layer, "routed"|"shared") clamp.
The policy acts only on events the decision layer marked `clamp` (analytics/decisions.py:
sustained, localized activation growth that no learning-rate change explains); everything
else only warns.

Relaxing: when every site that triggered a clamp has recovered (a `blowup_recovered` event)
and `relax_after` more steps pass without a new trigger, the clamp is switched off (limit
inf). A clamp that is still binding is not relaxed: "recovered" under a clamp can mean only that
the clamp is doing its job while the weights underneath keep growing (the injected blow-up of
model/ does exactly that), and switching it off then releases the whole growth at once. So while
the max|h| (after the clamp) of the experts that triggered it is at least `binding_fraction` of
the bound L^2, the calm window restarts (the caller passes it as `site_maxabs`, see
`site_readings`). Only those experts count: the layer's healthy experts may well sit at half the
bound for good (L^2 = margin x their maximum), and a clamp that no longer holds anything back
must relax. A clamp on `up` alone does not show in max|h| (silu(gate) x L stays small while W_up
keeps growing), so the weights are watched too: when the largest parameter norm of those experts
(`site_param_norm`, measured every K steps) has grown by more than `param_growth` since the calm
window (re)started, it restarts again. A site that blows up again is
clamped again. While a clamp is in force, a trigger from a
site it already answered is ignored (two detectors see one blow-up); a trigger from another
expert of the same layer halves the limit (down to the floor). Operators may freeze a site
(the policy leaves it alone) or set/clear it (collector/control plane); the policy only
advises: `step()` returns decisions, the caller sends them (observe-only: just logs them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analytics.catalog import MetricIndex
from analytics.events import BLOWUP_RECOVERED, CLAMP, Event
from analytics.frame import StepFrame

SITES = ("routed", "shared")
Key = tuple[int, str]


@dataclass(frozen=True)
class ClipDecision:
    layer: int
    site: str  # "routed" | "shared"
    limit: float  # L; inf = off
    step: int  # the step it was decided at (the event's step)
    reason: str  # the event that caused it, or the relaxation
    event: Event | None = None


@dataclass
class ClipPolicy:
    margin: float = 4.0
    """The clamp's hard bound on |h| (L^2) is this many times the layer's healthy max|h|."""

    floor: float = 1.0
    """Never clamp below this L (a degenerate baseline must not switch an expert off)."""

    relax_after: int = 100
    """Steps after the last triggering site recovered before the clamp is removed."""

    binding_fraction: float = 0.5
    """A clamped site whose max|h| reaches this fraction of the clamp's bound L^2 is still held
    by the clamp: its calm window restarts, so it is never relaxed while binding."""

    param_growth: float = 0.25
    """Relative growth of the site's largest expert parameter norm, since the calm window
    (re)started, that restarts it: weights still growing under the clamp are not calm."""

    _limits: dict[Key, float] = field(default_factory=dict, repr=False)
    _alarms: dict[Key, list[str]] = field(default_factory=dict, repr=False)
    _triggers: dict[Key, list[str]] = field(default_factory=dict, repr=False)  # of the clamp
    _calm_since: dict[Key, int] = field(default_factory=dict, repr=False)
    _frozen: set[Key] = field(default_factory=set, repr=False)
    _norm_ref: dict[Key, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("margin", "floor", "binding_fraction", "param_growth"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"ClipPolicy.{name} must be a positive number, got {v!r}")
        if not isinstance(self.relax_after, int) or self.relax_after < 1:
            raise ValueError(
                f"ClipPolicy.relax_after must be an int >= 1, got {self.relax_after!r}"
            )

    # ---- the policy ---------------------------------------------------------------------
    def limit_for(self, event: Event) -> float:
        base = event.detail.get("layer_baseline_maxabs")
        if not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0:
            base = event.detail.get("baseline_maxabs")
        if not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0:
            return self.floor
        return max(self.floor, math.sqrt(self.margin * base))

    def step(
        self,
        step: int,
        events: list[Event],
        site_maxabs: Mapping[Key, float] | None = None,
        site_param_norm: Mapping[Key, float] | None = None,
    ) -> list[ClipDecision]:
        """Decisions for one step's events (at most one per site), then due relaxations.
        site_maxabs: this step's max|h| of clamped sites (see `clamped()`); NaN counts as
        binding. site_param_norm: the largest expert parameter norm of clamped sites, on the
        steps it was measured. Without them, relaxation goes by the recovery events alone."""
        out: dict[Key, ClipDecision] = {}
        for ev in events:
            key = _key(ev)
            if key is None:
                continue
            if ev.decision == CLAMP:
                alarms = self._alarms.setdefault(key, [])
                tag = f"{ev.detail.get('detector', ev.kind)} {ev.site}"  # whose alarm
                known = ev.site in self._triggers.get(key, [])  # this clamp answered it
                if tag not in alarms:
                    alarms.append(tag)
                self._calm_since.pop(key, None)
                if key in self._frozen or key in out:
                    continue
                triggers = self._triggers.setdefault(key, [])
                if ev.site not in triggers:
                    triggers.append(ev.site)
                want = self.limit_for(ev)
                current = self._limits.get(key, math.inf)
                if current < math.inf:
                    if known:  # already answered by this clamp
                        continue
                    want = max(self.floor, min(want, current / 2))  # another site blows up
                    # under the clamp
                if want < current:
                    out[key] = ClipDecision(
                        key[0], key[1], want, step, f"{ev.kind}@{ev.step} {ev.site}", ev
                    )
            elif ev.kind == BLOWUP_RECOVERED and key in self._alarms:
                alarms = self._alarms[key]  # the end of the alarm that triggered, not another
                tag = f"{ev.detail.get('of', '')} {ev.site}"
                if tag in alarms:
                    alarms.remove(tag)
                    if not alarms:
                        self._calm_since[key] = step
        for key, d in out.items():
            self._limits[key] = d.limit
        for key, m in (site_maxabs or {}).items():
            limit = self._limits.get(key, math.inf)
            if (
                key in self._calm_since
                and limit < math.inf
                and not m < self.binding_fraction * limit * limit
            ):
                self._calm_since[key] = step  # still binding: the window restarts
        for key, norm in (site_param_norm or {}).items():
            if key not in self._calm_since or not math.isfinite(norm):
                continue
            ref = self._norm_ref.get(key)
            if ref is None or norm <= ref * (1 + self.param_growth):
                self._norm_ref.setdefault(key, norm)
            else:  # weights still growing: not calm
                self._calm_since[key] = step
                self._norm_ref[key] = norm
        for key, since in list(self._calm_since.items()):
            if step - since >= self.relax_after and key not in out:
                del self._calm_since[key]
                self._norm_ref.pop(key, None)
                self._alarms.pop(key, None)
                self._triggers.pop(key, None)
                if key in self._limits and key not in self._frozen:
                    del self._limits[key]
                    out[key] = ClipDecision(
                        key[0],
                        key[1],
                        math.inf,
                        step,
                        f"relax: {key[1]} clamp of layer {key[0]} healthy since step {since}",
                    )
        return list(out.values())

    # ---- operators -------------------------------------------------------------------------
    def freeze(self, layer: int, site: str) -> None:
        """The policy no longer changes this site (whatever its limit is now)."""
        self._frozen.add(_check(layer, site))

    def unfreeze(self, layer: int, site: str) -> None:
        self._frozen.discard(_check(layer, site))

    def operator_set(self, layer: int, site: str, limit: float | None) -> None:
        """An operator's limit (None/inf = off): recorded and frozen."""
        key = _check(layer, site)
        if limit is None or not math.isfinite(limit) or limit <= 0:
            self._limits.pop(key, None)
        else:
            self._limits[key] = float(limit)
        self._frozen.add(key)

    def operator_clear(self, layer: int, site: str) -> None:
        """An operator switched the site off and handed it back to the policy."""
        key = _check(layer, site)
        self._limits.pop(key, None)
        self._frozen.discard(key)
        self._alarms.pop(key, None)
        self._triggers.pop(key, None)
        self._calm_since.pop(key, None)

    def clamped(self) -> list[Key]:
        """Sites with a clamp in force: the ones whose max|h| `step()` wants to hear about."""
        return sorted(k for k, v in self._limits.items() if v < math.inf)

    def watched(self) -> dict[Key, list[str]]:
        """Clamped sites -> the expert sites whose readings tell whether the clamp still binds:
        the ones that triggered it (a clamp an operator set: every expert of the layer)."""
        return {k: list(self._triggers.get(k, [])) for k in self.clamped()}

    @property
    def frozen(self) -> list[Key]:
        return sorted(self._frozen)

    def limits(self) -> dict[Key, float]:
        return dict(self._limits)

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "limits": [[l, s, v] for (l, s), v in sorted(self._limits.items())],
            "alarms": [[l, s, list(v)] for (l, s), v in sorted(self._alarms.items())],
            "calm_since": [[l, s, v] for (l, s), v in sorted(self._calm_since.items())],
            "frozen": [list(k) for k in sorted(self._frozen)],
            "norm_ref": [[l, s, v] for (l, s), v in sorted(self._norm_ref.items())],
            "triggers": [[l, s, list(v)] for (l, s), v in sorted(self._triggers.items())],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._limits = {(int(l), s): float(v) for l, s, v in state["limits"]}
        self._alarms = {(int(l), s): list(v) for l, s, v in state["alarms"]}
        self._calm_since = {(int(l), s): int(v) for l, s, v in state["calm_since"]}
        self._frozen = {(int(l), s) for l, s in state["frozen"]}
        self._norm_ref = {(int(l), s): float(v) for l, s, v in state.get("norm_ref", [])}
        self._triggers = {(int(l), s): list(v) for l, s, v in state.get("triggers", [])}


def _key(ev: Event) -> Key | None:
    site = ev.detail.get("clip_site")
    layer = ev.detail.get("layer")
    if site not in SITES or not isinstance(layer, int) or layer < 0:
        return None
    return (layer, site)


def _check(layer: int, site: str) -> Key:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"clip layer must be an integer >= 0, got {layer!r}")
    if site not in SITES:
        raise ValueError(f"clip site must be one of {SITES}, got {site!r}")
    return (layer, site)


def site_readings(
    frame: StepFrame, index: MetricIndex, watched: Mapping[Key, list[str]]
) -> tuple[dict[Key, float], dict[Key, float]]:
    """This step's (max|h|, largest parameter norm) of the experts that triggered each clamped
    site (`ClipPolicy.watched()`), what `step()` takes as site_maxabs / site_param_norm. NaN
    propagates (a non-finite max|h| counts as binding); a reading not measured this step
    (parameter norms: every K steps) is left out."""
    maxabs: dict[Key, float] = {}
    norms: dict[Key, float] = {}
    for key, sites in watched.items():
        for out, names in (
            (maxabs, [f"{s}/act_maxabs" for s in sites]),
            (norms, [f"params/{s[len('moe/') :]}/fro_norm" for s in sites if "/expert" in s]),
        ):
            ids = np.array([index.find(n) for n in names], np.int64)
            ids = ids[(ids >= 0) & (ids < frame.size)]
            ids = ids[frame.present[ids]]
            if ids.size:
                out[key] = float(np.max(frame.take(ids)))
    return maxabs, norms
