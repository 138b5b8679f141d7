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
    RAW_LAYOUTS,
    RAW_VECTORS,
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
    database: str, table: Table, caps: Capabilities, options: StoreOptions = NO_OPTIONS
) -> str:
    cols = ",\n    ".join(column_sql(c, caps) for c in table.columns)
    order = ", ".join(quote(k) for k in table.key)
    sql = (
        f"CREATE TABLE IF NOT EXISTS {qualified(database, table)} (\n    {cols}\n)"
        f"\nENGINE = ReplacingMergeTree({quote('ver')})\nORDER BY ({order})"
    )
    days = int(getattr(options, table.ttl_days_option, 0)) if table.ttl_days_option else 0
    if days > 0 and caps.ttl:
        # ver is insert time in ns (store.py), so the TTL counts from insertion.
        sql += f"\nTTL toDateTime(intDiv({quote('ver')}, 1000000000)) + toIntervalDay({days})"
    return sql


# ---------------------------------------------------------------- migrations


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: Callable[[str, Capabilities, StoreOptions], list[str]]


def _v1(database: str, caps: Capabilities, options: StoreOptions) -> list[str]:
    return [create_table_sql(database, t, caps, options) for t in V1_TABLES]


def _v2(database: str, caps: Capabilities, options: StoreOptions) -> list[str]:
    return [create_table_sql(database, t, caps, options) for t in (RAW_VECTORS, RAW_LAYOUTS)]


# Append only; never edit an applied migration. Each statement must be idempotent (IF NOT
# EXISTS) because two processes may open a fresh database at the same moment.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, metrics, raw, reduced, steps, events, clip_updates", _v1),
    Migration(2, "raw values as per-rank vectors: raw_vectors, raw_layouts", _v2),
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
) -> None:
    """Bring the configured database up to LATEST_VERSION (each applied migration is recorded
    in schema_version); StoreError if it is newer than this code."""
    db = config.database
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
        for sql in m.statements(db, caps, config.options):
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


def raw_cells_sql(database: str) -> str:
    """The logical raw table for other clients (clickhouse-client, benchmarks): a SELECT of
    run, rank, step, metric_id, value, ver with one row per cell of every stored vector.
    Repeated cells are all there; the stored value of one is argMax(value, ver)."""
    db = quote(database)
    return (
        "SELECT run, rank, step, ids[i] AS metric_id,"
        " reinterpretAsFloat32(substring(`values`, i * 4 - 3, 4)) AS value, ver FROM ("
        f"SELECT run, rank, step, `values`, ver, ids FROM {db}.{quote(RAW_VECTORS.name)}"
        " ANY INNER JOIN (SELECT run, layout, any(ids) AS ids"
        f" FROM {db}.{quote(RAW_LAYOUTS.name)} GROUP BY run, layout) USING (run, layout))"
        " ARRAY JOIN arrayEnumerate(ids) AS i"
    )
