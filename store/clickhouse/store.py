"""ClickHouseStore: the scale backend, over clickhouse-driver's native protocol.

    store = ClickHouseStore("clickhouse://default:pw@127.0.0.1:9000/stepwatch")

Validation, buffering until flush() and every read rule come from BufferedStore, exactly as for
the Parquet and memory backends; this class only moves rows to and from the server (the SQL of
reads is in reads.py, the driver in connection.py).

Idempotency (resends never double-count). Debian's 18.16 has no insert_deduplication_token, and
a non-replicated MergeTree never deduplicates inserts, so every table is a ReplacingMergeTree
ordered by its natural key with a `ver` column (tables.py). Each commit stamps its value rows
with per-row versions from insert time in ns, strictly increasing within this process and,
within a commit, in write order (the small tables get one `ver` per commit); reads take the
highest `ver` of each key (reads.py). That is also why a commit may carry a key twice: the
later row has the higher version, so BufferedStore's in-memory dedup pass is skipped here
(`_combine`).

Durability. flush() returns after every INSERT has been acknowledged by the server, i.e. the
new parts are committed (visible, crash-consistent; fsynced only if the server's
fsync_after_insert is set). Values go in before the dictionary and the run row, so a commit that
fails half-way leaves the run as it was and the next flush resends everything.

Speed. Raw values go as per-rank vectors (`raw_vectors`: one row per rank, step and layout,
the values as one String of float32 bytes; layouts once per run in `raw_layouts`), so a step of
4,096 ranks x 1,465 metrics is 4,096 rows, not six million. They and the reduced values go to
the driver as numpy columns (`use_numpy`, columnar INSERT, no per-row Python); the small tables
(runs, dictionary, steps, layouts) go as Python lists (encoder.py).

Safety. Values always travel as query parameters or as INSERT data, never inside SQL text;
identifiers are validated (tables.check_identifier) before interpolation.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from store.base import StoreError
from store.buffered import BufferedStore
from store.clickhouse import encoder, reads
from store.clickhouse.config import Capabilities, ClickHouseConfig
from store.clickhouse.schema import migrate
from store.clickhouse.tables import (
    CLIP_UPDATES,
    DETECTOR_STATE,
    EVENTS,
    METRICS,
    RAW_LAYOUTS,
    RAW_VECTORS,
    REDUCED,
    REDUCED_VECTORS,
    RUNS,
    STEPS,
    Table,
)
from store.frames import METRICS_SCHEMA, RUNS_SCHEMA, TABLES, state_from_text

if TYPE_CHECKING:
    from store.clickhouse.connection import Connection
    from store.clickhouse.shards import Shards

log = logging.getLogger(__name__)

VALUE_TABLES = {
    "raw_vectors": RAW_VECTORS,
    "reduced": REDUCED,  # schema v1-v2 rows: read (BufferedStore._read_reduced), not written
    "reduced_vectors": REDUCED_VECTORS,
    "steps": STEPS,
    "events": EVENTS,
    "clips": CLIP_UPDATES,
    "detector_state": DETECTOR_STATE,
}
NO_STEP = -1  # runs.last_step before any step was written


class ClickHouseStore(BufferedStore):
    def __init__(self, url: str | None = None, *, env: dict[str, str] | None = None) -> None:
        # The driver only now: a client or Parquet-only install has no clickhouse-driver.
        from store.clickhouse.connection import Connection

        super().__init__()
        self.config = ClickHouseConfig.from_url(url, env)
        self._last_ver = 0
        self._layouts: dict[str, dict[int, np.ndarray]] = {}  # run -> committed {hash: ids}
        self._conn: Connection = Connection(self.config, self._lock)  # reads; DDL, writes
        self.shards: Shards | None = None  # on a cluster: every node's connection (shards.py)
        try:
            self.server_version: str = self._conn.execute("SELECT version()")[0][0]
            self.caps = Capabilities.for_version(self.server_version)
            if self.config.options.cluster:
                from store.clickhouse.shards import Shards

                self.shards = Shards(self._conn, self.config, self._lock, self._next_ver)
            else:
                migrate(self._conn, self.config, self.caps, self.server_version, self._next_ver)
        except BaseException:
            self._conn.disconnect()
            raise
        log.info(
            "clickhouse store %s%s, server %s, %s",
            self.config.display_url,
            f" (cluster {self.config.options.cluster})" if self.shards else "",
            self.server_version,
            self.caps,
        )

    def _next_ver(self, n: int = 1) -> int:
        """The first of n versions: insert time in ns, strictly increasing here, so a later
        commit (and within one, a later row) always wins a key."""
        with self._lock:
            first = max(self._last_ver + 1, time.time_ns())
            self._last_ver = first + n - 1
            return first

    # ---- writes (BufferedStore hooks) ----------------------------------------------------------
    def _insert_rows(
        self,
        table: Table,
        cols: dict[str, Any],
        ver: int,
        *,
        run: str | None = None,
        numpy: bool = False,
    ) -> None:
        """One columnar INSERT (encoder.insert_columns); nothing for no rows."""
        data = encoder.insert_columns(table, cols, ver, run=run, numpy=numpy)
        if data is None:
            return
        settings = {"use_numpy": True} if numpy else None
        if self.shards is not None:  # each row straight to its shard's local table
            self.shards.insert(self.config.database, table, data, settings)
            return
        self._conn.execute(
            encoder.insert_sql(self.config.database, table), data, columnar=True, settings=settings
        )

    def _commit(
        self,
        runs: dict[str, dict[str, Any]],
        metrics: dict[str, pl.DataFrame],
        values: dict[tuple[str, str], pl.DataFrame],
        layouts: dict[str, dict[int, np.ndarray]],
    ) -> None:
        ver = self._next_ver()
        for run, new in layouts.items():  # before the vectors that use them
            known = self._layouts.setdefault(run, {})
            fresh = {h: ids for h, ids in new.items() if h not in known}
            self._insert_rows(
                RAW_LAYOUTS,
                {"layout": list(fresh), "ids": [ids.tolist() for ids in fresh.values()]},
                ver,
                run=run,
            )
            known.update(fresh)
        for (run, name), frame in values.items():
            table = VALUE_TABLES[name]
            cols = encoder.value_columns(name, table, frame, self._next_ver(frame.height))
            numpy = name in encoder.NUMPY_TABLES
            self._insert_rows(table, cols, ver, run=run, numpy=numpy)
        for run, frame in metrics.items():
            self._insert_rows(METRICS, frame.to_dict(as_series=False), ver, run=run)
        if runs:
            rows = [
                {**r, "last_step": NO_STEP if r["last_step"] is None else r["last_step"]}
                for r in runs.values()
            ]
            self._insert_rows(RUNS, {c: [r[c] for r in rows] for c in RUNS_SCHEMA}, ver)

    def _combine(self, table: str, chunks: list[pl.DataFrame]) -> pl.DataFrame:
        """No last-write-wins pass (~0.4 s per million rows): per-row versions do its job."""
        return pl.concat(chunks)

    def _release(self) -> None:
        if self.shards is not None:
            self.shards.disconnect()
        self._conn.disconnect()

    # ---- reads (BufferedStore hooks) -------------------------------------------------------------
    def _latest(self, table: Table, conds: reads.Conditions, schema: pl.Schema) -> pl.DataFrame:
        return reads.latest(self._conn, self.config.database, table, conds, schema)

    def _committed_run(self, run: str) -> dict[str, Any] | None:
        df = self._latest(RUNS, [("run", run)], RUNS_SCHEMA)
        if df.height == 0:
            return None
        row = df.row(0, named=True)
        row["last_step"] = None if row["last_step"] == NO_STEP else row["last_step"]
        return row

    def _committed_metrics(self, run: str) -> pl.DataFrame:
        return self._latest(METRICS, [("run", run)], METRICS_SCHEMA)

    def _read_runs(self) -> pl.DataFrame:
        df = self._latest(RUNS, [], RUNS_SCHEMA)
        return df.with_columns(
            pl.when(pl.col("last_step") != NO_STEP)
            .then(pl.col("last_step"))
            .otherwise(None)
            .alias("last_step")
        )

    def _read_values(
        self,
        run: str,
        table: str,
        *,
        metric_id: int | None = None,
        start: int | None = None,
        stop: int | None = None,
    ) -> pl.DataFrame:
        conds: reads.Conditions = [("run", run)]
        if metric_id is not None:
            conds.append(("metric_id", metric_id))
        conds += reads.steps_between(start, stop)
        df = self._latest(VALUE_TABLES[table], conds, TABLES[table][0])
        if table == "detector_state":  # stored as base64 text (frames.py)
            try:
                return state_from_text(df)
            except pl.exceptions.ComputeError as e:
                raise StoreError(f"run {run!r}: a stored detector state is not base64 ({e})") from e
        return df

    def _read_raw(
        self,
        run: str,
        *,
        rank: int | None,
        start: int | None,
        stop: int | None,
        metric_id: int | None = None,
    ) -> pl.DataFrame:
        """One metric's cells are cut out of the vectors on the server (reads.raw_series)."""
        if metric_id is None:
            return super()._read_raw(run, rank=rank, start=start, stop=stop)
        return reads.raw_series(
            self._conn, self.config.database, run, metric_id, rank=rank, start=start, stop=stop
        )

    @property
    def shares_raw(self) -> bool:  # type: ignore[override]
        """No references to raw vectors that a TTL may remove (raw_ttl_days)."""
        return not self.config.options.raw_ttl_days

    def _reduced_cells(
        self, run: str, *, start: int | None, stop: int | None, metric_id: int | None = None
    ) -> pl.DataFrame:
        """One metric's cells are cut out of the vectors on the server (reads.reduced_series)."""
        if metric_id is None:
            return super()._reduced_cells(run, start=start, stop=stop)
        return reads.reduced_series(
            self._conn, self.config.database, run, metric_id, start=start, stop=stop
        )

    def _read_reduced_vectors(
        self,
        run: str,
        *,
        start: int | None,
        stop: int | None,
        metric_id: int | None = None,
    ) -> tuple[pl.DataFrame, dict[int, np.ndarray]]:
        known = self._layouts.setdefault(run, {})
        vec = reads.reduced_vectors(
            self._conn, self.config.database, run, known, start=start, stop=stop
        )
        return vec, known

    def _read_vectors(
        self,
        run: str,
        *,
        rank: int | None,
        start: int | None,
        stop: int | None,
        metric_id: int | None = None,
    ) -> tuple[pl.DataFrame, dict[int, np.ndarray]]:
        """The vectors as stored (repeated keys left for vector_cells), layouts by hash."""
        known = self._layouts.setdefault(run, {})
        vec = reads.raw_vectors(
            self._conn, self.config.database, run, known, rank=rank, start=start, stop=stop
        )
        return vec, known
