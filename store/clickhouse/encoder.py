"""Rows on their way in: polars frames and Python lists -> the driver's INSERT columns.

Every INSERT is columnar (one list or numpy array per column, in the table's column order),
with `run` and `ver` filled in here. Raw and reduced vectors go as numpy columns
(`use_numpy`: no per-row Python in the driver either); the small tables (runs, dictionary,
steps, events, clips, layouts) go as Python lists. Value rows get per-row versions in write
order, so the last write of a key has the highest `ver` (store.py, reads.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from store.clickhouse.tables import Table, qualified, quote
from store.frames import state_as_text

NUMPY_TABLES = {
    "raw_vectors",
    "reduced_vectors",
}  # bulk tables: numpy columns straight to the driver


def insert_sql(database: str, table: Table) -> str:
    names = table.column_names
    return f"INSERT INTO {qualified(database, table)} ({', '.join(map(quote, names))}) VALUES"


def insert_columns(
    table: Table, cols: dict[str, Any], ver: int, *, run: str | None, numpy: bool
) -> list[Any] | None:
    """The INSERT's columns in table order (None: no rows); `run` (when given) and `ver` are
    constant over the rows, unless cols carries its own per-row "ver"."""
    n = len(next(iter(cols.values())))
    if n == 0:
        return None
    full = (lambda v, dtype: np.full(n, v, dtype=dtype)) if numpy else (lambda v, _: [v] * n)
    if "ver" not in cols:  # else per-row versions given
        cols = {**cols, "ver": full(ver, np.uint64)}
    if run is not None:
        cols["run"] = full(run, object)
    return [cols[c] for c in table.column_names]


def value_columns(name: str, table: Table, frame: pl.DataFrame, first: int) -> dict[str, Any]:
    """One flush's rows of value table `name`, in write order (repeated keys included): row i
    gets version first + i, so argMax on read (and the merges) keep the last write of a key."""
    frame = frame.with_columns(ver=pl.arange(0, frame.height, dtype=pl.UInt64, eager=True) + first)
    # The server sorts every new part by the key anyway and does that ~25% faster on input
    # that is already sorted.
    frame = frame.sort([k for k in table.key if k != "run"])
    if name in NUMPY_TABLES:
        return {c: frame[c].to_numpy() for c in frame.columns}  # zero-copy, no nulls
    if name == "detector_state":  # a String column of base64 text (frames.py)
        frame = state_as_text(frame)
    if "complete" in frame.columns:  # Bool travels as UInt8
        frame = frame.with_columns(pl.col("complete").cast(pl.UInt8))
    return {c: frame[c].to_list() for c in frame.columns}
