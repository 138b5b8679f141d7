"""Cross-rank reduction of one step: pure numpy, no per-metric Python.

A step arrives as one float32 vector per (rank, schema) plus a "have" mask (which positions the
rank actually sent) and, per schema, the array mapping schema position -> metric id. Rows are
gathered into flat columns (metric_id, rank, value), then reduced per metric id by the op the
metric declared, with dense scatter kernels over the run's id space:

    sum, mean  np.bincount(ids, weights=float64 values)   (mean = sum / count)
    max, min   np.maximum.at / np.minimum.at into a -inf / +inf filled float64 accumulator

Accumulation is float64 and the result is cast to float32, so a sum of many float32 values
does not lose precision on the way. Non-finite values propagate on purpose: a NaN on any rank
gives NaN for sum, mean, max and min alike (np.maximum/np.minimum propagate NaN, unlike
fmax/fmin), and +inf + -inf is NaN. A blow-up on one rank must never be averaged away.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from store.base import StepStatus, ValueBatch

# Op codes: the same numbers as proto's ReduceOp, so the registry can store them directly.
OP_SUM, OP_MEAN, OP_MAX, OP_MIN = 1, 2, 3, 4
OP_NAMES = {OP_SUM: "sum", OP_MEAN: "mean", OP_MAX: "max", OP_MIN: "min"}


@dataclass
class Rows:
    """Flat per-rank rows of one step."""

    metric_id: np.ndarray   # int32
    rank: np.ndarray        # int32
    value: np.ndarray       # float32


@dataclass
class StepRows:
    """What the writer stores for one reduced step."""

    raw: ValueBatch
    reduced: ValueBatch
    status: StepStatus


def gather(parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> Rows:
    """parts: (rank, ids_of_schema, values, have) -> rows of every position that was sent."""
    ids, ranks, vals = [], [], []
    for rank, ids_S, values_S, have_S in parts:
        sel = ids_S[have_S]
        ids.append(sel)
        vals.append(values_S[have_S])
        ranks.append(np.full(sel.size, rank, dtype=np.int32))
    if not ids:
        return Rows(np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.float32))
    return Rows(np.concatenate(ids).astype(np.int32, copy=False),
                np.concatenate(ranks), np.concatenate(vals).astype(np.float32, copy=False))


def reduce_rows(metric_id: np.ndarray, value: np.ndarray, ops_M: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduce rows per metric id by ops_M[id]. Returns (ids, values f32, n_ranks i32) for every
    id that had at least one row, sorted by id. ops_M: int8 op code per metric id of the run."""
    M = int(ops_M.size)
    if metric_id.size and int(metric_id.max()) >= M:
        raise ValueError(f"metric id {int(metric_id.max())} outside the run's {M} metrics")
    with np.errstate(invalid="ignore", over="ignore"):   # NaN/inf propagate on purpose
        count_M = np.bincount(metric_id, minlength=M)
        present = np.flatnonzero(count_M)
        out_M = np.zeros(M, dtype=np.float64)
        op_R = ops_M[metric_id]
        v64 = value.astype(np.float64)

        additive = (op_R == OP_SUM) | (op_R == OP_MEAN)
        if additive.any():
            out_M += np.bincount(metric_id[additive], weights=v64[additive], minlength=M)
        for op, fill, kernel in ((OP_MAX, -np.inf, np.maximum), (OP_MIN, np.inf, np.minimum)):
            sel = op_R == op
            if sel.any():
                acc_M = np.full(M, fill, dtype=np.float64)
                kernel.at(acc_M, metric_id[sel], v64[sel])
                is_op = ops_M == op
                out_M[is_op] = acc_M[is_op]
        is_mean = ops_M == OP_MEAN
        out_M[is_mean] /= np.maximum(count_M[is_mean], 1)
        vals = out_M[present].astype(np.float32)           # beyond float32 range becomes inf
    return present.astype(np.int32), vals, count_M[present].astype(np.int32)


def reduce_step(step: int, parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
                included: set[int], ops_M: np.ndarray, status: StepStatus) -> StepRows:
    """Raw rows of every part; reduced rows over the ranks in `included` only (ranks that
    ended the step: a straggler's partial vector is stored raw but never reduced)."""
    rows = gather(parts)
    if {p[0] for p in parts} <= included:
        keep = slice(None)
    else:
        keep = np.isin(rows.rank, np.fromiter(included, dtype=np.int32, count=len(included)))
    ids, vals, n = reduce_rows(rows.metric_id[keep], rows.value[keep], ops_M)
    raw = ValueBatch(step=np.full(rows.value.size, step, dtype=np.int64),
                     metric_id=rows.metric_id, value=rows.value, rank=rows.rank)
    reduced = ValueBatch(step=np.full(ids.size, step, dtype=np.int64), metric_id=ids,
                         value=vals, n_ranks=n)
    return StepRows(raw=raw, reduced=reduced, status=status)
