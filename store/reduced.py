"""Reduced values as vectors: the codec between reduced value rows and stored vector rows.

Reduced values are stored the way raw ones are (vectors.py): one stored row per (step, layout)
holding the float32 values of the layout's ids, in layout order, the layouts themselves in the
run's one layout table (shared with the raw vectors, each stored once per run). A row also
carries `n_ranks`, the ranks its values were reduced over: a write is split by (step, n_ranks),
so a step whose metrics were sent by different numbers of ranks (expert-parallel groups, a
straggler's partial vector) is a few rows of stable layouts, and a steady run reuses them every
step.

A world-1 run stores its values once. Its reduced value of a metric is its one rank's raw
value (sum, mean, max, min and mean_nonzero of one value are that value), so at flush the store compares each
reduced row of n_ranks == 1 with rank 0's raw cells of that step written in the same flush;
when every cell is there with the same bits, the row is stored as a reference (`source` = 0,
`values` empty) and reads take those cells from the raw vectors (`resolve`). Anything else (a
cell that differs, e.g. -0.0 summed to +0.0, or raw values written in another flush) keeps its
own values. A reference means what it says: if rank 0's raw value of that (step, metric) is
rewritten later, the reduced value read is the rewritten one. Backends whose raw values may
expire (ClickHouse's raw_ttl_days) store no references.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import polars as pl

from store.base import StoreError
from store.frames import REDUCED_SCHEMA, REDUCED_VECTORS_SCHEMA, empty, last_wins
from store.vectors import explode, grouped_vectors, layout_hash, vector_cells

OWN = -1  # `source` of a row holding its own values
PENDING = [c for c in REDUCED_VECTORS_SCHEMA if c != "ver"]  # columns before the backend's ver


def reduced_vectors(
    step: np.ndarray, mid: np.ndarray, val: np.ndarray, n: np.ndarray
) -> tuple[pl.DataFrame, dict[int, np.ndarray]]:
    """Validated reduced rows (store.validate.values_arrays' "reduced" columns: no frame in
    between, which at 10 k metrics a step cost more than the codec) -> pending vector rows,
    one per (step, n_ranks), ids ascending (one layout per set of ids, whatever the write
    order), the last of repeated (step, metric_id) rows kept; + the layouts they use. Numpy
    only, and it sorts only what is not sorted already (the collector writes each step's ids
    ascending)."""
    if step.size > 1:
        ds, dm = np.diff(step), np.diff(mid)
        if not ((ds > 0) | ((ds == 0) & (dm > 0))).all():  # unsorted, or a key repeated
            order = np.lexsort((mid, step))  # stable: write order within a key
            step, mid, val, n = step[order], mid[order], val[order], n[order]
            last = np.append((step[1:] != step[:-1]) | (mid[1:] != mid[:-1]), True)
            step, mid, val, n = step[last], mid[last], val[last], n[last]
    vec, layouts = grouped_vectors(step, n, mid, val)  # the raw codec, n_ranks for rank
    vec = vec.rename({"rank": "n_ranks"}).with_columns(source=pl.lit(OWN, pl.Int32))
    return vec.select(PENDING), layouts


def share_with_raw(
    reduced: pl.DataFrame, raw: pl.DataFrame, layouts: Mapping[int, np.ndarray], rank: int = 0
) -> pl.DataFrame:
    """Pending reduced rows (PENDING columns) with each n_ranks == 1 row whose cells all equal
    `rank`'s cells in the pending raw vectors `raw` (same step, bit for bit) turned into a
    reference to them (source = rank, values empty). Rows are kept in their order."""
    single = reduced.with_row_index("_row").filter(
        (pl.col("n_ranks") == 1) & (pl.col("source") == OWN)
    )
    mine = raw.filter(pl.col("rank") == rank)
    if single.height == 0 or mine.height == 0:
        return reduced
    mine = mine.filter(pl.col("step").is_in(single["step"].implode()))
    if mine.height == 0:
        return reduced
    same = _same_vectors(single, mine, layouts)
    single = single.filter(~pl.col("_row").is_in(pl.Series(same, dtype=pl.UInt32).implode()))
    if single.height == 0:
        return _referencing(reduced, same, rank)
    raw_cells = vector_cells(  # last write of each cell wins, as a read will see it
        mine.with_columns(ver=pl.int_range(mine.height, dtype=pl.UInt64)), layouts
    )
    red_cells = explode(single.with_columns(ver=pl.col("_row").cast(pl.UInt64)), layouts, None, ())
    matched = (
        red_cells.select("step", "metric_id", "ver", bits=_bits(red_cells))
        .join(
            raw_cells.select("step", "metric_id", raw_bits=_bits(raw_cells)),
            on=["step", "metric_id"],
            how="left",
        )
        .group_by("ver")
        .agg(same=(pl.col("bits") == pl.col("raw_bits")).fill_null(False).all())
        .filter(pl.col("same"))
    )
    rows = np.concatenate([same, matched["ver"].cast(pl.Int64).to_numpy()])
    return _referencing(reduced, rows, rank)


def _same_vectors(
    single: pl.DataFrame, mine: pl.DataFrame, layouts: Mapping[int, np.ndarray]
) -> np.ndarray:
    """The usual case, vector against vector: the `_row`s of `single` whose step's raw rows
    in `mine`, in write order, put together are the reduced row's ids in its order (one
    layout hash: no id twice, so no rewritten cell) with its bytes, i.e. every cell with the
    same bits. Whatever this leaves out is compared cell by cell."""
    if single["step"].n_unique() != single.height:  # several rows of a step: cell by cell
        return np.empty(0, np.int64)
    red = {s: (h, v, r) for s, h, v, r in single.select("step", "layout", "values", "_row").rows()}
    out = []
    for step, hashes, blobs in (
        mine.group_by("step", maintain_order=True).agg("layout", "values").rows()
    ):
        h, values, row = red[step]
        if len(hashes) == 1:
            ids_hash = hashes[0]
        elif all(k in layouts for k in hashes):
            ids_hash = layout_hash(np.concatenate([layouts[k] for k in hashes]))
        else:
            continue
        if ids_hash == h and b"".join(blobs) == values:
            out.append(row)
    return np.asarray(out, np.int64)


def _referencing(reduced: pl.DataFrame, rows: np.ndarray, rank: int) -> pl.DataFrame:
    """`reduced` with `rows` (positions) turned into references to `rank`'s raw cells."""
    if rows.size == 0:
        return reduced
    shared = pl.Series(np.zeros(reduced.height, bool))
    shared[rows] = True
    return reduced.with_columns(
        source=pl.when(shared).then(pl.lit(rank, pl.Int32)).otherwise(pl.col("source")),
        values=pl.when(shared).then(pl.lit(b"", pl.Binary)).otherwise(pl.col("values")),
    )


def _bits(cells: pl.DataFrame) -> pl.Series:
    """The float32 values' bit patterns (NaN payloads and -0.0 compared exactly)."""
    return pl.Series(cells["value"].to_numpy().astype("<f4", copy=False).view("<u4"))


RawCells = Callable[[int, int | None, int | None, int | None], pl.DataFrame]
"""(rank, metric_id or None, start, stop) -> that rank's logical raw rows (RAW_SCHEMA)."""


def resolve(cells: pl.DataFrame, raw_cells: RawCells) -> pl.DataFrame:
    """Reduced cells as stored (step, n_ranks, source, ver, metric_id, value; repeated keys
    in, values of referencing rows not there yet) -> logical reduced rows (REDUCED_SCHEMA), one
    per (step, metric_id), the highest ver's. Referencing cells take `raw_cells`' value;
    StoreError if one is missing (the raw vectors were removed behind the store's back)."""
    if cells.height == 0:
        return empty(REDUCED_SCHEMA)
    parts = [cells.filter(pl.col("source") == OWN)]
    refs = cells.filter(pl.col("source") != OWN)
    for rank in refs["source"].unique().to_list():
        want = refs.filter(pl.col("source") == rank)
        mids = want["metric_id"].unique()
        lo, hi = int(want["step"].min()), int(want["step"].max()) + 1  # type: ignore[arg-type]
        raw = raw_cells(rank, int(mids[0]) if mids.len() == 1 else None, lo, hi)
        got = want.drop("value").join(
            raw.select("step", "metric_id", "value"), on=["step", "metric_id"], how="inner"
        )
        if got.height != want.height:
            raise StoreError(
                f"{want.height - got.height} reduced values refer to raw values of rank {rank} "
                "that are not stored (removed outside the store?)"
            )
        parts.append(got.select(cells.columns))
    out = last_wins(pl.concat(parts).sort("ver"), ["step", "metric_id"])
    return out.select(list(REDUCED_SCHEMA)).cast(REDUCED_SCHEMA)
