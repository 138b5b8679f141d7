"""Per-step partial reductions: what a tier collector sends its coordinator for one step.

A collector in tier mode (tier.py) holds only some ranks of a run. For each step it reduces
what ITS ranks sent into a Partial: per metric id (the run's global ids, coordinator.py assigns
them) the float64 sum, the count of ranks, the max and the min, over the ranks that ended the
step. Every statistic is kept for every id, whatever its reduce op: the collector needs no op
table, and the coordinator applies each id's op once all partials are in (`finish`), through
the same `reduction.Accumulator.result` a single collector uses, so mean = sum / count and the
NaN rules are the same code.

Combining is associative: sums and counts add, max and min take the max and min (NaN
propagates, as in reduction.py). Sums are float64 of float32 values, so reassociating them
(ranks 0+2 then 1+3, instead of 0+1+2+3) gives the very same float32 result whenever the sum
is exact in float64, which holds for any handful of float32 values within 2^29 of each other
in magnitude (tests/collector/test_partials.py; tests/integration/test_tier.py compares a tier
run with a single collector's bit for bit).

On the wire a Partial is jobs.py's record format (JSON meta + raw little-endian arrays).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from collector.jobs import _pack, _unpack
from collector.reduction import Accumulator
from store.base import RawBlock, ValueBatch


@dataclass
class Partial:
    """One step of some ranks of a run, reduced over those ranks (ids sorted, distinct)."""

    run: str
    step: int
    ranks: frozenset[int]  # the ranks whose values are in it (they ended the step)
    wall_time: float = 0.0  # the latest EndOfStep wall time of those ranks
    ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    sum: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    count: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    max: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    min: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    wait: bool = False  # on the wire only: answer once the step is reduced and stored

    def encode(self) -> bytes:
        meta = {
            "run": self.run,
            "step": self.step,
            "ranks": sorted(self.ranks),
            "wall_time": self.wall_time,
            "wait": self.wait,
        }
        return b"".join(_pack(meta, [self.ids, self.sum, self.count, self.max, self.min]))

    @classmethod
    def decode(cls, payload: bytes) -> Partial:
        meta, a = _unpack(payload)
        if len(a) != 5 or len({x.shape for x in a}) != 1 or a[0].ndim != 1:
            raise ValueError("a Partial holds 5 arrays of one length")
        return cls(
            run=str(meta["run"]),
            step=int(meta["step"]),
            ranks=frozenset(int(r) for r in meta["ranks"]),
            wall_time=float(meta["wall_time"]),
            ids=a[0].astype(np.int32),
            sum=a[1].astype(np.float64),
            count=a[2].astype(np.int64),
            max=a[3].astype(np.float64),
            min=a[4].astype(np.float64),
            wait=bool(meta.get("wait", False)),
        )


def _grouped(ids, s, c, mx, mn) -> tuple[np.ndarray, ...]:
    """Rows (id, sum, count, max, min) with repeated ids -> one row per id, ids sorted."""
    if ids.size == 0:
        return ids.astype(np.int32), s, c, mx, mn
    order = np.argsort(ids, kind="stable")
    ids, s, c, mx, mn = ids[order], s[order], c[order], mx[order], mn[order]
    start = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf propagate on purpose
        return (
            ids[start].astype(np.int32),
            np.add.reduceat(s, start),
            np.add.reduceat(c, start),
            np.maximum.reduceat(mx, start),
            np.minimum.reduceat(mn, start),
        )


def partial_of(
    run: str,
    step: int,
    blocks: list[RawBlock],
    rest: ValueBatch,
    ranks: frozenset[int],
    wall_time: float = 0.0,
) -> Partial:
    """The partial of one step over `ranks`, from the step's raw blocks (whole vectors) and
    flat rows (partial vectors), already in global metric ids; other ranks' values are left
    out (stragglers are stored raw, never reduced)."""
    keep = np.fromiter(ranks, dtype=np.int32, count=len(ranks))
    cols: list[list[np.ndarray]] = [[], [], [], [], []]
    with np.errstate(invalid="ignore", over="ignore"):
        for b in blocks:
            v = b.value[np.isin(b.rank, keep)]
            if v.shape[0] == 0:
                continue
            for i, x in enumerate(
                (
                    b.metric_id,
                    np.add.reduce(v, axis=0, dtype=np.float64),
                    np.full(b.metric_id.size, v.shape[0], np.int64),
                    v.max(axis=0).astype(np.float64),
                    v.min(axis=0).astype(np.float64),
                )
            ):
                cols[i].append(x)
        assert rest.rank is not None  # raw rows always name their rank
        sel = np.isin(rest.rank, keep)
        v64 = rest.value[sel].astype(np.float64)
        for i, x in enumerate((rest.metric_id[sel], v64, np.ones(v64.size, np.int64), v64, v64)):
            cols[i].append(x)
    dtypes = (np.int32, np.float64, np.int64, np.float64, np.float64)
    arrays = [np.concatenate(c).astype(t, copy=False) for c, t in zip(cols, dtypes)]
    ids, s, c, mx, mn = _grouped(*arrays)
    return Partial(run, step, ranks, wall_time, ids, s, c, mx, mn)


def combine(parts: list[Partial]) -> Partial:
    """Partials of one (run, step) over disjoint rank sets -> one over their union."""
    if not parts:
        raise ValueError("combine needs at least one partial")
    ranks: frozenset[int] = frozenset()
    for p in parts:
        if ranks & p.ranks:
            raise ValueError(f"partials overlap in ranks {sorted(ranks & p.ranks)}")
        ranks |= p.ranks
    cat = [np.concatenate([getattr(p, k) for p in parts]) for k in ("ids", "sum", "count")]
    cat += [np.concatenate([getattr(p, k) for p in parts]) for k in ("max", "min")]
    ids, s, c, mx, mn = _grouped(*cat)
    wall = max(p.wall_time for p in parts)
    return Partial(parts[0].run, parts[0].step, ranks, wall, ids, s, c, mx, mn)


def finish(p: Partial, ops_M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, values f32, n_ranks i32) of the reduced step: each id's op applied exactly as a
    single collector's Accumulator applies it."""
    acc = Accumulator(ops_M)
    if p.ids.size and int(p.ids.max()) >= ops_M.size:
        raise ValueError(f"metric id {int(p.ids.max())} outside the run's {ops_M.size} metrics")
    acc.sum_M[p.ids], acc.count_M[p.ids] = p.sum, p.count
    acc.max_M[p.ids], acc.min_M[p.ids] = p.max, p.min
    return acc.result()
