"""Fault injection: reproducible versions of the failures the telemetry must catch.

    --inject KIND@STEP[:key=value,...]      e.g.  blowup@40:layer=8,expert=3,factor=1.3

  dead-expert  from STEP on, every step: the expert's router logit gets a large negative offset
               (its sigmoid score goes to ~0, so it is never selected) and its weights are
               multiplied by `decay` (default 0.5): routing share and parameter norm collapse.
  blowup       from STEP on, every step: the expert's w_up is multiplied by `factor` (default
               1.2), so its activation norm grows geometrically — the localized blow-up of the
               Step 3.5 Flash report. The clamp site (set_clamp) bounds it. With `steps=N` the
               growth lasts N steps and w_up is then divided by the accumulated factor: the cause
               goes away (what a clamp that should relax sees).
  lr-spike     the learning rate is multiplied by `factor` (default 30) for `steps` steps
               (default 5) starting at STEP.
  nan          at STEP a non-finite value appears: site=activation (default) poisons the routed
               output of every token sent to the expert during that one step (the loss and the
               residual stream go NaN; the loop skips that update); site=hidden does it inside
               the expert - one element of its w_up is NaN for that one step, so the expert's own
               SwiGLU activations (and their statistics) are the first non-finite values, as when
               an expert overflows; site=weight writes NaN into one element of the expert's
               w_down for good.

layer / expert default to the deepest MoE layer and expert 0 (dead-expert, blowup, nan).
Faults are applied by the training loop on every rank identically, under no_grad, right
before the forward of a step (after monitor.step_begin).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from model.moe import MoE


@dataclass
class Fault:
    step: int
    layer: int | None = None  # None -> deepest MoE layer
    expert: int = 0
    kind = "fault"

    def __post_init__(self) -> None:
        if self.step < 0:
            raise ValueError(f"{self.kind}: step must be >= 0, got {self.step}")
        if self.expert < 0:
            raise ValueError(f"{self.kind}: expert must be >= 0, got {self.expert}")

    def target(self, model: nn.Module) -> tuple[int, MoE]:
        """The (layer index, MoE) this fault hits, validated against the model."""
        moe_layers = dict(model.moe_layers())
        if not moe_layers:
            raise ValueError(f"{self.kind}: the model has no MoE layer")
        layer = max(moe_layers) if self.layer is None else self.layer
        if layer not in moe_layers:
            raise ValueError(
                f"{self.kind}: layer {layer} is not an MoE layer (MoE layers: {sorted(moe_layers)})"
            )
        moe = moe_layers[layer]
        if self.expert >= moe.n_experts:
            raise ValueError(
                f"{self.kind}: expert {self.expert} out of range "
                f"(layer {layer} has {moe.n_experts} experts)"
            )
        return layer, moe

    def before_step(self, step: int, model: nn.Module) -> None:
        """Mutate the model for `step` (called under no_grad before its forward)."""

    def lr_multiplier(self, step: int) -> float:
        return 1.0


@dataclass
class DeadExpert(Fault):
    kind = "dead-expert"
    decay: float = 0.5
    logit_offset: float = -30.0  # sigmoid(-30) ~ 1e-13: never in the top-k

    def before_step(self, step: int, model: nn.Module) -> None:
        if step < self.step:
            return
        _, moe = self.target(model)
        e = self.expert
        moe.router.logit_offset_E[e] = self.logit_offset
        for w in (moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down):
            w[e].mul_(self.decay)


@dataclass
class Blowup(Fault):
    kind = "blowup"
    factor: float = 1.2
    steps: int = 0  # 0 = for good; N: N steps of growth, then w_up is scaled back

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factor <= 1:
            raise ValueError(f"blowup: factor must be > 1, got {self.factor}")
        if self.steps < 0:
            raise ValueError(f"blowup: steps must be >= 0, got {self.steps}")

    def before_step(self, step: int, model: nn.Module) -> None:
        if step < self.step:
            return
        _, moe = self.target(model)
        if not self.steps or step < self.step + self.steps:
            moe.experts.w_up[self.expert].mul_(self.factor)
        elif step == self.step + self.steps:  # the cause goes away
            moe.experts.w_up[self.expert].div_(self.factor**self.steps)


@dataclass
class LrSpike(Fault):
    kind = "lr-spike"
    factor: float = 30.0
    steps: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factor <= 0 or self.steps < 1:
            raise ValueError(
                f"lr-spike: need factor > 0 and steps >= 1, got {self.factor}, {self.steps}"
            )

    def lr_multiplier(self, step: int) -> float:
        return self.factor if self.step <= step < self.step + self.steps else 1.0


@dataclass
class NanFault(Fault):
    kind = "nan"
    site: str = "activation"
    _handle: object = field(default=None, repr=False, compare=False)

    _saved: float | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.site not in ("activation", "hidden", "weight"):
            raise ValueError(
                f"nan: site must be 'activation', 'hidden' or 'weight', got {self.site!r}"
            )

    def before_step(self, step: int, model: nn.Module) -> None:
        if self._handle is not None:  # the one-shot hook of the previous step, if it never fired
            self._handle.remove()
            self._handle = None
        _, moe = self.target(model)
        if self._saved is not None:  # site=hidden: the poisoned element back, one step later
            moe.experts.w_up[self.expert].view(-1)[0] = self._saved
            self._saved = None
        if step != self.step:
            return
        if self.site == "hidden":
            self._saved = float(moe.experts.w_up[self.expert].view(-1)[0])
            moe.experts.w_up[self.expert].view(-1)[0] = float("nan")
            return
        if self.site == "weight":
            moe.experts.w_down[self.expert].view(-1)[0] = float("nan")
            return
        expert = self.expert

        def poison(module, args, output):
            self._handle.remove()
            self._handle = None
            routed_TD, counts_E = output
            hit_T1 = (args[1] == expert).any(dim=-1, keepdim=True)
            return torch.where(
                hit_T1, torch.full_like(routed_TD, float("nan")), routed_TD
            ), counts_E

        self._handle = moe.experts.register_forward_hook(poison)


KINDS: dict[str, type[Fault]] = {cls.kind: cls for cls in (DeadExpert, Blowup, LrSpike, NanFault)}
_NO_TARGET = {"lr-spike"}  # kinds for which layer / expert mean nothing


def parse_fault(spec: str) -> Fault:
    """Parse `KIND@STEP[:key=value,...]` into a Fault; clear ValueError on anything else."""
    head, _, opts = spec.partition(":")
    kind, at, step_text = head.partition("@")
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r} in {spec!r}; kinds: {sorted(KINDS)}")
    if not at or not step_text.isdigit():
        raise ValueError(f"fault {spec!r}: expected KIND@STEP with STEP a non-negative integer")
    cls = KINDS[kind]
    allowed = {f.name for f in fields(cls) if not f.name.startswith("_")} - {"step"}
    if kind in _NO_TARGET:
        allowed -= {"layer", "expert"}
    kwargs: dict[str, object] = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise ValueError(
                f"fault {spec!r}: bad option {item!r}; {kind} accepts "
                f"{sorted(allowed)} as key=value"
            )
        kwargs[key] = _convert(spec, key, value)
    return cls(step=int(step_text), **kwargs)


def _convert(spec: str, key: str, value: str) -> object:
    try:
        if key in ("layer", "expert", "steps"):
            return int(value)
        if key == "site":
            return value
        return float(value)
    except ValueError:
        raise ValueError(f"fault {spec!r}: option {key}={value!r} is not a number") from None


def apply_faults(faults: list[Fault], step: int, model: nn.Module) -> None:
    with torch.no_grad():
        for fault in faults:
            fault.before_step(step, model)


def lr_multiplier(faults: list[Fault], step: int) -> float:
    mult = 1.0
    for fault in faults:
        mult *= fault.lr_multiplier(step)
    return mult
