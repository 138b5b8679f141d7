"""ClickHouseStore: the scale backend, over clickhouse-driver's native protocol.

    store = ClickHouseStore("clickhouse://default:pw@127.0.0.1:9000/stepwatch")

Validation, buffering until flush() and every read rule come from BufferedStore, exactly as for
the Parquet and memory backends; this file only moves rows to and from the server.

Idempotency (resends never double-count). Debian's 18.16 has no insert_deduplication_token, and
a non-replicated MergeTree never deduplicates inserts, so every table is a ReplacingMergeTree
ordered by its natural key with a `ver` column (store/clickhouse_schema.py). Each commit stamps
its value rows with per-row versions from insert time in ns, strictly increasing within this
process and, within a commit, in write order (the small tables get one `ver` per commit). Merges
eventually keep the highest `ver` of a key; until then both copies exist on disk, so reads do
not use FINAL (single-threaded and slow on old servers) but aggregate:
`SELECT key..., argMax(col, ver) ... GROUP BY key` - exact before, during and after merges, on
every server version. That is also why a commit may carry a key twice: the later row has the
higher version, so BufferedStore's in-memory dedup pass is skipped here (`_combine`).

Durability. flush() returns after every INSERT has been acknowledged by the server, i.e. the
new parts are committed (visible, crash-consistent; fsynced only if the server's
fsync_after_insert is set). Values go in before the dictionary and the run row, so a commit that
fails half-way leaves the run as it was and the next flush resends everything.

Speed. Raw values go as per-rank vectors (`raw_vectors`: one row per rank, step and layout,
the values as one String of float32 bytes; layouts once per run in `raw_layouts`), so a step of
4,096 ranks x 1,465 metrics is 4,096 rows, not six million. They and the reduced values go to
the driver as numpy columns (`use_numpy`, columnar INSERT, no per-row Python); the small tables
(runs, dictionary, steps, layouts) go as Python lists.

Reads of raw values, the trade-off. series(rank=) is computed on the server: only that rank's
rows (the table is ordered by run, rank, step) joined with the layouts that hold the metric,
4 bytes cut out of each vector (substring + reinterpretAsFloat32), argMax over ver per step -
but the server still reads and decompresses each of those rows' whole vectors, thousands of
values for one. at_step(rank=) fetches the few vectors of that rank and step and decodes them
here (vectors.vector_cells), with layouts cached by hash (they never change).

Safety. Values always travel as query parameters or as INSERT data, never inside SQL text;
identifiers are validated (clickhouse_schema.check_identifier) before interpolation.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import polars as pl
from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors

from store.base import StoreError
from store.buffered import BufferedStore
from store.clickhouse_config import ClickHouseConfig
from store.clickhouse_schema import (
    CLIP_UPDATES,
    EVENTS,
    LATEST_VERSION,
    METRICS,
    RAW_LAYOUTS,
    RAW_VECTORS,
    REDUCED,
    RUNS,
    SCHEMA_VERSION,
    STEPS,
    Capabilities,
    Table,
    create_table_sql,
    pending_migrations,
    quote,
)
from store.frames import METRICS_SCHEMA, RAW_SCHEMA, RAW_VECTORS_SCHEMA, RUNS_SCHEMA, TABLES, empty

log = logging.getLogger(__name__)

UNKNOWN_DATABASE = 81  # ClickHouse error code
VALUE_TABLES = {
    "raw_vectors": RAW_VECTORS,
    "reduced": REDUCED,
    "steps": STEPS,
    "events": EVENTS,
    "clips": CLIP_UPDATES,
}
NUMPY_TABLES = {"raw_vectors", "reduced"}  # bulk tables: numpy columns straight to the driver
NO_STEP = -1  # runs.last_step before any step was written


class ClickHouseStore(BufferedStore):
    def __init__(self, url: str | None = None, *, env: dict[str, str] | None = None) -> None:
        super().__init__()
        self.config = ClickHouseConfig.from_url(url, env)
        self._last_ver = 0
        self._layouts: dict[str, dict[int, np.ndarray]] = {}  # run -> committed {hash: ids}
        self._client = self._connect()
        try:
            self.server_version: str = self._execute("SELECT version()")[0][0]
            self.caps = Capabilities.for_version(self.server_version)
            self._migrate()
        except BaseException:
            self._client.disconnect()
            raise
        log.info(
            "clickhouse store %s, server %s, %s",
            self.config.display_url,
            self.server_version,
            self.caps,
        )

    # ---- connection ------------------------------------------------------------------------
    def _new_client(self, database: str) -> Client:
        c = self.config
        return Client(
            c.host,
            port=c.port,
            user=c.user,
            password=c.password,
            database=database,
            secure=c.secure,
            connect_timeout=c.connect_timeout_s,
            send_receive_timeout=300,
            client_name="stepwatch",
        )

    def _connect(self) -> Client:
        """A client on the configured database, creating the database when it is missing."""
        client = self._new_client(self.config.database)
        try:
            with self._server("connect"):
                try:
                    client.execute("SELECT 1")
                except ch_errors.ServerException as e:
                    if e.code != UNKNOWN_DATABASE:
                        raise
                    client.disconnect()
                    boot = self._new_client("system")  # exists on every server
                    boot.execute(f"CREATE DATABASE IF NOT EXISTS {quote(self.config.database)}")
                    boot.disconnect()
                    client.execute("SELECT 1")
        except BaseException:
            client.disconnect()
            raise
        return client

    @contextlib.contextmanager
    def _server(self, what: str) -> Iterator[None]:
        """Driver and socket errors become StoreError naming the server (never the password)."""
        try:
            yield
        except (ch_errors.Error, OSError, EOFError) as e:
            raise StoreError(
                f"ClickHouse {self.config.display_url}: {what} failed: {type(e).__name__}: {e}"
            ) from e

    def _execute(self, sql: str, params: Any = None, **kw: Any) -> Any:
        with self._lock, self._server(sql.split("(", 1)[0][:80]):  # the driver is not
            return self._client.execute(sql, params, **kw)  # thread-safe

    def _table(self, table: Table) -> str:
        return f"{quote(self.config.database)}.{quote(table.name)}"

    def _next_ver(self, n: int = 1) -> int:
        """The first of n versions: insert time in ns, strictly increasing here, so a later
        commit (and within one, a later row) always wins a key."""
        with self._lock:
            first = max(self._last_ver + 1, time.time_ns())
            self._last_ver = first + n - 1
            return first

    # ---- schema ----------------------------------------------------------------------------
    def _migrate(self) -> None:
        self._execute(create_table_sql(self.config.database, SCHEMA_VERSION, self.caps))
        current = int(
            self._execute(f"SELECT max(version) FROM {self._table(SCHEMA_VERSION)}")[0][0] or 0
        )
        if current > LATEST_VERSION:
            raise StoreError(
                f"database {self.config.database} has schema v{current}, newer "
                f"than this code's v{LATEST_VERSION}; upgrade stepwatch"
            )
        if self.config.options.raw_ttl_days and not self.caps.ttl:
            log.warning(
                "ClickHouse %s has no TTL (needs 19.6+): raw_ttl_days=%d is ignored, "
                "raw values are kept",
                self.server_version,
                self.config.options.raw_ttl_days,
            )
        for m in pending_migrations(current):
            for sql in m.statements(self.config.database, self.caps, self.config.options):
                self._execute(sql)
            self._insert_rows(
                SCHEMA_VERSION,
                {
                    "version": [m.version],
                    "description": [m.description],
                    "server_version": [self.server_version],
                    "applied_at": [time.time()],
                },
                self._next_ver(),
            )
            log.info("clickhouse schema v%d applied: %s", m.version, m.description)

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
        """One columnar INSERT; `run` (when given) and `ver` are constant over the rows, unless
        cols carries its own per-row "ver"."""
        n = len(next(iter(cols.values())))
        if n == 0:
            return
        full = (lambda v, dtype: np.full(n, v, dtype=dtype)) if numpy else (lambda v, _: [v] * n)
        if "ver" not in cols:  # else per-row versions given
            cols = {**cols, "ver": full(ver, np.uint64)}
        if run is not None:
            cols["run"] = full(run, object)
        names = table.column_names
        sql = f"INSERT INTO {self._table(table)} ({', '.join(map(quote, names))}) VALUES"
        self._execute(
            sql,
            [cols[c] for c in names],
            columnar=True,
            settings={"use_numpy": True} if numpy else None,
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
            # Rows arrive in write order, repeated keys included (_combine): row i gets version
            # first + i, so argMax on read (and the merges) keep the last write of each key.
            first = self._next_ver(frame.height)
            frame = frame.with_columns(
                ver=pl.arange(0, frame.height, dtype=pl.UInt64, eager=True) + first
            )
            # The server sorts every new part by the key anyway and does that ~25% faster on
            # input that is already sorted.
            frame = frame.sort([k for k in table.key if k != "run"])
            if name in NUMPY_TABLES:
                cols = {c: frame[c].to_numpy() for c in frame.columns}  # zero-copy, no nulls
            else:
                if "complete" in frame.columns:  # Bool travels as UInt8
                    frame = frame.with_columns(pl.col("complete").cast(pl.UInt8))
                cols = {c: frame[c].to_list() for c in frame.columns}
            self._insert_rows(table, cols, ver, run=run, numpy=name in NUMPY_TABLES)
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
        with self._lock:
            self._client.disconnect()

    # ---- reads (BufferedStore hooks) -------------------------------------------------------------
    def _latest(self, table: Table, where: list[tuple[str, Any]], schema: dict) -> pl.DataFrame:
        """The last-written row of every natural key matching `where` ((column, value) or
        (column, (op, value)) pairs), as a polars frame with `schema`'s columns and dtypes."""
        rest = [c for c in table.column_names if c not in table.key and c != "ver"]
        select = [quote(k) for k in table.key] + [
            f"argMax({quote(c)}, {quote('ver')}) AS {quote(c + '__last')}" for c in rest
        ]
        conds, params = self._where(where)
        sql = (
            f"SELECT {', '.join(select)} FROM {self._table(table)}"
            f" WHERE {conds}"
            f" GROUP BY {', '.join(quote(k) for k in table.key)}"
        )
        with self._lock, self._server(f"read {table.name}"):
            arrow = self._client.query_arrow(sql, params)
        if arrow.num_columns == 0:  # no rows: no schema either
            return empty(schema)
        df = pl.from_arrow(arrow).rename({c + "__last": c for c in rest})
        return df.select(list(schema)).cast(schema)

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
        where: list[tuple[str, Any]] = [("run", run)]
        if metric_id is not None:
            where.append(("metric_id", metric_id))
        return self._latest(VALUE_TABLES[table], where + _steps(start, stop), TABLES[table][0])

    def _where(self, conds: list[tuple[str, Any]]) -> tuple[str, dict[str, Any]]:
        """`col op %(pN)s AND ...` over (column, value) or (column, (op, value)) pairs."""
        sql, params = [], {}
        for i, (col, cond) in enumerate(conds):
            op, value = cond if isinstance(cond, tuple) else ("=", cond)
            assert op in ("=", ">=", "<", "IN"), op  # fixed operators, never input
            sql.append(f"{quote(col)} {op} %(p{i})s")
            params[f"p{i}"] = value
        return " AND ".join(sql) or "1", params

    def _read_raw(self, run, *, rank, start, stop, metric_id=None):
        """One metric's cells are cut out of the vectors on the server (module docstring)."""
        if metric_id is None:
            return super()._read_raw(run, rank=rank, start=start, stop=stop)
        where, params = self._where(
            [("run", run)] + ([] if rank is None else [("rank", rank)]) + _steps(start, stop)
        )
        params.update(run=run, m=metric_id)
        v, ids, ver = quote("values"), quote("ids"), quote("ver")
        sql = (
            f"SELECT rank, step, argMax(value, {ver}) AS value FROM ("
            f" SELECT rank, step, {ver},"
            f" reinterpretAsFloat32(substring({v}, pos * 4 - 3, 4)) AS value"
            f" FROM (SELECT rank, step, layout, {v}, {ver} FROM {self._table(RAW_VECTORS)}"
            f" WHERE {where})"
            f" ANY INNER JOIN (SELECT layout, indexOf(any({ids}), %(m)s) AS pos"
            f" FROM {self._table(RAW_LAYOUTS)} WHERE run = %(run)s"
            f" GROUP BY layout HAVING pos > 0) USING layout"
            f") GROUP BY rank, step"
        )
        with self._lock, self._server("read raw_vectors"):
            arrow = self._client.query_arrow(sql, params)
        if arrow.num_columns == 0:
            return empty(RAW_SCHEMA)
        return (
            pl.from_arrow(arrow)
            .with_columns(metric_id=pl.lit(metric_id, pl.Int32))
            .select(list(RAW_SCHEMA))
            .cast(RAW_SCHEMA)
        )

    def _read_vectors(self, run, *, rank, start, stop, metric_id=None):
        """The vectors as stored (repeated keys left for vector_cells), layouts by hash."""
        where, params = self._where(
            [("run", run)] + ([] if rank is None else [("rank", rank)]) + _steps(start, stop)
        )
        cols = list(RAW_VECTORS_SCHEMA)
        rows = self._execute(
            f"SELECT {', '.join(map(quote, cols))} FROM {self._table(RAW_VECTORS)} WHERE {where}",
            params,
            columnar=True,
            settings={"strings_as_bytes": True},
        )
        vec = pl.DataFrame(dict(zip(cols, rows)) if rows else None, schema=RAW_VECTORS_SCHEMA)
        known = self._layouts.setdefault(run, {})
        missing = sorted(set(vec["layout"].to_list()) - set(known))
        if missing:
            for h, ids in self._execute(
                f"SELECT layout, any({quote('ids')}) FROM {self._table(RAW_LAYOUTS)} "
                "WHERE run = %(run)s AND layout IN %(h)s GROUP BY layout",
                {"run": run, "h": tuple(missing)},
            ):
                known[h] = np.asarray(ids, np.int32)
        return vec, known


def _steps(start: int | None, stop: int | None) -> list[tuple[str, Any]]:
    """start <= step < stop as `_where` conditions."""
    return ([] if start is None else [("step", (">=", start))]) + (
        [] if stop is None else [("step", ("<", stop))]
    )
