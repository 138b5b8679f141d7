"""The frames every backend shares: read-frame schemas, the value tables, last-write-wins.

Writes leave validation (validate.py) as polars frames with the exact dtypes below; reads go
out with the same schemas whatever the backend, so a dashboard never sees an Int64 from one
store and an Int32 from another. TABLES names each value table's schema and natural key, which
is what the idempotency rule (`last_wins`) and every backend's sort order are built on.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

# ---- read-frame schemas ------------------------------------------------------------------
RUNS_SCHEMA = pl.Schema(
    {
        "run": pl.Utf8,
        "world_size": pl.Int32,
        "config_json": pl.Utf8,
        "started_at": pl.Float64,
        "updated_at": pl.Float64,
        "last_step": pl.Int64,  # null until a step was written
        "status": pl.Utf8,
    }
)
METRICS_SCHEMA = pl.Schema(
    {
        "metric_id": pl.Int32,
        "name": pl.Utf8,
        "layer": pl.Int32,
        "expert": pl.Int32,
        "head": pl.Int32,
        "stat": pl.Utf8,
        "unit": pl.Utf8,
        "reduce": pl.Utf8,
    }
)
RAW_SCHEMA = pl.Schema(
    {"step": pl.Int64, "metric_id": pl.Int32, "rank": pl.Int32, "value": pl.Float32}
)
REDUCED_SCHEMA = pl.Schema(
    {"step": pl.Int64, "metric_id": pl.Int32, "value": pl.Float32, "n_ranks": pl.Int32}
)
STEPS_SCHEMA = pl.Schema(
    {  # dtype instances throughout: a dict mixing classes with List(...) types as object
        "step": pl.Int64(),
        "n_ranks": pl.Int32(),
        "missing_ranks": pl.List(pl.Int32),
        "complete": pl.Boolean(),
        "wall_time": pl.Float64(),
    }
)
EVENTS_SCHEMA = pl.Schema(
    {
        "step": pl.Int64,
        "kind": pl.Utf8,
        "site": pl.Utf8,
        "value": pl.Float64,
        "threshold": pl.Float64,
        "severity": pl.Utf8,
        "onset_step": pl.Int64,
        "detail": pl.Utf8,
    }
)
CLIPS_SCHEMA = pl.Schema(
    {
        "version": pl.Int64,
        "step": pl.Int64,
        "layer": pl.Int32,
        "site": pl.Utf8,
        "limit": pl.Float32,
        "reason": pl.Utf8,
        "acked_step": pl.Int64,
    }
)
# Stored raw vectors (vectors.py): `values` is float32 little-endian bytes, one per id of the
# layout; `ver` (set by the backend at commit, increasing in write order) decides which vector
# wins a cell.
RAW_VECTORS_SCHEMA = pl.Schema(
    {
        "step": pl.Int64,
        "rank": pl.Int32,
        "layout": pl.UInt64,
        "values": pl.Binary,
        "ver": pl.UInt64,
    }
)
# Stored reduced vectors (reduced.py): one row per (step, layout) holding the reduced values of
# the layout's ids (float32 little-endian bytes, as raw vectors), all reduced over `n_ranks`
# ranks; `source` >= 0 marks a row whose values are that rank's raw values at the step (a
# world-1 run's values stored once, `values` empty), -1 a row that holds its own.
REDUCED_VECTORS_SCHEMA = pl.Schema(
    {
        "step": pl.Int64,
        "layout": pl.UInt64,
        "n_ranks": pl.Int32,
        "source": pl.Int32,
        "values": pl.Binary,
        "ver": pl.UInt64,
    }
)
# The online detectors' saved state (Store.write_detector_state): one row per (run, kind), the
# last write wins; `state` is the encoded blob, `step` the last step it had seen. Parquet keeps
# the bytes as they are (detector_blobs/, uncompressed: rolling windows of float32 do not
# compress, and a base64 text column of the 66 MB state of 1 M metrics took 1.3 s to build
# and write); ClickHouse keeps base64 text in a String column (18.16 has no other for binary
# that its Arrow reads give back as bytes), see state_as_text / state_from_text.
DETECTOR_STATE_SCHEMA = pl.Schema({"kind": pl.Utf8, "step": pl.Int64, "state": pl.Binary})
SERIES_SCHEMA = pl.Schema({"step": pl.Int64, "value": pl.Float32})
AT_STEP_SCHEMA = pl.Schema(
    {
        "metric_id": pl.Int32,
        "name": pl.Utf8,
        "layer": pl.Int32,
        "expert": pl.Int32,
        "head": pl.Int32,
        "stat": pl.Utf8,
        "value": pl.Float32,
    }
)

# Per value table: schema, natural key within a run, and the on-disk sort order (series reads
# filter on metric_id first, so rows of one metric sit together; raw vectors are read per rank).
TABLES: dict[str, tuple[pl.Schema, tuple[str, ...]]] = {
    "raw_vectors": (RAW_VECTORS_SCHEMA, ("rank", "step", "layout")),
    "reduced": (REDUCED_SCHEMA, ("metric_id", "step")),  # until schema v3: read, not written
    "reduced_vectors": (REDUCED_VECTORS_SCHEMA, ("step", "layout")),
    "steps": (STEPS_SCHEMA, ("step",)),
    "events": (EVENTS_SCHEMA, ("step", "kind", "site")),
    "clips": (CLIPS_SCHEMA, ("version", "layer", "site")),
    "detector_state": (DETECTOR_STATE_SCHEMA, ("kind",)),
}


def empty(schema: pl.Schema) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


def from_arrow(table: pa.Table | pa.RecordBatch) -> pl.DataFrame:
    """pl.from_arrow of a table or record batch, which is always a DataFrame (polars' own
    annotation also allows a Series, for arrays)."""
    df = pl.from_arrow(table)
    if not isinstance(df, pl.DataFrame):
        raise TypeError(f"expected an Arrow table, got {type(table).__name__}")
    return df


def state_as_text(df: pl.DataFrame) -> pl.DataFrame:
    """Detector-state rows with the blob as base64 text (a backend that stores it so)."""
    return df.with_columns(pl.col("state").bin.encode("base64"))


def state_from_text(df: pl.DataFrame) -> pl.DataFrame:
    """state_as_text undone: the blob back as bytes (raises ComputeError on bad base64)."""
    return df.with_columns(pl.col("state").cast(pl.Utf8).str.decode("base64"))


def last_wins(
    df: pl.DataFrame, keys: tuple[str, ...] | list[str], *, maintain_order: bool = False
) -> pl.DataFrame:
    """Keep the last row (in frame order) of every natural key: the idempotency rule.
    maintain_order keeps the survivors in frame order (raw vectors: order is write order)."""
    if df.height <= 1 or _strictly_ascending(df, keys):
        return df  # no key repeats (the usual write: fresh ids, one step after another)
    return df.unique(subset=list(keys), keep="last", maintain_order=maintain_order)


def _strictly_ascending(df: pl.DataFrame, keys: tuple[str, ...] | list[str]) -> bool:
    """Whether the rows' integer keys ascend strictly (lexicographically): then no key
    repeats, and `unique` (a hash of every row, ~50 ms at 1 M) has nothing to do. False for
    any non-integer key or a null."""
    cols = [df[k] for k in keys]
    if not all(c.dtype.is_integer() and c.null_count() == 0 for c in cols):
        return False
    above = np.zeros(df.height - 1, bool)  # row i+1 > row i on the keys seen so far
    tied = np.ones(df.height - 1, bool)
    for c in cols:
        a = c.to_numpy()
        above |= tied & (a[1:] > a[:-1])
        tied &= a[1:] == a[:-1]
    return bool(above.all())
