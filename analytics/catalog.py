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
import polars as pl

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


class _Grow:
    """A growable int64 column: `view()` is the first n values (capacity doubles, so adding
    P parts costs O(total), not O(P x total))."""

    def __init__(self) -> None:
        self._buf = np.zeros(0, np.int64)
        self.n = 0

    def view(self) -> np.ndarray:
        return self._buf[: self.n]

    def resize(self, n: int) -> None:
        """Grow to n values; the new ones are -1 (no layer / expert / head)."""
        if n > self._buf.size:
            buf = np.full(max(n, 2 * self._buf.size, 1024), -1, np.int64)
            buf[: self.n] = self._buf[: self.n]
            self._buf = buf
        self.n = n


class MetricIndex:
    """Positions of a run's metrics; grows as the dictionary grows (ids are dense per run).

    Names and stats are polars string columns and labels numpy arrays: a run of millions of
    metrics costs bytes per metric here, not Python objects, and the family lookups below are
    vectorised string matches."""

    def __init__(self) -> None:
        self.size = 0
        self.names = pl.Series("name", [], pl.Utf8)
        self.stat = pl.Series("stat", [], pl.Utf8)
        self._cols = (_Grow(), _Grow(), _Grow())
        self.layer = self.expert = self.head = np.zeros(0, np.int64)
        self._cache: dict[tuple, Any] = {}  # values: list[int] | int64 arrays, by key
        self._found: dict[str, int] = {}  # find() answers, until the dictionary changes

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
            df["metric_id"].to_numpy(),
            df["name"],
            df["layer"].to_numpy(),
            df["expert"].to_numpy(),
            df["head"].to_numpy(),
            df["stat"],
        )

    def extend(self, metric_id, name, layer, expert, head, stat) -> None:
        """Add dictionary rows (a re-registered id replaces its row)."""
        ids = np.asarray(metric_id, dtype=np.int64)
        if ids.size == 0:
            return
        if ids.min() < 0:
            raise ValueError("metric ids must be >= 0")
        name, stat = _utf8(name, "name"), _utf8(stat, "stat")
        old, new_size = self.size, max(self.size, int(ids.max()) + 1)
        for col in self._cols:
            col.resize(new_size)
        self.layer, self.expert, self.head = (c.view() for c in self._cols)
        self.layer[ids], self.expert[ids], self.head[ids] = layer, expert, head
        if ids.size == new_size - old and int(ids[0]) == old and bool((np.diff(ids) == 1).all()):
            self.names.append(name)  # the usual case: the next ids, in order
            self.stat.append(stat)
            if self.names.n_chunks() > 64:
                self.names, self.stat = self.names.rechunk(), self.stat.rechunk()
        else:  # an upsert, or ids out of order: rebuild the columns (rare)
            names = self.names.to_list() + [""] * (new_size - old)
            stats = self.stat.to_list() + [""] * (new_size - old)
            for i, n, s_ in zip(ids.tolist(), name.to_list(), stat.to_list()):
                names[i], stats[i] = n, s_
            self.names = pl.Series("name", names, pl.Utf8)
            self.stat = pl.Series("stat", stats, pl.Utf8)
        self.size = new_size
        self._cache.clear()
        self._found.clear()

    # ---- lookups (cached until the dictionary grows) ----------------------------------------
    def find(self, name: str) -> int:
        """The id of a metric name, -1 when the run has no such metric."""
        hit = self._found.get(name)
        if hit is None:
            i = self.names.index_of(name)
            hit = self._found[name] = -1 if i is None else int(i)
        return hit

    def _select(self, prefix: str, stat: str) -> np.ndarray:
        hit = (self.stat == stat) & self.names.str.starts_with(prefix)
        return hit.arg_true().to_numpy().astype(np.int64)

    @property
    def moe_layers(self) -> list[int]:
        """Layers that have per-expert metrics, ascending."""
        key = ("moe_layers",)
        if key not in self._cache:
            moe = self.names.str.starts_with("moe/").to_numpy() & (self.expert >= 0)
            self._cache[key] = sorted(set(np.unique(self.layer[moe]).tolist()))
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
            rows, ok = _rows_of(np.asarray(layers, np.int64), self.layer[sel])
            sel = sel[ok]
            cell = rows[ok] * n_e + self.expert[sel]
            # one id per cell, the highest (as a loop in id order would leave it)
            last = cell.size - 1 - np.unique(cell[::-1], return_index=True)[1]
            grid.reshape(-1)[cell[last]] = sel[last]
            self._cache[key] = grid
        return self._cache[key]

    def shared_ids(self, stat: str) -> np.ndarray:
        """int64 [len(moe_layers)]: the shared expert's `stat` per MoE layer (-1 = none)."""
        key = ("shared", stat)
        if key not in self._cache:
            out = np.full(len(self.moe_layers), -1, np.int64)
            row = {l: r for r, l in enumerate(self.moe_layers)}
            sel = self._select("moe/", stat)
            shared = self.names.gather(sel).str.contains("/shared/", literal=True).to_numpy()
            for i in sel[shared].tolist():
                if int(self.layer[i]) in row:
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
                for n, l, e, h, s in zip(
                    self.names.to_list(),
                    self.layer.tolist(),
                    self.expert.tolist(),
                    self.head.tolist(),
                    self.stat.to_list(),
                )
            ]
            self._cache[key] = np.array(
                sorted(range(self.size), key=keys.__getitem__), dtype=np.int64
            )
        return self._cache[key]


def _rows_of(layers: np.ndarray, layer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row of each `layer` value in the ascending `layers`, and whether it is there at all."""
    rows = np.searchsorted(layers, layer)
    ok = rows < layers.size
    ok[ok] = layers[rows[ok]] == layer[ok]
    return rows, ok


def site_of(name: str) -> str:
    """The site a metric belongs to: its name without the final stat component
    ("moe/layer04/expert003/act_rms" -> "moe/layer04/expert003"); top-level names stay whole."""
    head, sep, _ = name.rpartition("/")
    return head if sep and head.count("/") >= 1 else name


def _utf8(col: Any, what: str) -> pl.Series:
    """A string column (list or polars Series) as a Utf8 Series."""
    if isinstance(col, pl.Series):
        return col.cast(pl.Utf8).rename(what)
    return pl.Series(what, list(col), pl.Utf8)
