"""StepFrame: one reduced step as detectors see it, built the same way online and offline.

`values` is a float64 vector over the run's metric ids (the reduced float32 values, widened),
`present` says which ids the step actually carried: a NaN that was *sent* is a finding, a
metric that was not sent this step (parameter norms arrive every K steps) is not. Per-rank
values are optional and lazy (`rank_values()`), because only a detector that has already found
something asks which ranks it came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepFrame:
    run: str
    step: int
    values: np.ndarray  # float64 [size]; NaN where absent
    present: np.ndarray  # bool [size]
    ranks: tuple[int, ...] = ()  # ranks included in the reduction
    _rank_loader: Callable[[], Mapping[int, np.ndarray]] | None = field(default=None, repr=False)
    _rank_cache: Mapping[int, np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def from_rows(
        cls,
        run: str,
        step: int,
        metric_id: np.ndarray,
        value: np.ndarray,
        size: int,
        ranks: tuple[int, ...] = (),
        rank_loader: Callable[[], Mapping[int, np.ndarray]] | None = None,
    ) -> StepFrame:
        """From (metric_id, value) rows of one step; ids >= size are ignored (a metric the
        index does not know yet cannot be judged)."""
        ids = np.asarray(metric_id, dtype=np.int64)
        vals = np.asarray(value, dtype=np.float32).astype(np.float64)
        if ids.size == size and size and ids[0] == 0 and (np.diff(ids) == 1).all():
            # every id once, in order (a whole step of one layout): no scatter
            return cls(run, int(step), vals, np.ones(size, bool), tuple(ranks), rank_loader)
        keep = (ids >= 0) & (ids < size)
        out = np.full(size, np.nan)
        present = np.zeros(size, dtype=bool)
        out[ids[keep]] = vals[keep]
        present[ids[keep]] = True
        return cls(run, int(step), out, present, tuple(ranks), rank_loader)

    @property
    def size(self) -> int:
        return int(self.values.size)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Values at an index array of any shape; NaN where the id is -1 or not present."""
        ids = np.asarray(ids, dtype=np.int64)
        ok = (ids >= 0) & (ids < self.size)
        out = np.full(ids.shape, np.nan)
        sel = ids[ok]
        out[ok] = np.where(self.present[sel], self.values[sel], np.nan)
        return out

    def scalar(self, mid: int) -> float:
        return float(self.take(np.array([mid]))[0]) if mid >= 0 else float("nan")

    def rank_values(self) -> Mapping[int, np.ndarray]:
        """rank -> float64 [size] of that rank's raw values (NaN absent); {} when unknown."""
        if self._rank_cache is None:
            self._rank_cache = self._rank_loader() if self._rank_loader else {}
        return self._rank_cache

    def rank_nonfinite(self, mid: int) -> list[int]:
        """The ranks whose own value of metric `mid` was not finite (NaN, +-inf), sorted: asked
        of the per-rank values (a tier coordinator's have no values, only the non-finite
        pairs its collectors' partials name: `nonfinite(mid)`); a rank that did not send `mid`
        counts as not finite where only the values are known."""
        per_rank = self.rank_values()
        named = getattr(per_rank, "nonfinite", None)
        if named is not None:
            return sorted(int(r) for r in named(mid))
        ranks, m = self.rank_matrix(np.array([mid]))
        return sorted(r for r, v in zip(ranks, m[:, 0]) if not np.isfinite(v))

    def rank_matrix(self, ids: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
        """(ranks, float64 [len(ranks), len(ids)]): each rank's raw values of a few ids (NaN:
        not sent, or id < 0). The collector's per-rank values answer this from the step's
        matrices without building each rank's dense vector (collector.detect.RankVectors)."""
        per_rank = self.rank_values()
        ranks = tuple(int(r) for r in per_rank)
        want = np.asarray(ids, dtype=np.int64).reshape(-1)
        matrix = getattr(per_rank, "matrix", None)
        if matrix is not None:
            return ranks, matrix(want)
        out = np.full((len(ranks), want.size), np.nan)
        for i, r in enumerate(ranks):
            vec = per_rank[r]
            ok = (want >= 0) & (want < vec.size)
            out[i, ok] = vec[want[ok]]
        return ranks, out


def rank_vectors(
    metric_id: np.ndarray, rank: np.ndarray, value: np.ndarray, size: int, ranks: tuple[int, ...]
) -> dict[int, np.ndarray]:
    """Raw (metric_id, rank, value) rows -> one dense float64 vector per rank in `ranks`."""
    out = {}
    ids = np.asarray(metric_id, dtype=np.int64)
    rk = np.asarray(rank)
    vals = np.asarray(value, dtype=np.float32).astype(np.float64)
    for r in ranks:
        sel = (rk == r) & (ids >= 0) & (ids < size)
        vec = np.full(size, np.nan)
        vec[ids[sel]] = vals[sel]
        out[int(r)] = vec
    return out
