"""Where every statistic lives in the one flat float32 buffer, and what it is called on the wire.

The buffer has three parts, in this order:

    [ step metrics (schema 1) | periodic metrics (schema 2) | scratch accumulators ]

Schema 1 is sent every step, schema 2 only on steps with step % K == 0; scratch holds the running
sums that `finalize` turns into means, and is never copied to the host. Each statistic family is
one contiguous region ordered (layer, expert) or (layer, head), so a hook writes a whole vector
with one kernel and the per-step finalize is a handful of vectorised ops, however many experts.
The schema's metric order is exactly the buffer order: the packed vector on the wire is the
buffer's prefix, unchanged. Regions are named by `RegionKey`, defined once here: the catalogue
lays them out, the capture (stats.py, gradstats.py) and the monitor look them up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

STEP_SCHEMA_ID = 1
PERIODIC_SCHEMA_ID = 2
NAN = math.nan
NEG_INF = -math.inf

_PART_ORDER = ("step", "periodic", "scratch")


class RegionKey(StrEnum):
    """The name of every region the catalogue can lay out: `<stat group>.<stat>`. Looking up any
    other name raises KeyError (`Layout.region`), so a misspelling never reads as "group off"."""

    # moe: per (layer, expert) metrics, then the scratch sums `finalize` turns into them
    MOE_TOKENS = "moe.tokens"
    MOE_GATE_MASS = "moe.gate_mass"
    MOE_ACT_RMS = "moe.act_rms"
    MOE_ACT_MAXABS = "moe.act_maxabs"
    MOE_OUT_NORM = "moe.out_norm"
    MOE_ACT_SUMSQ = "moe.act_sumsq"
    MOE_ROWS = "moe.rows"
    MOE_OUT_SUMSQ = "moe.out_sumsq"
    # moe, shared experts: per layer that has one
    SHARED_ACT_RMS = "shared.act_rms"
    SHARED_ACT_MAXABS = "shared.act_maxabs"
    SHARED_OUT_NORM = "shared.out_norm"
    SHARED_ACT_SUMSQ = "shared.act_sumsq"
    SHARED_ACT_NUMEL = "shared.act_numel"
    SHARED_OUT_SUMSQ = "shared.out_sumsq"
    SHARED_ROWS = "shared.rows"
    # router: per MoE layer; router.load counts tokens per expert when moe is off
    ROUTER_CONFIDENCE = "router.confidence"
    ROUTER_LOGIT_MAX = "router.logit_max"
    ROUTER_LOGIT_STD = "router.logit_std"
    ROUTER_Z_LOSS = "router.z_loss"
    ROUTER_LOAD_MAX_OVER_MEAN = "router.load_max_over_mean"
    ROUTER_BIAS_ABSMAX = "router.bias_absmax"
    ROUTER_CONF_SUM = "router.conf_sum"
    ROUTER_STD_SUM = "router.std_sum"
    ROUTER_LSE2_SUM = "router.lse2_sum"
    ROUTER_N_TOKENS = "router.n_tokens"
    ROUTER_LOAD = "router.load"
    ATTN_MAX_LOGIT = "attn.max_logit"  # per (layer, head)
    OUTPUT_LOGIT_MAX = "output.logit_max"
    # resid: per layer
    RESID_RMS = "resid.rms"
    RESID_MAXABS = "resid.maxabs"
    RESID_SUMSQ = "resid.sumsq"
    RESID_NUMEL = "resid.numel"
    GRAD_GLOBAL = "grad.global"
    GRAD_LAYER = "grad.layer"
    GRAD_EXPERT = "grad.expert"
    TRAIN_LOSS = "train.loss"
    TRAIN_MTP = "train.mtp"
    TRAIN_HOST = "train.host"  # filled on the host: HOST_SLOTS
    PARAMS_EXPERT_FRO = "params.expert_fro"
    PARAMS_UPDATE_RATIO = "params.update_ratio"

    @property
    def stat(self) -> str:
        """The name after the group: the `stat` label of the region's metrics."""
        return self.partition(".")[2]


_REGION_KEYS = frozenset(RegionKey)


@dataclass(frozen=True)
class MetricSpec:
    """One metric of a schema: a MetricDef without the protobuf (the encoder makes those)."""

    name: str
    reduce: str  # "sum" | "mean" | "max" | "min" | "mean_nonzero": across ranks
    stat: str
    layer: int = -1
    expert: int = -1
    head: int = -1
    unit: str = ""


@dataclass
class Region:
    """A contiguous slice of the buffer; `start` is assigned when the layout is built."""

    key: RegionKey
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

    def region(self, key: str) -> Region | None:
        """The region named `key`, or None when it is not laid out (its stat group is off, or
        the model has no such site); KeyError when `key` is no RegionKey at all."""
        if key not in _REGION_KEYS:
            raise KeyError(f"{key!r} is not a buffer region (see hooks.layout.RegionKey)")
        return self.regions.get(key)

    def init_vector(self) -> np.ndarray:
        """The value every slot holds at step_begin: 0 for sums, -inf for maxima that may see
        no data (the identity of a max reduction), NaN for what may go unmeasured."""
        out = np.empty(self.n_total, dtype=np.float32)
        for region in self.regions.values():
            out[region.start : region.stop] = region.init
        return out


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
    biased: Sequence[int] = ()  # MoE layers with a router selection bias (bias_absmax)


def _w(n: int, minimum: int) -> int:
    return max(minimum, len(str(max(n - 1, 0))))


def build_layout(shape: ModelShape, groups: frozenset[str]) -> Layout:
    """The buffer map for a model shape and the enabled stat groups (hooks.config.STAT_GROUPS)."""
    R = RegionKey
    lw = _w(shape.n_layers, 2)
    ew = _w(max((e for _, e in shape.moe), default=1), 3)
    hw = _w(max((h for _, h in shape.attn), default=1), 2)
    layer = lambda l: f"layer{l:0{lw}d}"
    regions: list[Region] = []

    def metrics(key: RegionKey, part: str, init: float, specs: list[MetricSpec]) -> None:
        regions.append(Region(key, part, len(specs), init, specs))

    def scratch(key: RegionKey, size: int) -> None:
        regions.append(Region(key, "scratch", size, 0.0))

    n_expert_slots = sum(e for _, e in shape.moe)
    if "moe" in groups and shape.moe:
        for key, reduce, unit, init in (
            (R.MOE_TOKENS, "sum", "tokens", 0.0),
            (R.MOE_GATE_MASS, "sum", "", 0.0),
            # a rank that routed an expert no tokens reports 0 for these: the mean over the
            # ranks that did, not that mean divided by the world (reduction.py)
            (R.MOE_ACT_RMS, "mean_nonzero", "", 0.0),
            (R.MOE_ACT_MAXABS, "max", "", 0.0),
            (R.MOE_OUT_NORM, "mean_nonzero", "", 0.0),
        ):
            stat = key.stat
            metrics(
                key,
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
        for key in (R.MOE_ACT_SUMSQ, R.MOE_ROWS, R.MOE_OUT_SUMSQ):
            scratch(key, n_expert_slots)
        if shape.shared:
            for key, reduce in (
                (R.SHARED_ACT_RMS, "mean"),
                (R.SHARED_ACT_MAXABS, "max"),
                (R.SHARED_OUT_NORM, "mean"),
            ):
                metrics(
                    key,
                    "step",
                    0.0,
                    [
                        MetricSpec(f"moe/{layer(l)}/shared/{key.stat}", reduce, key.stat, l)
                        for l in shape.shared
                    ],
                )
            for key in (R.SHARED_ACT_SUMSQ, R.SHARED_ACT_NUMEL, R.SHARED_OUT_SUMSQ, R.SHARED_ROWS):
                scratch(key, len(shape.shared))
    if "router" in groups and shape.moe:
        for key, reduce, init in (
            (R.ROUTER_CONFIDENCE, "mean", NAN),
            (R.ROUTER_LOGIT_MAX, "max", NEG_INF),
            (R.ROUTER_LOGIT_STD, "mean", NAN),
            (R.ROUTER_Z_LOSS, "mean", NAN),
            (R.ROUTER_LOAD_MAX_OVER_MEAN, "max", NAN),
        ):
            metrics(
                key,
                "step",
                init,
                [
                    MetricSpec(f"moe/{layer(l)}/router/{key.stat}", reduce, key.stat, l)
                    for l, _ in shape.moe
                ],
            )
        if shape.biased:  # a model without a selection bias has no such metric (never NaN)
            metrics(
                R.ROUTER_BIAS_ABSMAX,
                "step",
                NAN,
                [
                    MetricSpec(f"moe/{layer(l)}/router/bias_absmax", "max", "bias_absmax", l)
                    for l in shape.biased
                ],
            )
        for key in (R.ROUTER_CONF_SUM, R.ROUTER_STD_SUM, R.ROUTER_LSE2_SUM, R.ROUTER_N_TOKENS):
            scratch(key, len(shape.moe))
        if "moe" not in groups:
            scratch(R.ROUTER_LOAD, n_expert_slots)  # tokens per expert, normally moe.tokens
    if "attn" in groups and shape.attn:
        metrics(
            R.ATTN_MAX_LOGIT,
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
            R.OUTPUT_LOGIT_MAX,
            "step",
            NEG_INF,
            [MetricSpec("model/output_logit_max", "max", "output_logit_max")],
        )
    if "resid" in groups and shape.n_layers:
        for key, reduce, init in ((R.RESID_RMS, "mean", NAN), (R.RESID_MAXABS, "max", 0.0)):
            metrics(
                key,
                "step",
                init,
                [
                    MetricSpec(f"resid/{layer(l)}/{key.stat}", reduce, key.stat, l)
                    for l in range(shape.n_layers)
                ],
            )
        scratch(R.RESID_SUMSQ, shape.n_layers)
        scratch(R.RESID_NUMEL, shape.n_layers)
    if "grad" in groups:
        metrics(R.GRAD_GLOBAL, "step", NAN, [MetricSpec("grad/global_norm", "mean", "norm")])
        metrics(
            R.GRAD_LAYER,
            "step",
            NAN,
            [MetricSpec(f"grad/{layer(l)}/norm", "mean", "norm", l) for l in range(shape.n_layers)],
        )
        if shape.moe:
            metrics(
                R.GRAD_EXPERT,
                "step",
                NAN,
                [
                    MetricSpec(f"grad/{layer(l)}/expert{e:0{ew}d}/norm", "mean", "norm", l, e)
                    for l, n in shape.moe
                    for e in range(n)
                ],
            )
    if "train" in groups:
        metrics(R.TRAIN_LOSS, "step", NAN, [MetricSpec("train/loss", "mean", "loss")])
        if shape.n_mtp:
            metrics(
                R.TRAIN_MTP,
                "step",
                NAN,
                [
                    MetricSpec(f"train/mtp_loss/{d}", "mean", "mtp_loss")
                    for d in range(1, shape.n_mtp + 1)
                ],
            )
        # Host values: filled into the host copy, never touch the device.
        metrics(
            R.TRAIN_HOST,
            "step",
            NAN,
            [
                MetricSpec("train/lr", "mean", "lr"),
                MetricSpec("train/step_time", "max", "step_time", unit="s"),
                MetricSpec("train/tokens_per_s", "sum", "tokens_per_s", unit="tokens/s"),
                MetricSpec("train/tokens", "sum", "tokens", unit="tokens"),
                MetricSpec("telemetry/dropped_steps", "sum", "dropped_steps", unit="steps"),
            ],
        )
    if "params" in groups:
        if shape.moe:
            metrics(
                R.PARAMS_EXPERT_FRO,
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
            R.PARAMS_UPDATE_RATIO,
            "periodic",
            NAN,
            [MetricSpec("optim/update_ratio", "mean", "update_ratio")],
        )
    return Layout(regions)


# order inside region train.host; dropped_steps: the steps this rank's client has dropped so far
HOST_SLOTS = ("lr", "step_time", "tokens_per_s", "tokens", "dropped_steps")
