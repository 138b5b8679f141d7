"""MemoryStore: the unit-test backend. Same semantics as the others, rows held in polars frames.

Each `open_store("memory:")` is a fresh, private store: nothing is shared between instances or
survives close(). Everything else (validation, invisibility until flush, last-write-wins,
NotFound, schemas, raw values as vectors) comes from BufferedStore, exactly as for the Parquet
backend. It ships with the store rather than under tests/ (as OpenTelemetry's in-memory exporter
does): "memory:" is a store URL that open_store and the collector and store CLIs accept (the
integration tests run `python -m collector serve --store memory:` as a subprocess), and store/
may not import tests/.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from store.buffered import BufferedStore
from store.frames import METRICS_SCHEMA, RUNS_SCHEMA, TABLES, empty, last_wins
from store.vectors import layouts_holding


class MemoryStore(BufferedStore):
    def __init__(self) -> None:
        super().__init__()
        self._runs: dict[str, dict[str, Any]] = {}
        self._dicts: dict[str, pl.DataFrame] = {}
        self._layouts: dict[str, dict[int, np.ndarray]] = {}
        self._commits = 0  # vectors' ver = commit << 32 | row
        # Committed chunks per (run, table), merged lazily on read so a flush stays O(batch).
        self._chunks: dict[tuple[str, str], list[pl.DataFrame]] = {}

    def _committed_run(self, run: str) -> dict[str, Any] | None:
        row = self._runs.get(run)
        return None if row is None else dict(row)

    def _committed_metrics(self, run: str) -> pl.DataFrame:
        return self._dicts.get(run, empty(METRICS_SCHEMA))

    def _commit(self, runs, metrics, values, layouts) -> None:
        self._commits += 1
        self._runs.update({run: dict(row) for run, row in runs.items()})
        for run, rows in metrics.items():
            old = self._dicts.get(run)
            merged = rows if old is None else last_wins(pl.concat([old, rows]), ["metric_id"])
            self._dicts[run] = merged.sort("metric_id")
        for run, known in layouts.items():
            self._layouts.setdefault(run, {}).update(known)
        for key, frame in values.items():
            if key[1] in ("raw_vectors", "reduced_vectors"):
                frame = frame.with_columns(
                    ver=pl.int_range(frame.height, dtype=pl.UInt64) + (self._commits << 32)
                )
            self._chunks.setdefault(key, []).append(frame)

    def _read_runs(self) -> pl.DataFrame:
        return pl.DataFrame(list(self._runs.values()) or None, schema=RUNS_SCHEMA)

    def _read_values(
        self,
        run: str,
        table: str,
        *,
        metric_id: int | None = None,
        start: int | None = None,
        stop: int | None = None,
        rank: int | None = None,
        layouts: list[int] | None = None,
    ) -> pl.DataFrame:
        """As BufferedStore's, plus the raw-vector filters rank and layouts (hashes)."""
        schema, keys = TABLES[table]
        with self._lock:
            chunks = self._chunks.get((run, table), [])
            if len(chunks) > 1:  # later chunks are later writes: last wins
                chunks[:] = [last_wins(pl.concat(chunks), keys)]
            df = chunks[0] if chunks else empty(schema)
        preds = []
        if metric_id is not None:
            preds.append(pl.col("metric_id") == metric_id)
        if rank is not None:
            preds.append(pl.col("rank") == rank)
        if layouts is not None:
            preds.append(pl.col("layout").is_in(pl.Series(layouts, dtype=pl.UInt64).implode()))
        if start is not None:
            preds.append(pl.col("step") >= start)
        if stop is not None:
            preds.append(pl.col("step") < stop)
        return df.filter(*preds) if preds else df

    def _read_vectors(self, run, *, rank, start, stop, metric_id=None):
        known = self._layouts.get(run, {})
        holding = layouts_holding(known, metric_id)
        df = self._read_values(
            run, "raw_vectors", rank=rank, layouts=holding, start=start, stop=stop
        )
        return df, known

    def _read_reduced_vectors(self, run, *, start, stop, metric_id=None):
        known = self._layouts.get(run, {})
        holding = layouts_holding(known, metric_id)
        df = self._read_values(run, "reduced_vectors", layouts=holding, start=start, stop=stop)
        return df, known
