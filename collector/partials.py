"""Per-step partial reductions: what a tier collector sends its coordinator for one step.

A collector in tier mode (tier.py) holds only some ranks of a run. For each step it reduces
what ITS ranks sent into a Partial: per metric id (the run's global ids, coordinator.py assigns
them) the float64 sum, the count of ranks, the count of ranks whose value is not 0 (for
mean_nonzero), the max and the min, over the ranks that ended the step. Every statistic is kept for every id, whatever its reduce op: the collector needs no op
table, and the coordinator applies each id's op once all partials are in (`finish`), through
the same `reduction.Accumulator.result` a single collector uses, so mean = sum / count,
mean_nonzero = sum / nonzero and the NaN rules are the same code.

Combining is associative: sums and both counts add, max and min take the max and min (NaN
propagates, as in reduction.py). Sums are float64 of float32 values, so reassociating them
(ranks 0+2 then 1+3, instead of 0+1+2+3) gives the very same float32 result whenever the sum
is exact in float64, which holds for any handful of float32 values within 2^29 of each other
in magnitude (tests/collector/test_partials.py; tests/integration/test_tier.py compares a tier
run with a single collector's bit for bit).

A partial also names where its raw values were not finite: up to MAX_NONFINITE (rank, id)
pairs, found only in the columns whose sum is not finite (a healthy step costs nothing), so
the coordinator's NaN events name the ranks a NaN came from, as a single collector's do. A NaN
storm beyond the cap is counted (`nonfinite_more`), not listed.

On the wire a Partial is jobs.py's record format (JSON meta + raw little-endian arrays); the
pairs ride in the meta, which older coordinators read past. The nonzero counts are a sixth
array, after the five older tiers send: a Partial of five reads as if every value were nonzero
(mean_nonzero = mean for its ranks), and an older coordinator refuses six, so a tier's
coordinator is upgraded before its tiers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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
    nonfinite: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.int64))
    """[n, 2] (rank, id) pairs whose raw value was NaN or +-inf, at most MAX_NONFINITE."""
    nonfinite_more: int = 0  # pairs beyond the cap, not listed
    nonzero: np.ndarray = None  # type: ignore[assignment]
    """int64: per id, the ranks whose value was not 0 (mean_nonzero's divisor); None: `count`
    (every value nonzero, as an older tier's five arrays read)."""

    def __post_init__(self) -> None:
        if self.nonzero is None:
            self.nonzero = self.count

    def encode(self) -> bytes:
        meta = {
            "run": self.run,
            "step": self.step,
            "ranks": sorted(self.ranks),
            "wall_time": self.wall_time,
            "wait": self.wait,
        }
        if self.nonfinite.size or self.nonfinite_more:
            meta["nonfinite"] = self.nonfinite.tolist()
            meta["nonfinite_more"] = self.nonfinite_more
        arrays = [self.ids, self.sum, self.count, self.max, self.min, self.nonzero]
        return b"".join(_pack(meta, arrays))

    @classmethod
    def decode(cls, payload: bytes) -> Partial:
        meta, a = _unpack(payload)
        if len(a) not in (5, 6) or len({x.shape for x in a}) != 1 or a[0].ndim != 1:
            raise ValueError("a Partial holds 5 or 6 arrays of one length")
        count = a[2].astype(np.int64)
        return cls(
            run=str(meta["run"]),
            step=int(meta["step"]),
            ranks=frozenset(int(r) for r in meta["ranks"]),
            wall_time=float(meta["wall_time"]),
            ids=a[0].astype(np.int32),
            sum=a[1].astype(np.float64),
            count=count,
            max=a[3].astype(np.float64),
            min=a[4].astype(np.float64),
            wait=bool(meta.get("wait", False)),
            nonfinite=_pairs(meta.get("nonfinite", [])),
            nonfinite_more=int(meta.get("nonfinite_more", 0)),
            nonzero=a[5].astype(np.int64) if len(a) == 6 else count,  # an older tier: all nonzero
        )


MAX_NONFINITE = 16_384


def _pairs(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64).reshape(-1, 2)


def _capped(pairs: list[np.ndarray], more: int = 0) -> tuple[np.ndarray, int]:
    """(rank, id) pair arrays -> one [n, 2] array of at most MAX_NONFINITE distinct pairs,
    sorted, and how many were left out."""
    a = np.unique(np.concatenate([np.empty((0, 2), np.int64), *pairs]), axis=0)
    return a[:MAX_NONFINITE], more + max(0, len(a) - MAX_NONFINITE)


def _grouped(ids, s, c, nz, mx, mn) -> tuple[np.ndarray, ...]:
    """Rows (id, sum, count, nonzero, max, min) with repeated ids -> one row per id, ids
    sorted."""
    if ids.size == 0:
        return ids.astype(np.int32), s, c, nz, mx, mn
    order = np.argsort(ids, kind="stable")
    ids, s, c, nz, mx, mn = ids[order], s[order], c[order], nz[order], mx[order], mn[order]
    start = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf propagate on purpose
        return (
            ids[start].astype(np.int32),
            np.add.reduceat(s, start),
            np.add.reduceat(c, start),
            np.add.reduceat(nz, start),
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
    cols: list[list[np.ndarray]] = [[], [], [], [], [], []]
    bad: list[np.ndarray] = []  # (rank, id) pairs of non-finite raw values
    with np.errstate(invalid="ignore", over="ignore"):
        for b in blocks:
            mine = np.isin(b.rank, keep)
            v = b.value[mine]
            if v.shape[0] == 0:
                continue
            total = np.add.reduce(v, axis=0, dtype=np.float64)
            for i, x in enumerate(
                (
                    b.metric_id,
                    total,
                    np.full(b.metric_id.size, v.shape[0], np.int64),
                    np.count_nonzero(v, axis=0).astype(np.int64),
                    v.max(axis=0).astype(np.float64),
                    v.min(axis=0).astype(np.float64),
                )
            ):
                cols[i].append(x)
            cols_bad = np.flatnonzero(~np.isfinite(total))  # a non-finite value makes its sum so
            if cols_bad.size:
                r, c = np.nonzero(~np.isfinite(v[:, cols_bad]))
                rank_of = np.asarray(b.rank)[mine]
                bad.append(np.stack([rank_of[r], np.asarray(b.metric_id)[cols_bad][c]], axis=1))
        assert rest.rank is not None  # raw rows always name their rank
        sel = np.isin(rest.rank, keep)
        v64 = rest.value[sel].astype(np.float64)
        one = np.ones(v64.size, np.int64)
        for i, x in enumerate(
            (rest.metric_id[sel], v64, one, (v64 != 0).astype(np.int64), v64, v64)
        ):
            cols[i].append(x)
        off = ~np.isfinite(v64)
        if off.any():
            bad.append(np.stack([rest.rank[sel][off], rest.metric_id[sel][off]], axis=1))
    dtypes = (np.int32, np.float64, np.int64, np.int64, np.float64, np.float64)
    arrays = [np.concatenate(c).astype(t, copy=False) for c, t in zip(cols, dtypes)]
    ids, s, c, nz, mx, mn = _grouped(*arrays)
    part = Partial(run, step, ranks, wall_time, ids, s, c, mx, mn, nonzero=nz)
    if bad:
        part.nonfinite, part.nonfinite_more = _capped(bad)
    return part


def combine(parts: list[Partial]) -> Partial:
    """Partials of one (run, step) over disjoint rank sets -> one over their union."""
    if not parts:
        raise ValueError("combine needs at least one partial")
    ranks: frozenset[int] = frozenset()
    for p in parts:
        if ranks & p.ranks:
            raise ValueError(f"partials overlap in ranks {sorted(ranks & p.ranks)}")
        ranks |= p.ranks
    keys = ("ids", "sum", "count", "nonzero", "max", "min")
    cat = [np.concatenate([getattr(p, k) for p in parts]) for k in keys]
    ids, s, c, nz, mx, mn = _grouped(*cat)
    wall = max(p.wall_time for p in parts)
    out = Partial(parts[0].run, parts[0].step, ranks, wall, ids, s, c, mx, mn, nonzero=nz)
    if any(p.nonfinite.size or p.nonfinite_more for p in parts):
        more = sum(p.nonfinite_more for p in parts)
        out.nonfinite, out.nonfinite_more = _capped([p.nonfinite for p in parts], more)
    return out


class NonFiniteRanks(Mapping):
    """A coordinator frame's per-rank evidence: no per-rank values (empty as a mapping, so
    the rules that compare ranks' values see none, as for a one-rank run), and
    `nonfinite(id)`, the ranks whose raw value of `id` was not finite, from the partials'
    pairs (analytics.frame.StepFrame.rank_nonfinite asks it)."""

    def __init__(self, pairs: np.ndarray | list | tuple = ()) -> None:
        self._pairs = _pairs(pairs)

    def nonfinite(self, mid: int) -> list[int]:
        return sorted({int(r) for r in self._pairs[self._pairs[:, 1] == mid, 0]})

    def __getitem__(self, rank: int) -> np.ndarray:
        raise KeyError(rank)

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


def finish(p: Partial, ops_M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, values f32, n_ranks i32) of the reduced step: each id's op applied exactly as a
    single collector's Accumulator applies it."""
    acc = Accumulator(ops_M)
    if p.ids.size and int(p.ids.max()) >= ops_M.size:
        raise ValueError(f"metric id {int(p.ids.max())} outside the run's {ops_M.size} metrics")
    acc.sum_M[p.ids], acc.count_M[p.ids], acc.nonzero_M[p.ids] = p.sum, p.count, p.nonzero
    acc.max_M[p.ids], acc.min_M[p.ids] = p.max, p.min
    return acc.result()
