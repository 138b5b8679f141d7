"""MemoryStore: the unit-test backend. Same semantics as the others, rows held in polars frames.

Each `open_store("memory:")` is a fresh, private store: nothing is shared between instances or
survives close(). Everything else (validation, invisibility until flush, last-write-wins,
NotFound, schemas) comes from BufferedStore, exactly as for the Parquet backend.
"""
from __future__ import annotations

from typing import Any

import polars as pl

from store import columns as C
from store.buffered import BufferedStore


class MemoryStore(BufferedStore):
    def __init__(self) -> None:
        super().__init__()
        self._runs: dict[str, dict[str, Any]] = {}
        self._dicts: dict[str, pl.DataFrame] = {}
        # Committed chunks per (run, table), merged lazily on read so a flush stays O(batch).
        self._chunks: dict[tuple[str, str], list[pl.DataFrame]] = {}

    def _committed_run(self, run: str) -> dict[str, Any] | None:
        row = self._runs.get(run)
        return None if row is None else dict(row)

    def _committed_metrics(self, run: str) -> pl.DataFrame:
        return self._dicts.get(run, C.empty(C.METRICS_SCHEMA))

    def _commit(self, runs, metrics, values) -> None:
        self._runs.update({run: dict(row) for run, row in runs.items()})
        self._dicts.update(metrics)
        for key, frame in values.items():
            self._chunks.setdefault(key, []).append(frame)

    def _read_runs(self) -> pl.DataFrame:
        return pl.DataFrame(list(self._runs.values()) or None, schema=C.RUNS_SCHEMA)

    def _read_values(self, run: str, table: str, *, metric_id: int | None = None,
                     rank: int | None = None, start: int | None = None,
                     stop: int | None = None) -> pl.DataFrame:
        schema, keys = C.TABLES[table]
        with self._lock:
            chunks = self._chunks.get((run, table), [])
            if len(chunks) > 1:                      # later chunks are later writes: last wins
                chunks[:] = [C.last_wins(pl.concat(chunks), keys)]
            df = chunks[0] if chunks else C.empty(schema)
        preds = []
        if metric_id is not None:
            preds.append(pl.col("metric_id") == metric_id)
        if rank is not None:
            preds.append(pl.col("rank") == rank)
        if start is not None:
            preds.append(pl.col("step") >= start)
        if stop is not None:
            preds.append(pl.col("step") < stop)
        return df.filter(*preds) if preds else df
