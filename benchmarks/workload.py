"""The simulated training job of the ingest benchmark: which metrics each rank sends, and values.

A Step-3.5-Flash-shaped MoE (default 45 layers x 288 routed experts) seen from R ranks under
expert parallelism: every rank reports the layer-level stats of every layer (router, shared
expert, residual stream, per-layer grad norm) plus the training curves, and per-(layer, expert,
stat) stats for the slice of experts its EP group hosts. Ranks of one EP group send the same
names, so the collector reduces each name over the data-parallel replicas of its group, the way
a real EP x DP job reduces. `Workload.for_total(N, R)` sizes it so R x metrics_per_rank ~ N
(6,000,000 = 4,096 ranks x 1,465 at the seed's scale).

Values have the structure the detectors look for, not noise: per-layer scales, expert biases,
a slow drift of activation RMS, a small per-rank jitter, one expert dying (its token share and
RMS decay from `death_step`) and one localized blow-up (one routed expert's max|h| x 40 from
`spike_step`, which the collector's MaxAbsSpike detector must answer with a clip update).
Everything is numpy on precomputed per-group arrays: one step of one rank is three vector ops,
and `Values.steps` makes the vectors of a whole group of ranks in a few matrix ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hooks.layout import MetricSpec

MAX_SCHEMA_METRICS = 16_384  # a Schema message stays well under gRPC's 4 MiB default
#                                  (~50 B per MetricDef); a bigger rank registers several
EXPERT_STATS = (
    ("tokens", "sum", "tokens"),
    ("gate_mass", "sum", ""),
    ("act_rms", "mean", ""),
    ("act_maxabs", "max", ""),
    ("out_norm", "mean", ""),
)
LAYER_STATS = (
    ("router", "confidence", "mean"),
    ("router", "logit_max", "max"),
    ("router", "z_loss", "mean"),
    ("router", "load_imbalance", "max"),
    ("shared", "act_rms", "mean"),
    ("shared", "act_maxabs", "max"),
    ("resid", "rms", "mean"),
    ("resid", "maxabs", "max"),
    ("grad", "norm", "mean"),
)
TRAIN_STATS = (
    ("loss", "mean"),
    ("lr", "mean"),
    ("step_time", "max"),
    ("tokens", "sum"),
    ("tokens_per_s", "sum"),
)


def _layer_name(family: str, l: int, stat: str) -> str:
    if family in ("router", "shared"):
        return f"moe/layer{l:02d}/{family}/{stat}"
    if family == "grad":
        return f"grad/layer{l:02d}/{stat}"
    return f"resid/layer{l:02d}/{stat}"


@dataclass
class Workload:
    world: int
    metrics_per_rank: int
    n_layers: int
    n_experts: int
    spike_step: int = 20
    death_step: int = 10
    common: list[MetricSpec] = field(init=False)
    experts: list[MetricSpec] = field(init=False)

    def __post_init__(self) -> None:
        L, E = self.n_layers, self.n_experts
        self.common = [
            MetricSpec(_layer_name(f, l, s), r, s, l) for l in range(L) for f, s, r in LAYER_STATS
        ]
        self.common += [MetricSpec(f"train/{s}", r, s) for s, r in TRAIN_STATS]
        self.experts = [
            MetricSpec(f"moe/layer{l:02d}/expert{e:03d}/{s}", r, s, l, e, unit=u)
            for l in range(L)
            for e in range(E)
            for s, r, u in EXPERT_STATS
        ]
        self.k = self.metrics_per_rank - len(self.common)  # expert metrics per rank
        if self.k < len(EXPERT_STATS):
            raise ValueError(
                f"{self.metrics_per_rank} metrics per rank leave no room for expert "
                f"stats after {len(self.common)} layer-level ones"
            )
        self.k -= self.k % len(EXPERT_STATS)  # whole experts per rank
        self.n_groups = max(1, math.ceil(len(self.experts) / self.k))
        self._groups: dict[int, np.ndarray] = {}

    @classmethod
    def for_total(cls, total: int, world: int, **kw) -> Workload:
        """Size the model so world x metrics_per_rank ~ total (the seed: 45 x 288)."""
        m = max(1, total // world)
        layers = max(1, min(45, (m // 2 - len(TRAIN_STATS)) // len(LAYER_STATS)))
        return cls(world, m, layers, 288, **kw)

    # ---- identity ----------------------------------------------------------------------------
    def group(self, rank: int) -> int:
        return rank % self.n_groups

    def expert_slice(self, g: int) -> np.ndarray:
        """Indices into `experts` hosted by EP group g (whole experts; wraps at the end)."""
        if g not in self._groups:
            self._groups[g] = (g * self.k + np.arange(self.k)) % len(self.experts)
        return self._groups[g]

    def specs(self, rank: int) -> list[MetricSpec]:
        return self.common + [self.experts[i] for i in self.expert_slice(self.group(rank))]

    def schemas(self, specs: list[MetricSpec]) -> list[tuple[int, list[MetricSpec]]]:
        return [
            (1 + i // MAX_SCHEMA_METRICS, specs[i : i + MAX_SCHEMA_METRICS])
            for i in range(0, len(specs), MAX_SCHEMA_METRICS)
        ]

    def global_ids(self, rank: int) -> np.ndarray:
        """Dense ids (common first, then experts): what a rank's vector positions name."""
        return np.concatenate(
            [np.arange(len(self.common)), len(self.common) + self.expert_slice(self.group(rank))]
        )

    @property
    def values_per_rank(self) -> int:
        return len(self.common) + self.k

    def distinct_metrics(self) -> int:
        """Reduced rows per step: the names at least one rank sends."""
        groups = range(min(self.world, self.n_groups))
        return len(self.common) + int(
            np.unique(np.concatenate([self.expert_slice(g) for g in groups])).size
        )

    @property
    def spike_site(self) -> MetricSpec:
        """The metric that blows up: max|h| (act_maxabs) of the first expert rank 0 hosts
        (slices hold whole experts, so that expert's stats all sit in rank 0's vector)."""
        stat = [name for name, _, _ in EXPERT_STATS].index("act_maxabs")
        return self.experts[int(self.expert_slice(0)[0]) + stat]


class Values:
    """Per-group base vectors and drifts; `step(rank, s)` returns a rank's float32 vector and
    `steps(ranks, s)` those of many ranks at once, equal to `step` row for row."""

    def __init__(self, w: Workload, seed: int = 0) -> None:
        self.w = w
        self._base: dict[int, tuple[np.ndarray, ...]] = {}
        rng = np.random.default_rng(seed)
        self._jitter = (1 + 0.01 * rng.standard_normal((16, w.values_per_rank))).astype(np.float32)
        self._blocks: dict[tuple[int, ...], tuple[np.ndarray, ...]] = {}

    def _group(self, g: int) -> tuple[np.ndarray, ...]:
        if g in self._base:
            return self._base[g]
        w = self.w
        specs = w.common + [w.experts[i] for i in w.expert_slice(g)]
        stat = np.array([s.stat for s in specs])
        layer = np.array([max(s.layer, 0) for s in specs], dtype=np.float32)
        expert = np.array([max(s.expert, 0) for s in specs], dtype=np.float32)
        bias = 1 + 0.25 * np.sin(expert * 1.7 + layer)  # some experts run hotter
        scale = 1 + 0.05 * layer  # deeper layers a bit larger
        rms = 0.8 * scale * bias
        base = np.select(
            [
                stat == "tokens",
                stat == "gate_mass",
                stat == "act_rms",
                stat == "act_maxabs",
                stat == "out_norm",
                stat == "confidence",
                stat == "logit_max",
                stat == "z_loss",
                stat == "load_imbalance",
                stat == "rms",
                stat == "maxabs",
                stat == "norm",
                stat == "loss",
                stat == "lr",
                stat == "step_time",
                stat == "tokens_per_s",
            ],
            [
                4096 / w.n_experts * bias,
                bias / w.n_experts,
                rms,
                6 * rms,
                3 * rms,
                0.6,
                8.0,
                1e-3,
                1.3,
                scale,
                20 * scale,
                0.5,
                0.0,
                3e-4,
                1.0,
                4096.0,
            ],
            default=4096.0,
        )
        drift = np.where(
            np.isin(stat, ["act_rms", "act_maxabs", "out_norm", "rms"]), 2e-3, 0.0
        )  # slow activation growth
        dead = np.zeros(len(specs), dtype=bool)  # the dying expert
        d_layer, d_expert = w.n_layers // 2, w.n_experts - 1
        dead[
            (layer == d_layer)
            & (expert == d_expert)
            & np.isin(stat, ["tokens", "act_rms", "gate_mass"])
        ] = True
        spike = np.array([s == w.spike_site for s in specs])
        is_loss = stat == "loss"
        self._base[g] = tuple(
            np.asarray(a, dtype=np.float32) if a.dtype.kind == "f" else a
            for a in (base, drift, dead, spike, is_loss)
        )
        return self._base[g]

    def step(self, rank: int, s: int) -> np.ndarray:
        base, drift, dead, spike, is_loss = self._group(self.w.group(rank))
        v = base * (1 + drift * s) * self._jitter[(s + rank) % 16]
        if s >= self.w.death_step and dead.any():
            v[dead] *= np.float32(0.7 ** (s - self.w.death_step))
        if s >= self.w.spike_step and spike.any():
            v[spike] *= np.float32(40.0)
        v[is_loss] = 2.5 + 8.0 / math.sqrt(s + 1)
        return v

    def _block(self, ranks: tuple[int, ...]) -> tuple[np.ndarray, ...]:
        """For a set of ranks: the groups they use, each rank's row among them, and where the
        dying expert and the spike sit in the [R, M] matrix (flat indices)."""
        if ranks not in self._blocks:
            groups = sorted({self.w.group(r) for r in ranks})
            row = np.array([groups.index(self.w.group(r)) for r in ranks])
            per = [self._group(g) for g in groups]
            base, drift = (np.stack([p[i] for p in per]) for i in (0, 1))
            dead, spike = (np.flatnonzero(np.stack([p[i] for p in per])[row]) for i in (2, 3))
            is_loss = per[0][4]  # common metrics first: same slot in every group
            self._blocks[ranks] = (base, drift, row, dead, spike, is_loss)
        return self._blocks[ranks]

    def steps(self, ranks: range | list[int], s: int) -> np.ndarray:
        """float32 [len(ranks), values_per_rank]: row i is `step(ranks[i], s)`, bit for bit."""
        ranks = tuple(ranks)
        if not ranks:
            raise ValueError("Values.steps needs at least one rank")
        base, drift, row, dead, spike, is_loss = self._block(ranks)
        scaled = base * (1 + drift * s)  # per group, in step()'s order of operations
        v = scaled[row] * self._jitter[(s + np.asarray(ranks)) % 16]
        flat = v.reshape(-1)
        if s >= self.w.death_step and dead.size:
            flat[dead] *= np.float32(0.7 ** (s - self.w.death_step))
        if s >= self.w.spike_step and spike.size:
            flat[spike] *= np.float32(40.0)
        v[:, is_loss] = 2.5 + 8.0 / math.sqrt(s + 1)
        return v
