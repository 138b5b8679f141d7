"""The column-level contract every backend shares: read-frame schemas, write validation, dedup.

Writes arrive as numpy columns (ValueBatch, MetricDict, RawBlock) and leave here as polars
frames with the exact dtypes below, copied so the caller may reuse its buffers at once. Reads go
out with the same schemas whatever the backend, so a dashboard never sees an Int64 from one
store and an Int32 from another.

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
import json
import math
from collections.abc import Mapping

import numpy as np
import polars as pl
import pyarrow as pa

from store.base import (
    REDUCE_OPS,
    SEVERITIES,
    ClipRecord,
    EventRecord,
    InvalidInput,
    MetricDict,
    RawBlock,
    StepStatus,
    StoreError,
    ValueBatch,
)

# ---- read-frame schemas ------------------------------------------------------------------
RUNS_SCHEMA = {
    "run": pl.Utf8,
    "world_size": pl.Int32,
    "config_json": pl.Utf8,
    "started_at": pl.Float64,
    "updated_at": pl.Float64,
    "last_step": pl.Int64,  # null until a step was written
    "status": pl.Utf8,
}
METRICS_SCHEMA = {
    "metric_id": pl.Int32,
    "name": pl.Utf8,
    "layer": pl.Int32,
    "expert": pl.Int32,
    "head": pl.Int32,
    "stat": pl.Utf8,
    "unit": pl.Utf8,
    "reduce": pl.Utf8,
}
RAW_SCHEMA = {"step": pl.Int64, "metric_id": pl.Int32, "rank": pl.Int32, "value": pl.Float32}
REDUCED_SCHEMA = {"step": pl.Int64, "metric_id": pl.Int32, "value": pl.Float32, "n_ranks": pl.Int32}
STEPS_SCHEMA = {
    "step": pl.Int64,
    "n_ranks": pl.Int32,
    "missing_ranks": pl.List(pl.Int32),
    "complete": pl.Boolean,
    "wall_time": pl.Float64,
}
EVENTS_SCHEMA = {
    "step": pl.Int64,
    "kind": pl.Utf8,
    "site": pl.Utf8,
    "value": pl.Float64,
    "threshold": pl.Float64,
    "severity": pl.Utf8,
    "onset_step": pl.Int64,
    "detail": pl.Utf8,
}
CLIPS_SCHEMA = {
    "version": pl.Int64,
    "step": pl.Int64,
    "layer": pl.Int32,
    "site": pl.Utf8,
    "limit": pl.Float32,
    "reason": pl.Utf8,
    "acked_step": pl.Int64,
}
# Stored raw vectors: `values` is float32 little-endian bytes, one per id of the layout; `ver`
# (set by the backend at commit, increasing in write order) decides which vector wins a cell.
RAW_VECTORS_SCHEMA = {
    "step": pl.Int64,
    "rank": pl.Int32,
    "layout": pl.UInt64,
    "values": pl.Binary,
    "ver": pl.UInt64,
}
SERIES_SCHEMA = {"step": pl.Int64, "value": pl.Float32}
AT_STEP_SCHEMA = {
    "metric_id": pl.Int32,
    "name": pl.Utf8,
    "layer": pl.Int32,
    "expert": pl.Int32,
    "head": pl.Int32,
    "stat": pl.Utf8,
    "value": pl.Float32,
}

# Per value table: schema, natural key within a run, and the on-disk sort order (series reads
# filter on metric_id first, so rows of one metric sit together; raw vectors are read per rank).
TABLES = {
    "raw_vectors": (RAW_VECTORS_SCHEMA, ("rank", "step", "layout")),
    "reduced": (REDUCED_SCHEMA, ("metric_id", "step")),
    "steps": (STEPS_SCHEMA, ("step",)),
    "events": (EVENTS_SCHEMA, ("step", "kind", "site")),
    "clips": (CLIPS_SCHEMA, ("version", "layer", "site")),
}

_I32_MAX = 2**31 - 1


def empty(schema: dict) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def last_wins(
    df: pl.DataFrame, keys: tuple[str, ...] | list[str], *, maintain_order: bool = False
) -> pl.DataFrame:
    """Keep the last row (in frame order) of every natural key: the idempotency rule.
    maintain_order keeps the survivors in frame order (raw vectors: order is write order)."""
    if df.height <= 1:
        return df
    return df.unique(subset=list(keys), keep="last", maintain_order=maintain_order)


# ---- write validation --------------------------------------------------------------------
def _int_column(name: str, x, dtype, *, low: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise InvalidInput(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=dtype)
    if arr.dtype.kind not in "iu":
        raise InvalidInput(f"{name} must hold integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    top = _I32_MAX if dtype == np.int32 else 2**63 - 1
    if lo < low or hi > top:
        raise InvalidInput(f"{name} values must lie in [{low}, {top}], got [{lo}, {hi}]")
    return np.array(arr, dtype=dtype, copy=True)  # copy: the caller may reuse its buffer


def _str_column(name: str, x, n: int) -> list[str]:
    if isinstance(x, str) or len(x) != n:
        raise InvalidInput(f"{name} must be a list of {n} strings")
    out = list(x)
    if not all(isinstance(s, str) for s in out):
        raise InvalidInput(f"{name} must hold only strings")
    return out


def metrics_frame(md: MetricDict) -> pl.DataFrame:
    """MetricDict -> frame (METRICS_SCHEMA), last row wins for a repeated metric_id."""
    if not isinstance(md, MetricDict):
        raise InvalidInput(f"expected MetricDict, got {type(md).__name__}")
    ids = _int_column("metric_id", md.metric_id, np.int32, low=0)
    n = ids.size
    cols = {"metric_id": ids}
    for key in ("layer", "expert", "head"):
        col = _int_column(key, getattr(md, key), np.int32, low=-1)
        if col.size != n:
            raise InvalidInput(
                f"ragged metric dictionary: {key} has {col.size} rows, metric_id has {n}"
            )
        cols[key] = col
    for key in ("name", "stat", "unit", "reduce"):
        cols[key] = _str_column(key, getattr(md, key), n)
    if any(not s for s in cols["name"]):
        raise InvalidInput("metric names must be non-empty")
    bad = sorted(set(cols["reduce"]) - set(REDUCE_OPS))
    if bad:
        raise InvalidInput(f"reduce must be one of {REDUCE_OPS}, got {bad}")
    df = pl.DataFrame(cols, schema=METRICS_SCHEMA)
    return last_wins(df, ["metric_id"])


def merge_metrics(old: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
    """Upsert `new` into `old` by metric_id; names must stay unique (series() reads by name)."""
    merged = last_wins(pl.concat([old, new]), ["metric_id"]).sort("metric_id")
    dup = merged.filter(pl.col("name").is_duplicated())
    if dup.height:
        pairs = dup.select("name", "metric_id").head(6).rows()
        raise InvalidInput(f"metric names must be unique within a run; shared by ids: {pairs}")
    return merged


def values_frame(batch: ValueBatch, table: str) -> pl.DataFrame:
    """ValueBatch -> frame of RAW_SCHEMA ("raw": rank set) or REDUCED_SCHEMA ("reduced")."""
    if not isinstance(batch, ValueBatch):
        raise InvalidInput(f"expected ValueBatch, got {type(batch).__name__}")
    per_row, other = ("rank", "n_ranks") if table == "raw" else ("n_ranks", "rank")
    if getattr(batch, per_row) is None:
        raise InvalidInput(f"{table} values need batch.{per_row}")
    if getattr(batch, other) is not None:
        raise InvalidInput(f"{table} values take batch.{per_row}, not batch.{other}")
    cols = {
        "step": _int_column("step", batch.step, np.int64, low=0),
        "metric_id": _int_column("metric_id", batch.metric_id, np.int32, low=0),
        per_row: _int_column(per_row, getattr(batch, per_row), np.int32, low=0),
    }
    value = np.asarray(batch.value)
    if value.ndim != 1 or (value.size and value.dtype.kind not in "fiu"):
        raise InvalidInput(f"value must be a 1-D numeric array, got {value.dtype} {value.shape}")
    with np.errstate(over="ignore"):  # f64 beyond f32 range becomes inf, kept
        cols["value"] = np.array(value, dtype=np.float32, copy=True)
    lengths = {k: v.size for k, v in cols.items()}
    if len(set(lengths.values())) != 1:
        raise InvalidInput(f"ragged value batch: column lengths {lengths}")
    schema = RAW_SCHEMA if table == "raw" else REDUCED_SCHEMA
    return pl.DataFrame({k: cols[k] for k in schema}, schema=schema)


# ---- raw values as vectors ---------------------------------------------------------------
def layout_hash(ids: np.ndarray) -> int:
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


def block_vectors(block: RawBlock) -> tuple[pl.DataFrame, dict[int, np.ndarray]]:
    """RawBlock -> (one pending vector row per rank, {layout: ids}); values copied."""
    if not isinstance(block, RawBlock):
        raise InvalidInput(f"expected RawBlock, got {type(block).__name__}")
    step = _int_field("RawBlock step", block.step, 0)
    rank = _int_column("RawBlock rank", block.rank, np.int32, low=0)
    ids = _int_column("RawBlock metric_id", block.metric_id, np.int32, low=0)
    for name, col in (("rank", rank), ("metric_id", ids)):
        if np.unique(col).size != col.size:
            raise InvalidInput(f"RawBlock {name} must hold distinct values")
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
            *(np.empty(0, t) for t in (np.int64, np.int32, np.uint64)),
            np.empty(0, np.float32),
            np.zeros(1, np.int64),
        ), {}
    with np.errstate(over="ignore"):  # f64 beyond f32 range becomes inf, kept
        flat = np.array(value, dtype="<f4", order="C", copy=True)  # the caller may reuse it
    h = layout_hash(ids)
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
    df = values_frame(batch, "raw")
    if df.height == 0:
        return block_vectors(
            RawBlock(0, np.empty(0, np.int32), np.empty(0, np.int32), np.empty((0, 0), np.float32))
        )
    step, rank = df["step"].to_numpy(), df["rank"].to_numpy()
    mid, val = df["metric_id"].to_numpy(), df["value"].to_numpy()
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
    last_ids, last_h = None, 0
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
    hashes = vec["layout"].to_numpy()
    missing = set(np.unique(hashes).tolist()) - set(layouts)
    if missing:
        raise StoreError(
            f"raw vectors refer to {len(missing)} unknown layout(s), e.g. "
            f"{min(missing):#x}: the layout table is incomplete"
        )
    offsets, data = _blob_buffer(vec["values"])
    uniq, inverse = np.unique(hashes, return_inverse=True)
    sizes = np.array([layouts[int(h)].size for h in uniq], np.int64)
    if not np.array_equal(np.diff(offsets), sizes[inverse] * 4):
        raise StoreError("raw vectors whose length differs from their layout's: corrupt data")
    if metric_id is not None:
        pos = np.array([_position(layouts[int(h)], metric_id) for h in uniq], np.int64)[inverse]
        keep = pos >= 0
        start = offsets[:-1][keep] + 4 * pos[keep]
        cells = data[start[:, None] + np.arange(4)].reshape(-1).view("<f4")
        out = (
            vec.filter(pl.Series(keep))
            .select("step", "rank", "ver")
            .with_columns(
                metric_id=pl.lit(metric_id, pl.Int32), value=pl.Series(cells, dtype=pl.Float32)
            )
        )
    else:
        n = sizes[inverse]
        ids = np.concatenate([layouts[int(h)] for h in hashes]).astype(np.int32)
        cells = np.frombuffer(data[offsets[0] : offsets[-1]].tobytes(), "<f4")
        out = pl.DataFrame(
            {
                "step": np.repeat(vec["step"].to_numpy(), n),
                "rank": np.repeat(vec["rank"].to_numpy(), n),
                "ver": np.repeat(vec["ver"].to_numpy(), n),
                "metric_id": ids,
                "value": cells,
            }
        )
    out = last_wins(out.sort("ver"), ["rank", "step", "metric_id"])
    return out.select(list(RAW_SCHEMA)).cast(RAW_SCHEMA)


def layouts_holding(layouts: Mapping[int, np.ndarray], metric_id: int | None) -> list[int] | None:
    """Hashes of the layouts whose ids include metric_id (None: no metric asked, every
    layout); the vectors a per-rank series read has to decode."""
    if metric_id is None:
        return None
    return [h for h, ids in layouts.items() if (ids == metric_id).any()]


def _position(ids: np.ndarray, metric_id: int) -> int:
    hit = np.flatnonzero(ids == metric_id)
    return int(hit[0]) if hit.size else -1


def steps_frame(steps: list[StepStatus]) -> pl.DataFrame:
    """StepStatus list -> frame (STEPS_SCHEMA). One Python object per step, never per value."""
    if isinstance(steps, StepStatus):
        steps = [steps]
    rows = {k: [] for k in STEPS_SCHEMA}
    for s in steps:
        if not isinstance(s, StepStatus):
            raise InvalidInput(f"expected StepStatus, got {type(s).__name__}")
        if not isinstance(s.step, (int, np.integer)) or s.step < 0:
            raise InvalidInput(f"step must be an integer >= 0, got {s.step!r}")
        if not isinstance(s.n_ranks, (int, np.integer)) or not 0 <= s.n_ranks <= _I32_MAX:
            raise InvalidInput(f"n_ranks must be an integer >= 0, got {s.n_ranks!r}")
        missing = [int(_check_rank(r)) for r in s.missing_ranks]
        if not isinstance(s.wall_time, (int, float)) or not math.isfinite(s.wall_time):
            raise InvalidInput(f"wall_time must be a finite number, got {s.wall_time!r}")
        rows["step"].append(int(s.step))
        rows["n_ranks"].append(int(s.n_ranks))
        rows["missing_ranks"].append(missing)
        rows["complete"].append(bool(s.complete))
        rows["wall_time"].append(float(s.wall_time))
    return pl.DataFrame(rows, schema=STEPS_SCHEMA)


def _int_field(what: str, v, low: int, top: int = 2**63 - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not low <= v <= top:
        raise InvalidInput(f"{what} must be an integer in [{low}, {top}], got {v!r}")
    return int(v)


def _text_field(what: str, v, *, empty: bool = False) -> str:
    if not isinstance(v, str) or (not empty and not v):
        raise InvalidInput(f"{what} must be a {'' if empty else 'non-empty '}string, got {v!r}")
    return v


def _float_field(what: str, v, *, nan: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InvalidInput(f"{what} must be a number, got {v!r}")
    if not nan and math.isnan(v):
        raise InvalidInput(f"{what} must not be NaN")
    return float(v)


def events_frame(events: list[EventRecord]) -> pl.DataFrame:
    """EventRecord list -> frame (EVENTS_SCHEMA). Values may be non-finite (a NaN loss is
    exactly what a non-finite event reports); detail must be JSON object text."""
    rows = {k: [] for k in EVENTS_SCHEMA}
    for e in [events] if isinstance(events, EventRecord) else events:
        if not isinstance(e, EventRecord):
            raise InvalidInput(f"expected EventRecord, got {type(e).__name__}")
        step = _int_field("event step", e.step, 0)
        onset = _int_field("event onset_step", e.onset_step, 0)
        if onset > step:
            raise InvalidInput(f"event onset_step {onset} lies after its step {step}")
        if e.severity not in SEVERITIES:
            raise InvalidInput(f"event severity must be one of {SEVERITIES}, got {e.severity!r}")
        detail = _text_field("event detail", e.detail)
        try:
            ok = isinstance(json.loads(detail), dict)
        except ValueError:
            ok = False
        if not ok:
            raise InvalidInput(f"event detail must be a JSON object, got {detail[:80]!r}")
        rows["step"].append(step)
        rows["kind"].append(_text_field("event kind", e.kind))
        rows["site"].append(_text_field("event site", e.site, empty=True))
        rows["value"].append(_float_field("event value", e.value, nan=True))
        rows["threshold"].append(_float_field("event threshold", e.threshold, nan=True))
        rows["severity"].append(e.severity)
        rows["onset_step"].append(onset)
        rows["detail"].append(detail)
    return pl.DataFrame(rows, schema=EVENTS_SCHEMA)


def clips_frame(clips: list[ClipRecord]) -> pl.DataFrame:
    """ClipRecord list -> frame (CLIPS_SCHEMA). limit inf means "off"; NaN is refused."""
    rows = {k: [] for k in CLIPS_SCHEMA}
    for c in [clips] if isinstance(clips, ClipRecord) else clips:
        if not isinstance(c, ClipRecord):
            raise InvalidInput(f"expected ClipRecord, got {type(c).__name__}")
        rows["version"].append(_int_field("clip version", c.version, 1))
        rows["step"].append(_int_field("clip step", c.step, 0))
        rows["layer"].append(_int_field("clip layer", c.layer, 0, _I32_MAX))
        rows["site"].append(_text_field("clip site", c.site))
        rows["limit"].append(_float_field("clip limit", c.limit, nan=False))
        rows["reason"].append(_text_field("clip reason", c.reason, empty=True))
        rows["acked_step"].append(_int_field("clip acked_step", c.acked_step, -1))
    return pl.DataFrame(rows, schema=CLIPS_SCHEMA)


def _check_rank(r) -> int:
    if not isinstance(r, (int, np.integer)) or not 0 <= r <= _I32_MAX:
        raise InvalidInput(f"missing_ranks must hold integers >= 0, got {r!r}")
    return r


# ---- glob patterns -----------------------------------------------------------------------
def _lit(c: str) -> str:
    return c if c.isalnum() and c.isascii() else f"\\x{{{ord(c):x}}}"


def glob_to_regex(pattern: str) -> str:
    """fnmatch.fnmatchcase semantics as a Rust-regex (polars) pattern: `*` (also across "/"),
    `?`, `[abc]`, `[a-z]`, `[!x]`. Python's own fnmatch.translate emits look-arounds that
    polars' regex engine rejects, hence this."""
    if not isinstance(pattern, str):
        raise InvalidInput(f"pattern must be a string, got {type(pattern).__name__}")
    out, i, n = ["^"], 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i + (i < n and pattern[i] == "!")
            j += j < n and pattern[j] == "]"  # a leading "]" is literal
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: literal "["
                out.append(_lit("["))
                continue
            body, i = pattern[i:j], j + 1
            negate = body.startswith("!")
            body = body[1:] if negate else body
            items, k = [], 0
            while k < len(body):
                if k + 2 < len(body) and body[k + 1] == "-":
                    if body[k] <= body[k + 2]:  # fnmatch drops reversed ranges
                        items.append(f"{_lit(body[k])}-{_lit(body[k + 2])}")
                    k += 3
                else:
                    items.append(_lit(body[k]))
                    k += 1
            if items:
                out.append(("[^" if negate else "[") + "".join(items) + "]")
            else:  # empty class: matches nothing,
                out.append("(?s:.)" if negate else r"[^\x{0}-\x{10FFFF}]")  # or any char
        else:
            out.append(_lit(c))
    out.append("$")
    return "(?s)" + "".join(out)
