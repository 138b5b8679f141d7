"""MetricIndex: where each statistic a detector needs sits in a step's dense value vector.

Built from a run's metric dictionary (the columns of store's `metrics` table: metric_id,
name, layer, expert, head, stat), the same way online (from the dictionary rows the collector
registers) and offline (from `store.metrics(run)`), so both runs see identical positions.
Detectors never loop over metrics in Python per step: they ask once for an index array, e.g.
`expert_grid("moe/", "act_rms")` -> int64 [n_layers, n_experts] of metric ids (-1 = absent),
and gather a whole family with one fancy-index.

Forward order ("which site came first") follows the model's data flow: per layer attention,
router, routed experts, shared expert, residual; then the output head and the losses; then
gradients; then parameter norms and everything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# (name prefix, rank within a layer) of the forward pass; everything else comes after.
_FORWARD_FAMILIES = (("attn/", 0), ("moe/", 1), ("resid/", 4))
_PHASE_FORWARD, _PHASE_LOSS, _PHASE_GRAD, _PHASE_OTHER = 0, 1, 2, 3


def _forward_key(name: str, layer: int, expert: int, head: int, stat: str) -> tuple:
    if name.startswith("moe/"):
        family = 1 if "/router/" in name else (3 if "/shared/" in name else 2)
        return (_PHASE_FORWARD, layer, family, expert, head, name)
    for prefix, family in _FORWARD_FAMILIES:
        if name.startswith(prefix):
            return (_PHASE_FORWARD, layer, family, expert, head, name)
    if name.startswith("model/"):  # the output head: after every layer
        return (_PHASE_FORWARD, 1 << 30, 0, expert, head, name)
    if name.startswith("train/loss") or name.startswith("train/mtp_loss"):
        return (_PHASE_LOSS, 0, 0, 0, 0, name)
    if name.startswith("grad/"):
        return (_PHASE_GRAD, -layer, 0, expert, head, name)  # backward runs deepest first
    return (_PHASE_OTHER, layer, 0, expert, head, name)


class MetricIndex:
    """Positions of a run's metrics; grows as the dictionary grows (ids are dense per run)."""

    def __init__(self) -> None:
        self.size = 0
        self.names: list[str] = []
        self.layer = np.zeros(0, np.int64)
        self.expert = np.zeros(0, np.int64)
        self.head = np.zeros(0, np.int64)
        self.stat: list[str] = []
        self._by_name: dict[str, int] = {}
        self._cache: dict[tuple, Any] = {}  # values: list[int] | int64 arrays, by key

    @classmethod
    def from_columns(
        cls,
        metric_id: Sequence[int],
        name: Sequence[str],
        layer: Sequence[int],
        expert: Sequence[int],
        head: Sequence[int],
        stat: Sequence[str],
    ) -> MetricIndex:
        ix = cls()
        ix.extend(metric_id, name, layer, expert, head, stat)
        return ix

    @classmethod
    def from_frame(cls, df) -> MetricIndex:
        """From a polars frame with store's metrics columns."""
        return cls.from_columns(
            df["metric_id"].to_list(),
            df["name"].to_list(),
            df["layer"].to_list(),
            df["expert"].to_list(),
            df["head"].to_list(),
            df["stat"].to_list(),
        )

    def extend(self, metric_id, name, layer, expert, head, stat) -> None:
        """Add dictionary rows (a re-registered id replaces its row)."""
        ids = np.asarray(metric_id, dtype=np.int64)
        if ids.size == 0:
            return
        if ids.min() < 0:
            raise ValueError("metric ids must be >= 0")
        new_size = max(self.size, int(ids.max()) + 1)
        if new_size > self.size:
            grow = new_size - self.size
            self.names += [""] * grow
            self.stat += [""] * grow
            self.layer = np.concatenate([self.layer, np.full(grow, -1, np.int64)])
            self.expert = np.concatenate([self.expert, np.full(grow, -1, np.int64)])
            self.head = np.concatenate([self.head, np.full(grow, -1, np.int64)])
            self.size = new_size
        # columns (a polars Series from the collector) as lists once; labels in one numpy pass
        name = name.to_list() if hasattr(name, "to_list") else list(name)
        stat = stat.to_list() if hasattr(stat, "to_list") else list(stat)
        self.layer[ids], self.expert[ids], self.head[ids] = layer, expert, head
        lo = int(ids[0])
        if ids.size == int(ids[-1]) - lo + 1 and bool((np.diff(ids) == 1).all()):
            self.names[lo : lo + ids.size], self.stat[lo : lo + ids.size] = name, stat
        else:
            for i, n, s in zip(ids.tolist(), name, stat):
                self.names[i], self.stat[i] = n, s
        self._by_name.update(zip(name, ids.tolist()))
        self._cache.clear()

    # ---- lookups (cached until the dictionary grows) ----------------------------------------
    def find(self, name: str) -> int:
        """The id of a metric name, -1 when the run has no such metric."""
        return self._by_name.get(name, -1)

    def _select(self, prefix: str, stat: str) -> np.ndarray:
        return np.array(
            [
                i
                for i, (n, s) in enumerate(zip(self.names, self.stat))
                if s == stat and n.startswith(prefix)
            ],
            dtype=np.int64,
        )

    @property
    def moe_layers(self) -> list[int]:
        """Layers that have per-expert metrics, ascending."""
        key = ("moe_layers",)
        if key not in self._cache:
            sel = [
                i for i, n in enumerate(self.names) if n.startswith("moe/") and self.expert[i] >= 0
            ]
            self._cache[key] = sorted({int(self.layer[i]) for i in sel})
        return self._cache[key]

    def expert_grid(self, prefix: str, stat: str) -> np.ndarray:
        """int64 [len(moe_layers), n_experts] of ids of `prefix*` metrics with `stat`, one per
        (layer, expert); -1 where a layer has fewer experts or the metric is missing."""
        key = ("grid", prefix, stat)
        if key not in self._cache:
            layers = self.moe_layers
            sel = self._select(prefix, stat)
            sel = sel[self.expert[sel] >= 0]
            n_e = int(self.expert[sel].max()) + 1 if sel.size else 0
            grid = np.full((len(layers), n_e), -1, np.int64)
            row = {l: r for r, l in enumerate(layers)}
            for i in sel.tolist():
                r = row.get(int(self.layer[i]))
                if r is not None:
                    grid[r, self.expert[i]] = i
            self._cache[key] = grid
        return self._cache[key]

    def shared_ids(self, stat: str) -> np.ndarray:
        """int64 [len(moe_layers)]: the shared expert's `stat` per MoE layer (-1 = none)."""
        key = ("shared", stat)
        if key not in self._cache:
            out = np.full(len(self.moe_layers), -1, np.int64)
            row = {l: r for r, l in enumerate(self.moe_layers)}
            for i in self._select("moe/", stat).tolist():
                if "/shared/" in self.names[i] and int(self.layer[i]) in row:
                    out[row[int(self.layer[i])]] = i
            self._cache[key] = out
        return self._cache[key]

    def heads(self, stat: str = "max_logit") -> np.ndarray:
        """int64 ids of every per-head `attn/` metric with `stat`, ordered by (layer, head)."""
        key = ("heads", stat)
        if key not in self._cache:
            sel = self._select("attn/", stat)
            sel = sel[self.head[sel] >= 0]
            self._cache[key] = sel[np.lexsort((self.head[sel], self.layer[sel]))]
        return self._cache[key]

    def forward_order(self) -> np.ndarray:
        """Every id, sorted by where its value is produced in a training step."""
        key = ("order",)
        if key not in self._cache:
            keys = [
                _forward_key(n, int(l), int(e), int(h), s)
                for n, l, e, h, s in zip(self.names, self.layer, self.expert, self.head, self.stat)
            ]
            self._cache[key] = np.array(
                sorted(range(self.size), key=keys.__getitem__), dtype=np.int64
            )
        return self._cache[key]


def site_of(name: str) -> str:
    """The site a metric belongs to: its name without the final stat component
    ("moe/layer04/expert003/act_rms" -> "moe/layer04/expert003"); top-level names stay whole."""
    head, sep, _ = name.rpartition("/")
    return head if sep and head.count("/") >= 1 else name
