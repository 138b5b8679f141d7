"""Where every statistic lives in the one flat float32 buffer, and what it is called on the wire.

The buffer has three parts, in this order:

    [ step metrics (schema 1) | periodic metrics (schema 2) | scratch accumulators ]

Schema 1 is sent every step, schema 2 only on steps with step % K == 0; scratch holds the running
sums that `finalize` turns into means, and is never copied to the host. Each statistic family is
one contiguous region ordered (layer, expert) or (layer, head), so a hook writes a whole vector
with one kernel and the per-step finalize is a handful of vectorised ops, however many experts.
The schema's metric order is exactly the buffer order: the packed vector on the wire is the
buffer's prefix, unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

STEP_SCHEMA_ID = 1
PERIODIC_SCHEMA_ID = 2
NAN = math.nan
NEG_INF = -math.inf

_PART_ORDER = ("step", "periodic", "scratch")


@dataclass(frozen=True)
class MetricSpec:
    """One metric of a schema: a MetricDef without the protobuf (the encoder makes those)."""

    name: str
    reduce: str  # "sum" | "mean" | "max" | "min": across ranks
    stat: str
    layer: int = -1
    expert: int = -1
    head: int = -1
    unit: str = ""


@dataclass
class Region:
    """A contiguous slice of the buffer; `start` is assigned when the layout is built."""

    key: str
    part: str
    size: int
    init: float
    specs: list[MetricSpec] = field(default_factory=list)
    start: int = -1

    @property
    def stop(self) -> int:
        return self.start + self.size


class Layout:
    """The built buffer map: regions by key, the two schemas, and the reset vector."""

    def __init__(self, regions: Sequence[Region]) -> None:
        offset = 0
        self.regions: dict[str, Region] = {}
        for part in _PART_ORDER:
            for region in regions:
                if region.part == part:
                    region.start = offset
                    offset += region.size
                    self.regions[region.key] = region
        self.n_total = offset
        self.step_specs = [s for r in self.regions.values() if r.part == "step" for s in r.specs]
        self.periodic_specs = [
            s for r in self.regions.values() if r.part == "periodic" for s in r.specs
        ]
        self.n_step = len(self.step_specs)
        self.n_periodic = len(self.periodic_specs)

    def __contains__(self, key: str) -> bool:
        return key in self.regions

    def __getitem__(self, key: str) -> Region:
        return self.regions[key]

    def init_vector(self) -> np.ndarray:
        """The value every slot holds at step_begin: 0 for sums, -inf for maxima that may see
        no data (the identity of a max reduction), NaN for what may go unmeasured."""
        out = np.empty(self.n_total, dtype=np.float32)
        for region in self.regions.values():
            out[region.start : region.stop] = region.init
        return out

    def index_of(self, name: str) -> int:
        """Position of a metric in the packed vector (tests and debugging; O(n))."""
        for i, spec in enumerate(self.step_specs + self.periodic_specs):
            if spec.name == name:
                return i
        raise KeyError(name)


# ---------------------------------------------------------------- the metric catalogue


@dataclass(frozen=True)
class ModelShape:
    """What the catalogue needs to know about the model, taken from the adapter."""

    n_layers: int  # residual blocks
    moe: Sequence[tuple[int, int]]  # (layer, n_experts) per MoE layer, in order
    shared: Sequence[int]  # layers whose MoE has a shared expert
    attn: Sequence[tuple[int, int]]  # (layer, n_heads) per attention probe
    has_output_head: bool
    n_mtp: int


def _w(n: int, minimum: int) -> int:
    return max(minimum, len(str(max(n - 1, 0))))


def build_layout(shape: ModelShape, groups: frozenset[str]) -> Layout:
    """The buffer map for a model shape and the enabled stat groups (hooks.config.STAT_GROUPS)."""
    lw = _w(shape.n_layers, 2)
    ew = _w(max((e for _, e in shape.moe), default=1), 3)
    hw = _w(max((h for _, h in shape.attn), default=1), 2)
    layer = lambda l: f"layer{l:0{lw}d}"
    regions: list[Region] = []

    def metrics(key: str, part: str, init: float, specs: list[MetricSpec]) -> None:
        regions.append(Region(key, part, len(specs), init, specs))

    def scratch(key: str, size: int) -> None:
        regions.append(Region(key, "scratch", size, 0.0))

    n_expert_slots = sum(e for _, e in shape.moe)
    if "moe" in groups and shape.moe:
        for stat, reduce, unit, init in (
            ("tokens", "sum", "tokens", 0.0),
            ("gate_mass", "sum", "", 0.0),
            ("act_rms", "mean", "", 0.0),
            ("act_maxabs", "max", "", 0.0),
            ("out_norm", "mean", "", 0.0),
        ):
            metrics(
                f"moe.{stat}",
                "step",
                init,
                [
                    MetricSpec(
                        f"moe/{layer(l)}/expert{e:0{ew}d}/{stat}", reduce, stat, l, e, unit=unit
                    )
                    for l, n in shape.moe
                    for e in range(n)
                ],
            )
        for key in ("moe.act_sumsq", "moe.rows", "moe.out_sumsq"):
            scratch(key, n_expert_slots)
        if shape.shared:
            for stat, reduce in (("act_rms", "mean"), ("act_maxabs", "max"), ("out_norm", "mean")):
                metrics(
                    f"shared.{stat}",
                    "step",
                    0.0,
                    [
                        MetricSpec(f"moe/{layer(l)}/shared/{stat}", reduce, stat, l)
                        for l in shape.shared
                    ],
                )
            for key in ("shared.act_sumsq", "shared.act_numel", "shared.out_sumsq", "shared.rows"):
                scratch(key, len(shape.shared))
    if "router" in groups and shape.moe:
        for stat, reduce, init in (
            ("confidence", "mean", NAN),
            ("logit_max", "max", NEG_INF),
            ("logit_std", "mean", NAN),
            ("z_loss", "mean", NAN),
            ("load_max_over_mean", "max", NAN),
            ("bias_absmax", "max", NAN),
        ):
            metrics(
                f"router.{stat}",
                "step",
                init,
                [
                    MetricSpec(f"moe/{layer(l)}/router/{stat}", reduce, stat, l)
                    for l, _ in shape.moe
                ],
            )
        for key in ("router.conf_sum", "router.std_sum", "router.lse2_sum", "router.n_tokens"):
            scratch(key, len(shape.moe))
        if "moe" not in groups:
            scratch("router.load", n_expert_slots)  # tokens per expert, normally moe.tokens
    if "attn" in groups and shape.attn:
        metrics(
            "attn.max_logit",
            "step",
            NEG_INF,
            [
                MetricSpec(
                    f"attn/{layer(l)}/head{h:0{hw}d}/max_logit", "max", "max_logit", l, head=h
                )
                for l, n in shape.attn
                for h in range(n)
            ],
        )
    if "output" in groups and shape.has_output_head:
        metrics(
            "output.logit_max",
            "step",
            NEG_INF,
            [MetricSpec("model/output_logit_max", "max", "output_logit_max")],
        )
    if "resid" in groups and shape.n_layers:
        for stat, reduce in (("rms", "mean"), ("maxabs", "max")):
            init = 0.0 if stat == "maxabs" else NAN
            metrics(
                f"resid.{stat}",
                "step",
                init,
                [
                    MetricSpec(f"resid/{layer(l)}/{stat}", reduce, stat, l)
                    for l in range(shape.n_layers)
                ],
            )
        scratch("resid.sumsq", shape.n_layers)
        scratch("resid.numel", shape.n_layers)
    if "grad" in groups:
        metrics("grad.global", "step", NAN, [MetricSpec("grad/global_norm", "mean", "norm")])
        metrics(
            "grad.layer",
            "step",
            NAN,
            [MetricSpec(f"grad/{layer(l)}/norm", "mean", "norm", l) for l in range(shape.n_layers)],
        )
        if shape.moe:
            metrics(
                "grad.expert",
                "step",
                NAN,
                [
                    MetricSpec(f"grad/{layer(l)}/expert{e:0{ew}d}/norm", "mean", "norm", l, e)
                    for l, n in shape.moe
                    for e in range(n)
                ],
            )
    if "train" in groups:
        metrics("train.loss", "step", NAN, [MetricSpec("train/loss", "mean", "loss")])
        if shape.n_mtp:
            metrics(
                "train.mtp",
                "step",
                NAN,
                [
                    MetricSpec(f"train/mtp_loss/{d}", "mean", "mtp_loss")
                    for d in range(1, shape.n_mtp + 1)
                ],
            )
        # Host values: filled into the host copy, never touch the device.
        metrics(
            "train.host",
            "step",
            NAN,
            [
                MetricSpec("train/lr", "mean", "lr"),
                MetricSpec("train/step_time", "max", "step_time", unit="s"),
                MetricSpec("train/tokens_per_s", "sum", "tokens_per_s", unit="tokens/s"),
                MetricSpec("train/tokens", "sum", "tokens", unit="tokens"),
            ],
        )
    if "params" in groups:
        if shape.moe:
            metrics(
                "params.expert_fro",
                "periodic",
                NAN,
                [
                    MetricSpec(
                        f"params/{layer(l)}/expert{e:0{ew}d}/fro_norm", "mean", "fro_norm", l, e
                    )
                    for l, n in shape.moe
                    for e in range(n)
                ],
            )
        metrics(
            "params.update_ratio",
            "periodic",
            NAN,
            [MetricSpec("optim/update_ratio", "mean", "update_ratio")],
        )
    return Layout(regions)


HOST_SLOTS = ("lr", "step_time", "tokens_per_s", "tokens")  # order inside region train.host
