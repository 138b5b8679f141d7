"""Cross-rank reduction of one step: pure numpy, no per-metric Python.

A step arrives as one float32 vector per (rank, schema) plus a "have" mask (which positions the
rank actually sent) and, per schema, the array mapping schema position -> metric id. Ranks of
one expert-parallel group register the same schema, so a step of thousands of ranks has only
tens of distinct id maps ("layouts"). The ingest hands identical id maps over as one array
object; parts are grouped by that object:

    whole vectors (have all True) of one layout  -> stacked into an R x M float32 matrix (the
        one copy of the step's values), reduced along axis 0: sum in float64, max, min; the
        same matrix is the RawBlock the store writes
    partial vectors (a straggler's, or gaps)     -> flat (metric_id, rank, value) rows, reduced
        with scatter kernels: np.bincount(ids, weights=float64), np.maximum.at/np.minimum.at

Both feed one run-wide accumulator per metric id (float64 sum, count of ranks, count of ranks
whose value is not 0, max, min), since the same id (the loss, a layer's router stats) appears in
many layouts; each id then takes the result of the op it declared, mean = sum / count over the
ranks that sent it, mean_nonzero = sum / the count of those whose value is not 0 (0 when none):
a per-expert statistic of the tokens a rank routed to the expert, where a rank that routed it
none reports 0 (with 4,096 ranks of data parallelism a lightly loaded expert gets tokens on a
few; under expert parallelism only its owner holds it), is the mean of the ranks that saw it
instead of their mean divided by the ranks that did not.

Accumulation is float64 and the result is cast to float32, so a sum of many float32 values
does not lose precision on the way. Non-finite values propagate on purpose: a NaN on any rank
gives NaN for sum, mean, max and min alike (np.maximum/np.minimum and ndarray.max/min propagate
NaN, unlike fmax/fmin), and +inf + -inf is NaN. A blow-up on one rank must never be averaged
away. Only ranks in `included` (they ended the step) are reduced; every part is stored raw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from store.base import RawBlock, StepStatus, ValueBatch

# Op codes: the same numbers as proto's ReduceOp, so the registry can store them directly.
OP_SUM, OP_MEAN, OP_MAX, OP_MIN, OP_MEAN_NONZERO = 1, 2, 3, 4, 5
OP_NAMES = {
    OP_SUM: "sum",
    OP_MEAN: "mean",
    OP_MAX: "max",
    OP_MIN: "min",
    OP_MEAN_NONZERO: "mean_nonzero",
}


def additive(ops: np.ndarray) -> np.ndarray:
    """Where an op reads the sum: sum, mean and mean_nonzero."""
    return (ops == OP_SUM) | (ops == OP_MEAN) | (ops == OP_MEAN_NONZERO)


Part = tuple[int, np.ndarray, np.ndarray, np.ndarray]  # rank, ids_S, values_S, have_S


@dataclass
class Rows:
    """Flat per-rank rows of one step."""

    metric_id: np.ndarray  # int32
    rank: np.ndarray  # int32
    value: np.ndarray  # float32


@dataclass
class StepRows:
    """What the writer stores for one reduced step: the raw values as one RawBlock per layout
    (whole vectors) plus flat rows (partial vectors), the reduced values and the status."""

    blocks: list[RawBlock]
    rest: ValueBatch  # raw rows of partial vectors (rank set)
    reduced: ValueBatch
    status: StepStatus
    raw_only: bool = False  # a tier collector's rows: only the raw values are stored (tier.py)
    n_raw: int = field(init=False)  # raw values over blocks and rest

    def __post_init__(self) -> None:
        self.n_raw = sum(b.value.size for b in self.blocks) + int(self.rest.value.size)

    @cached_property
    def raw(self) -> ValueBatch:
        """Every raw value as flat rows (blocks expanded, then rest). Built on first use only:
        at millions of values per step the expansion costs more than the reduction."""
        parts = [b.cells() for b in self.blocks] + [self.rest]

        def cat(key: str, dtype) -> np.ndarray:
            return np.concatenate([getattr(p, key) for p in parts]).astype(dtype, copy=False)

        return ValueBatch(
            step=cat("step", np.int64),
            metric_id=cat("metric_id", np.int32),
            value=cat("value", np.float32),
            rank=cat("rank", np.int32),
        )


def gather(parts: list[Part]) -> Rows:
    """parts: (rank, ids_of_schema, values, have) -> rows of every position that was sent."""
    ids, ranks, vals = [], [], []
    for rank, ids_S, values_S, have_S in parts:
        sel = ids_S[have_S]
        ids.append(sel)
        vals.append(values_S[have_S])
        ranks.append(np.full(sel.size, rank, dtype=np.int32))
    if not ids:
        return Rows(np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.float32))
    return Rows(
        np.concatenate(ids).astype(np.int32, copy=False),
        np.concatenate(ranks),
        np.concatenate(vals).astype(np.float32, copy=False),
    )


class Accumulator:
    """Per metric id of the run: float64 sum, count of ranks, count of nonzero values, max and
    min of what was added, as rows or as whole layout matrices; `result` applies each id's op.
    The nonzero count is kept for mean_nonzero ids only (elsewhere it stays 0)."""

    def __init__(self, ops_M: np.ndarray) -> None:
        self.ops_M = ops_M
        M = int(ops_M.size)
        self.sum_M = np.zeros(M, dtype=np.float64)
        self.count_M = np.zeros(M, dtype=np.int64)
        self.nonzero_M = np.zeros(M, dtype=np.int64)
        self.max_M = np.full(M, -np.inf, dtype=np.float64)
        self.min_M = np.full(M, np.inf, dtype=np.float64)

    def _check(self, metric_id: np.ndarray) -> None:
        if metric_id.size and int(metric_id.max()) >= self.ops_M.size:
            raise ValueError(
                f"metric id {int(metric_id.max())} outside the run's {self.ops_M.size} metrics"
            )

    def add_rows(self, metric_id: np.ndarray, value: np.ndarray) -> None:
        """Rows (metric_id[i], value[i]), ids may repeat (one row per rank)."""
        self._check(metric_id)
        M = self.ops_M.size
        op_R = self.ops_M[metric_id]
        v64 = value.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf propagate on purpose
            self.count_M += np.bincount(metric_id, minlength=M)
            add = additive(op_R)
            if add.any():
                self.sum_M += np.bincount(metric_id[add], weights=v64[add], minlength=M)
            nz = (op_R == OP_MEAN_NONZERO) & (v64 != 0)
            if nz.any():
                self.nonzero_M += np.bincount(metric_id[nz], minlength=M)
            for op, kernel, acc in (
                (OP_MAX, np.maximum, self.max_M),
                (OP_MIN, np.minimum, self.min_M),
            ):
                sel = op_R == op
                if sel.any():
                    kernel.at(acc, metric_id[sel], v64[sel])

    def add_matrix(self, ids_S: np.ndarray, value_RS: np.ndarray) -> None:
        """value_RS[r, j]: rank r's value of metric ids_S[j]; ids_S distinct (one schema)."""
        self._check(ids_S)
        if value_RS.shape[0] == 0:
            return
        ops_S = self.ops_M[ids_S]
        with np.errstate(invalid="ignore", over="ignore"):
            self.count_M[ids_S] += value_RS.shape[0]
            if additive(ops_S).any():  # every column: cheaper than gathering the few of one op
                self.sum_M[ids_S] += np.add.reduce(value_RS, axis=0, dtype=np.float64)
            if (ops_S == OP_MEAN_NONZERO).any():
                nz = ops_S == OP_MEAN_NONZERO
                self.nonzero_M[ids_S[nz]] += np.count_nonzero(value_RS[:, nz], axis=0)
            if (ops_S == OP_MAX).any():
                self.max_M[ids_S] = np.maximum(self.max_M[ids_S], value_RS.max(axis=0))
            if (ops_S == OP_MIN).any():
                self.min_M[ids_S] = np.minimum(self.min_M[ids_S], value_RS.min(axis=0))

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, values f32, n_ranks i32) of every id that had a value, sorted by id."""
        present = np.flatnonzero(self.count_M)
        ops = self.ops_M[present]
        count = self.count_M[present]
        with np.errstate(invalid="ignore", over="ignore"):
            out = self.sum_M[present]
            out = np.where(ops == OP_MEAN, out / np.maximum(count, 1), out)
            nonzero = self.nonzero_M[present]
            out = np.where(ops == OP_MEAN_NONZERO, out / np.maximum(nonzero, 1), out)
            out = np.where(ops == OP_MAX, self.max_M[present], out)
            out = np.where(ops == OP_MIN, self.min_M[present], out)
            vals = out.astype(np.float32)  # beyond float32 range becomes inf
        return present.astype(np.int32), vals, count.astype(np.int32)


def reduce_step(
    step: int,
    parts: list[Part],
    included: set[int],
    ops_M: np.ndarray,
    status: StepStatus,
    *,
    accumulate: bool = True,
) -> StepRows:
    """Raw values of every part; reduced values over the ranks in `included` only (ranks that
    ended the step: a straggler's vector is stored raw but never reduced). Whole vectors are
    grouped by their id-map object (see the module docstring), partial ones go flat.
    accumulate=False: the raw rows only, nothing reduced (a tier collector's step: its
    partial is built from the raw rows, partials.py)."""
    if accumulate and parts and len({p[0] for p in parts}) == 1 and parts[0][0] in included:
        if all(p[3].all() for p in parts):
            one = _one_rank(step, parts, ops_M, status)
            if one is not None:
                return one
    layouts: dict[int, list[Part]] = {}
    partial: list[Part] = []
    for part in parts:
        if part[3].all():
            layouts.setdefault(id(part[1]), []).append(part)
        else:
            partial.append(part)
    acc = Accumulator(ops_M)
    blocks = []
    for group in layouts.values():
        ranks = np.array([p[0] for p in group], dtype=np.int32)
        value_RS = np.stack([p[2] for p in group])  # the one copy of these values
        blocks.append(RawBlock(step=step, rank=ranks, metric_id=group[0][1], value=value_RS))
        if accumulate:
            keep = np.array([r in included for r in ranks.tolist()])
            acc.add_matrix(group[0][1], value_RS if keep.all() else value_RS[keep])
    rows = gather(partial)
    if accumulate and {p[0] for p in partial} <= included:
        acc.add_rows(rows.metric_id, rows.value)
    elif accumulate:
        keep = np.isin(rows.rank, np.fromiter(included, dtype=np.int32, count=len(included)))
        acc.add_rows(rows.metric_id[keep], rows.value[keep])
    ids, vals, n = acc.result()
    rest = ValueBatch(
        step=np.full(rows.value.size, step, dtype=np.int64),
        metric_id=rows.metric_id,
        value=rows.value,
        rank=rows.rank,
    )
    reduced = ValueBatch(
        step=np.full(ids.size, step, dtype=np.int64), metric_id=ids, value=vals, n_ranks=n
    )
    return StepRows(blocks=blocks, rest=rest, reduced=reduced, status=status)


def _one_rank(
    step: int, parts: list[Part], ops_M: np.ndarray, status: StepStatus
) -> StepRows | None:
    """A step that is one rank's whole vectors (a world-1 run; one part per wire schema):
    each metric's reduction over one rank is its value (mean_nonzero's too: 0 when it is 0),
    so no accumulator (five arrays over every id of the run) is built. Exactly the
    accumulator's result: the value through float64, sum, mean and mean_nonzero as 0.0 + value
    (so -0.0 becomes +0.0), sorted by id, n_ranks 1. None (the general path) if an id appears twice among the parts."""
    ids = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    if ids.size and int(ids.max()) >= ops_M.size:
        raise ValueError(f"metric id {int(ids.max())} outside the run's {ops_M.size} metrics")
    v64 = np.concatenate([p[2] for p in parts]).astype(np.float64)
    if ids.size > 1 and not (np.diff(ids) > 0).all():
        order = np.argsort(ids, kind="stable")
        ids, v64 = ids[order], v64[order]
        if (ids[1:] == ids[:-1]).any():
            return None
    ops = ops_M[ids]
    with np.errstate(invalid="ignore", over="ignore"):
        v64 = np.where(additive(ops), v64 + 0.0, v64)
        vals = v64.astype(np.float32)
    rank = np.array([parts[0][0]], np.int32)
    blocks = [  # one per layout, as the general path makes them: the vectors themselves
        RawBlock(step=step, rank=rank, metric_id=ids_S, value=values_S[np.newaxis])
        for _, ids_S, values_S, _ in parts
    ]
    empty = np.empty(0, np.int32)
    rest = ValueBatch(
        step=np.empty(0, np.int64), metric_id=empty, value=np.empty(0, np.float32), rank=empty
    )
    reduced = ValueBatch(
        step=np.full(ids.size, step, dtype=np.int64),
        metric_id=ids.astype(np.int32, copy=False),
        value=vals,
        n_ranks=np.ones(ids.size, np.int32),
    )
    return StepRows(blocks=blocks, rest=rest, reduced=reduced, status=status)
