"""Raw per-rank values as vectors: the codec between value rows and stored vector rows.

Raw per-rank values are stored as vectors, never as one row per value: one stored row per
(rank, step, layout) holds that rank's float32 values (little-endian bytes) for the metric ids
of the layout, in layout order; a layout is stored once per run under a 64-bit hash of its ids
(`layout_hash`). A RawBlock is R such rows sharing one layout; a ValueBatch of flat rows is
grouped by (step, rank) into vectors with layouts of their own. The logical raw table is
recovered by `vector_cells`: a cell (rank, step, metric_id) is the value from the newest
vector (highest `ver`, i.e. last written) whose layout holds the metric, so last write wins
per cell across both write paths and across overlapping layouts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa

from store.base import InvalidInput, RawBlock, StoreError, ValueBatch
from store.frames import RAW_SCHEMA, RAW_VECTORS_SCHEMA, empty, last_wins
from store.validate import int_column, int_field, values_arrays


def layout_hash(ids: npt.ArrayLike) -> int:
    """A layout's key: 64 bits of BLAKE2b over its ids as int32 little-endian, the same in
    every process and version (stored keys must stay valid). Two layouts colliding needs
    ~2^32 distinct layouts in one run."""
    digest = hashlib.blake2b(np.ascontiguousarray(ids, dtype="<i4").tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def _vectors(
    step: np.ndarray, rank: np.ndarray, layout: np.ndarray, flat: np.ndarray, offsets: np.ndarray
) -> pl.DataFrame:
    """Pending vector rows (RAW_VECTORS_SCHEMA less ver): row i's values are
    flat[offsets[i]:offsets[i + 1]], passed to Arrow as one buffer (no Python per row)."""
    data = np.ascontiguousarray(flat, dtype="<f4")
    blobs = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(),
        rank.size,
        [None, pa.py_buffer(offsets.astype(np.int64) * 4), pa.py_buffer(data)],
    )
    return pl.DataFrame(
        {"step": step, "rank": rank, "layout": layout, "values": pl.Series("values", blobs)},
        schema={k: RAW_VECTORS_SCHEMA[k] for k in ("step", "rank", "layout", "values")},
    )


# Layouts whose ids were found distinct (by hash): a steady run writes the same few layouts
# every step, and sorting its ids to check them again each time was most of the raw write of a
# wide step (np.unique, 2/3 of block_vectors at 100 k metrics).
_DISTINCT: set[int] = set()


def block_vectors(block: RawBlock) -> tuple[pl.DataFrame, dict[int, np.ndarray]]:
    """RawBlock -> (one pending vector row per rank, {layout: ids}); values copied."""
    if not isinstance(block, RawBlock):
        raise InvalidInput(f"expected RawBlock, got {type(block).__name__}")
    step = int_field("RawBlock step", block.step, 0)
    rank = int_column("RawBlock rank", block.rank, np.int32, low=0)
    ids = int_column("RawBlock metric_id", block.metric_id, np.int32, low=0)
    h = layout_hash(ids)
    for name, col in (("rank", rank), ("metric_id", ids)):
        if not (name == "metric_id" and h in _DISTINCT) and np.unique(col).size != col.size:
            raise InvalidInput(f"RawBlock {name} must hold distinct values")
    if len(_DISTINCT) >= 4096:  # a run's layouts are a few; this only bounds the set
        _DISTINCT.clear()
    _DISTINCT.add(h)
    value = np.asarray(block.value)
    if value.shape != (rank.size, ids.size):
        raise InvalidInput(
            f"RawBlock value must have shape (len(rank), len(metric_id)) = "
            f"({rank.size}, {ids.size}), got {value.shape}"
        )
    if value.dtype.kind not in "fiu":
        raise InvalidInput(
            f"RawBlock value must be float32 (or another real number type), got dtype {value.dtype}"
        )
    if value.size == 0:
        return _vectors(
            np.empty(0, np.int64),
            np.empty(0, np.int32),
            np.empty(0, np.uint64),
            np.empty(0, np.float32),
            np.zeros(1, np.int64),
        ), {}
    with np.errstate(over="ignore"):  # f64 beyond f32 range becomes inf, kept
        flat = np.array(value, dtype="<f4", order="C", copy=True)  # the caller may reuse it
    frame = _vectors(
        np.full(rank.size, step, np.int64),
        rank,
        np.full(rank.size, h, np.uint64),
        flat.reshape(-1),
        np.arange(rank.size + 1, dtype=np.int64) * ids.size,
    )
    return frame, {h: ids}


def batch_vectors(batch: ValueBatch) -> tuple[pl.DataFrame, dict[int, np.ndarray]]:
    """Flat raw rows -> one pending vector per (step, rank), ids in write order, the last of
    repeated (step, rank, metric_id) rows kept; + {layout: ids}. Numpy only, and only sorts
    what is not already grouped (the collector writes each rank's values contiguously)."""
    cols = values_arrays(batch, "raw")
    return grouped_vectors(cols["step"], cols["rank"], cols["metric_id"], cols["value"])


def grouped_vectors(
    step: np.ndarray, rank: np.ndarray, mid: np.ndarray, val: np.ndarray
) -> tuple[pl.DataFrame, dict[int, np.ndarray]]:
    """batch_vectors of rows already validated (values_arrays' columns: step int64, rank
    and metric_id int32 >= 0, value float32)."""
    if step.size == 0:
        return block_vectors(
            RawBlock(0, np.empty(0, np.int32), np.empty(0, np.int32), np.empty((0, 0), np.float32))
        )
    starts = _group_starts(step, rank)
    ranks = int(rank.max()) + 1
    grouped = (int(step.max()) - int(step.min())) * ranks < 2**62 and np.unique(
        (step[starts] - step.min()) * ranks + rank[starts]
    ).size == starts.size
    if not grouped:  # some (step, rank) in several runs
        order = np.lexsort((rank, step))  # stable: write order within a group
        step, rank, mid, val = step[order], rank[order], mid[order], val[order]
        starts = _group_starts(step, rank)
    group = np.zeros(step.size, np.int64)
    group[starts[1:]] = 1
    key = np.cumsum(group) * (int(mid.max()) + 1) + mid  # (group, metric_id), < 2^62
    if int(key.max()) < 8 * key.size + 1024:  # dense: count instead of sorting
        repeated = np.bincount(key).max() > 1
    else:
        k = np.sort(key)
        repeated = bool((k[1:] == k[:-1]).any())
    if repeated:  # keep the last write of each cell
        by_key = np.argsort(key, kind="stable")
        ks = key[by_key]
        last = np.append(ks[1:] != ks[:-1], True)
        keep = np.sort(by_key[last])
        step, rank, mid, val = step[keep], rank[keep], mid[keep], val[keep]
        starts = _group_starts(step, rank)
    bounds = np.append(starts, step.size)
    layouts: dict[int, np.ndarray] = {}
    keys = np.empty(starts.size, np.uint64)
    last_ids: np.ndarray | None = None
    last_h = 0
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        ids = mid[a:b]
        if last_ids is None or not np.array_equal(ids, last_ids):  # runs of equal layouts
            last_ids, last_h = ids, layout_hash(ids)
            layouts.setdefault(last_h, ids.copy())
        keys[i] = last_h
    return _vectors(step[starts], rank[starts], keys, val, bounds), layouts


def _group_starts(step: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Indices where a run of equal (step, rank) begins."""
    change = np.empty(step.size, bool)
    change[0] = True
    np.logical_or(step[1:] != step[:-1], rank[1:] != rank[:-1], out=change[1:])
    return np.flatnonzero(change)


def _blob_buffer(values: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(byte offsets [n + 1], bytes) of a Binary column, without a Python object per row."""
    arr = values.to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = pa.concat_arrays(arr.chunks) if arr.num_chunks else pa.array([], pa.large_binary())
    arr = arr.cast(pa.large_binary())
    _, offs, data = arr.buffers()
    offsets = np.frombuffer(offs, np.int64)[arr.offset : arr.offset + len(arr) + 1]
    return offsets, (np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8))


def vector_cells(
    vec: pl.DataFrame, layouts: Mapping[int, np.ndarray], metric_id: int | None = None
) -> pl.DataFrame:
    """Stored vectors (RAW_VECTORS_SCHEMA) -> logical raw rows (RAW_SCHEMA), one per
    (rank, step, metric_id): the value of the highest-ver vector holding the metric. With
    metric_id, only that metric's cells are decoded (4 bytes of each vector)."""
    if vec.height == 0:
        return empty(RAW_SCHEMA)
    out = explode(vec, layouts, metric_id, ("rank",))
    out = last_wins(out.sort("ver"), ["rank", "step", "metric_id"])
    return out.select(list(RAW_SCHEMA)).cast(RAW_SCHEMA)


def explode(
    vec: pl.DataFrame,
    layouts: Mapping[int, np.ndarray],
    metric_id: int | None,
    carry: tuple[str, ...],
    *,
    values: bool = True,
) -> pl.DataFrame:
    """Vector rows (step, layout, values, ver and the `carry` columns) -> one row per cell:
    step, *carry, ver, metric_id, value (f32), repeated keys left in, any order. With
    metric_id, only rows whose layout holds it, 4 bytes of each. values=False: rows whose
    `values` are not there (reduced rows that point at raw ones) give metric ids only."""
    cols = ["step", *carry, "ver"]
    if vec.height == 0:
        return vec.select(cols).with_columns(
            metric_id=pl.lit(0, pl.Int32), value=pl.lit(0.0, pl.Float32)
        )
    hashes = vec["layout"].to_numpy()
    uniq, inverse = np.unique(hashes, return_inverse=True)
    missing = [int(h) for h in uniq if int(h) not in layouts]
    if missing:
        raise StoreError(
            f"stored vectors refer to {len(missing)} unknown layout(s), e.g. "
            f"{min(missing):#x}: the layout table is incomplete"
        )
    sizes = np.array([layouts[int(h)].size for h in uniq], np.int64)
    offsets, data = _blob_buffer(vec["values"]) if values else (None, None)
    if offsets is not None and not np.array_equal(np.diff(offsets), sizes[inverse] * 4):
        raise StoreError("stored vectors whose length differs from their layout's: corrupt data")
    if metric_id is not None:
        pos = np.array([_position(layouts[int(h)], metric_id) for h in uniq], np.int64)[inverse]
        keep = pos >= 0
        out = (
            vec.filter(pl.Series(keep))
            .select(cols)
            .with_columns(metric_id=pl.lit(metric_id, pl.Int32))
        )
        if offsets is None or data is None:
            return out.with_columns(value=pl.lit(0.0, pl.Float32))
        start = offsets[:-1][keep] + 4 * pos[keep]
        cells = data[start[:, None] + np.arange(4)].reshape(-1).view("<f4")
        return out.with_columns(value=pl.Series(cells, dtype=pl.Float32))
    n = sizes[inverse]
    ids = np.concatenate([layouts[int(h)] for h in hashes]).astype(np.int32)
    frame = {c: np.repeat(vec[c].to_numpy(), n) for c in cols}
    if offsets is None or data is None:
        cells = np.zeros(ids.size, np.float32)
    else:
        cells = np.frombuffer(data[offsets[0] : offsets[-1]].tobytes(), "<f4")
    return pl.DataFrame({**frame, "metric_id": ids, "value": cells}).cast(
        {c: vec.schema[c] for c in cols}
    )


def layouts_holding(layouts: Mapping[int, np.ndarray], metric_id: int | None) -> list[int] | None:
    """Hashes of the layouts whose ids include metric_id (None: no metric asked, every
    layout); the vectors a per-rank series read has to decode."""
    if metric_id is None:
        return None
    return [h for h, ids in layouts.items() if (ids == metric_id).any()]


def _position(ids: np.ndarray, metric_id: int) -> int:
    hit = np.flatnonzero(ids == metric_id)
    return int(hit[0]) if hit.size else -1
