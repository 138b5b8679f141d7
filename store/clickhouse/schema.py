"""The DDL for the server actually connected to, the migrations, and the raw-cells view.

One declarative list of tables (tables.py), one DDL generator, one versioned migration list.
The generator takes the server's Capabilities (config.py: read once from its version) and adds
only what that server understands: LowCardinality, per-column codecs, the raw values' TTL.

A raw cell is read on the server as
reinterpretAsFloat32(substring(values, 4 * (indexOf(ids, metric) - 1) + 1, 4)), which 18.16
already runs; `raw_cells_sql` gives other SQL clients the one-row-per-value view built that way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from store.base import StoreError
from store.clickhouse.config import Capabilities, ClickHouseConfig, StoreOptions
from store.clickhouse.encoder import insert_columns, insert_sql
from store.clickhouse.tables import (
    DETECTOR_STATE,
    RAW_LAYOUTS,
    RAW_VECTORS,
    REDUCED_VECTORS,
    RUNS,
    SCHEMA_VERSION,
    V1_TABLES,
    Column,
    Table,
    qualified,
    quote,
)

if TYPE_CHECKING:  # the driver is imported only when a store is opened (connection.py)
    from store.clickhouse.connection import Connection

log = logging.getLogger(__name__)
NO_OPTIONS = StoreOptions()  # frozen: one shared default is safe

# ---------------------------------------------------------------- DDL generator


def column_sql(col: Column, caps: Capabilities) -> str:
    type_ = col.type
    if col.low_cardinality and caps.low_cardinality:
        type_ = f"LowCardinality({type_})"
    codec = f" CODEC({col.codec})" if col.codec and caps.codecs else ""
    return f"{quote(col.name)} {type_}{codec}"


def create_table_sql(
    database: str,
    table: Table,
    caps: Capabilities,
    options: StoreOptions = NO_OPTIONS,
    *,
    engine: str = "",
) -> str:
    """CREATE TABLE IF NOT EXISTS for this server; `engine` replaces ReplacingMergeTree(ver)
    (cluster.py: the replicated engine where a keeper exists)."""
    cols = ",\n    ".join(column_sql(c, caps) for c in table.columns)
    order = ", ".join(quote(k) for k in table.key)
    engine = engine or f"ReplacingMergeTree({quote('ver')})"
    sql = (
        f"CREATE TABLE IF NOT EXISTS {qualified(database, table)} (\n    {cols}\n)"
        f"\nENGINE = {engine}\nORDER BY ({order})"
    )
    days = int(getattr(options, table.ttl_days_option, 0)) if table.ttl_days_option else 0
    if days > 0 and caps.ttl:
        # ver is insert time in ns (store.py), so the TTL counts from insertion.
        sql += f"\nTTL toDateTime(intDiv({quote('ver')}, 1000000000)) + toIntervalDay({days})"
    return sql


# ---------------------------------------------------------------- migrations


TableDDL = Callable[[Table], list[str]]
"""The statements that create one declared table where it is being created: on a single
server one CREATE (`single_server_ddl`); on a cluster node the local table and the Distributed
table over it (cluster.node_ddl)."""


def single_server_ddl(database: str, caps: Capabilities, options: StoreOptions) -> TableDDL:
    return lambda table: [create_table_sql(database, table, caps, options)]


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: Callable[[TableDDL], list[str]]


def _v1(create: TableDDL) -> list[str]:
    return [sql for t in V1_TABLES for sql in create(t)]


def _v2(create: TableDDL) -> list[str]:
    return [sql for t in (RAW_VECTORS, RAW_LAYOUTS) for sql in create(t)]


def _v3(create: TableDDL) -> list[str]:
    return create(REDUCED_VECTORS)


def _v4(create: TableDDL) -> list[str]:
    return create(DETECTOR_STATE)


# Append only; never edit an applied migration. Each statement must be idempotent (IF NOT
# EXISTS) because two processes may open a fresh database at the same moment.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, metrics, raw, reduced, steps, events, clip_updates", _v1),
    Migration(2, "raw values as per-rank vectors: raw_vectors, raw_layouts", _v2),
    Migration(3, "reduced values as vectors per step and layout: reduced_vectors", _v3),
    Migration(4, "the online detectors' saved state: detector_state", _v4),
)
LATEST_VERSION = MIGRATIONS[-1].version


def pending_migrations(current: int) -> list[Migration]:
    return [m for m in MIGRATIONS if m.version > current]


def migrate(
    conn: Connection,
    config: ClickHouseConfig,
    caps: Capabilities,
    server_version: str,
    next_ver: Callable[[], int],
    create: TableDDL | None = None,
    *,
    distributed: bool = False,
) -> None:
    """Bring the configured database on this connection's server up to LATEST_VERSION (each
    applied migration is recorded in its schema_version); StoreError if it is newer than this
    code, or if it was made the other way (`distributed`: a cluster node's, cluster.py)."""
    db = config.database
    _check_mode(conn, config, distributed)
    create = create or single_server_ddl(db, caps, config.options)
    conn.execute(create_table_sql(db, SCHEMA_VERSION, caps))
    current = int(
        conn.execute(f"SELECT max(version) FROM {qualified(db, SCHEMA_VERSION)}")[0][0] or 0
    )
    if current > LATEST_VERSION:
        raise StoreError(
            f"database {db} has schema v{current}, newer "
            f"than this code's v{LATEST_VERSION}; upgrade stepwatch"
        )
    if config.options.raw_ttl_days and not caps.ttl:
        log.warning(
            "ClickHouse %s has no TTL (needs 19.6+): raw_ttl_days=%d is ignored, "
            "raw values are kept",
            server_version,
            config.options.raw_ttl_days,
        )
    for m in pending_migrations(current):
        for sql in m.statements(create):
            conn.execute(sql)
        row = {
            "version": [m.version],
            "description": [m.description],
            "server_version": [server_version],
            "applied_at": [time.time()],
        }
        conn.execute(
            insert_sql(db, SCHEMA_VERSION),
            insert_columns(SCHEMA_VERSION, row, next_ver(), run=None, numpy=False),
            columnar=True,
            settings=None,
        )
        log.info("clickhouse schema v%d applied: %s", m.version, m.description)


def _check_mode(conn: Connection, config: ClickHouseConfig, distributed: bool) -> None:
    """Refuse a database made for a single server when opened as a cluster, and the reverse,
    before any DDL: its `runs` is a Distributed table exactly when it was made as a cluster's."""
    found = conn.execute(
        "SELECT engine FROM system.tables WHERE database = %(db)s AND name = %(t)s",
        {"db": config.database, "t": RUNS.name},
    )
    if found and (found[0][0] == "Distributed") != distributed:
        made = "a cluster (?cluster=NAME)" if not distributed else "a single server"
        raise StoreError(
            f"database {config.database} on {config.display_url} was made for {made}; "
            "open it the way it was made"
        )


def raw_cells_sql(database: str) -> str:
    """The logical raw table for other clients (clickhouse-client, benchmarks): a SELECT of
    run, rank, step, metric_id, value, ver with one row per cell of every stored vector.
    Repeated cells are all there; the stored value of one is argMax(value, ver). GLOBAL: on a
    cluster the layouts are read once and sent to every shard (a layout need not live on the
    shard of the vectors that use it); on a single server it changes nothing."""
    db = quote(database)
    return (
        "SELECT run, rank, step, ids[i] AS metric_id,"
        " reinterpretAsFloat32(substring(`values`, i * 4 - 3, 4)) AS value, ver FROM ("
        f"SELECT run, rank, step, `values`, ver, ids FROM {db}.{quote(RAW_VECTORS.name)}"
        " GLOBAL ANY INNER JOIN (SELECT run, layout, any(ids) AS ids"
        f" FROM {db}.{quote(RAW_LAYOUTS.name)} GROUP BY run, layout) USING (run, layout))"
        " ARRAY JOIN arrayEnumerate(ids) AS i"
    )
