"""ClickHouse tables for stepwatch, rendered for the server actually connected to.

One declarative list of tables, one DDL generator, one versioned migration list. The SQL must run
on every server from Debian's 18.16 (the tests) to current releases (docker-compose), so the
generator reads the server version once and adds only what that server understands:

| feature                        | first release | what 18.16 gets instead |
|--------------------------------|---------------|-------------------------|
| LowCardinality(String)         | 19.3          | String                  |
| TTL on the raw values table    | 19.6          | no TTL (rows are kept)  |
| CODEC(Delta/DoubleDelta/       | 19.10 (the    | the server's default    |
|  Gorilla, ZSTD) per column     |  last two)    |  compression (LZ4)      |

Every table is a ReplacingMergeTree ordered by its natural key with `ver` (UInt64) as the
version column: the last write of a key wins once parts merge, and readers aggregate with
argMax(col, ver) grouped by the key so they are exact before merges too (store/clickhouse.py).

Raw per-rank values live in `raw_vectors` (schema v2): one row per (run, rank, step, layout)
whose `values` String holds the rank's float32 values, little-endian, in the order of the
layout's ids (`raw_layouts`, one row per layout hash, written once per run). A cell is read on
the server as reinterpretAsFloat32(substring(values, 4 * (indexOf(ids, metric) - 1) + 1, 4)),
which 18.16 already runs. The v1 `raw` table (one row per value) is no longer written or read.

Identifiers (database, table, column names) cannot be query parameters, so they are interpolated
only after `check_identifier`; they come from config or from this module, never from run names
or metric names. This module imports nothing of ours but store/base.py (DESIGN.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from store.base import InvalidInput

IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def check_identifier(name: str) -> str:
    if not isinstance(name, str) or not IDENT_RE.match(name):
        raise InvalidInput(f"ClickHouse identifier {name!r} must match {IDENT_RE.pattern}")
    return name


def quote(name: str) -> str:
    return f"`{check_identifier(name)}`"


# ---------------------------------------------------------------- server capabilities


@dataclass(frozen=True)
class Capabilities:
    """What the connected server's DDL may use; derived from `SELECT version()` only."""

    version: tuple[int, int]
    low_cardinality: bool  # LowCardinality(String) without the experimental setting
    ttl: bool  # table TTL expressions
    codecs: bool  # per-column CODEC(...) incl. DoubleDelta and Gorilla

    @classmethod
    def for_version(cls, version: str) -> Capabilities:
        m = re.match(r"^\s*(\d+)\.(\d+)", version or "")
        if not m:
            raise InvalidInput(f"cannot parse ClickHouse server version {version!r}")
        v = (int(m.group(1)), int(m.group(2)))
        return cls(version=v, low_cardinality=v >= (19, 3), ttl=v >= (19, 6), codecs=v >= (19, 10))


# ---------------------------------------------------------------- declarative tables


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # plain ClickHouse type, valid on 18.16
    codec: str = ""  # e.g. "DoubleDelta, ZSTD(1)"; used only where supported
    low_cardinality: bool = False  # String -> LowCardinality(String) where supported


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]  # natural key = ORDER BY; reads group by it
    ttl_days_option: str = ""  # name of the StoreOptions field giving a TTL in days

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


def _lc(name: str) -> Column:
    return Column(name, "String", low_cardinality=True)


VER = Column("ver", "UInt64", "ZSTD(1)")  # last write wins: base + row index, see clickhouse.py
RUN = _lc("run")

RUNS = Table(
    "runs",
    (
        RUN,
        Column("world_size", "Int32"),
        Column("config_json", "String", "ZSTD(3)"),
        Column("started_at", "Float64"),
        Column("updated_at", "Float64"),
        Column("last_step", "Int64"),
        _lc("status"),
        VER,
    ),
    key=("run",),
)

METRICS = Table(
    "metrics",
    (
        RUN,
        Column("metric_id", "Int32", "Delta, ZSTD(1)"),
        Column("name", "String", "ZSTD(3)"),
        Column("layer", "Int32"),
        Column("expert", "Int32"),
        Column("head", "Int32"),
        _lc("stat"),
        _lc("unit"),
        _lc("reduce"),
        VER,
    ),
    key=("run", "metric_id"),
)

_VALUE_COLUMNS = (
    Column("metric_id", "Int32", "Delta, ZSTD(1)"),  # constant over long runs of rows
    Column("step", "Int64", "DoubleDelta, ZSTD(1)"),  # +1 strides within a metric
)

RAW = Table(
    "raw",
    (  # v1 only: see raw_vectors
        RUN,
        *_VALUE_COLUMNS,
        Column("rank", "Int32", "ZSTD(1)"),
        Column("value", "Float32", "Gorilla, ZSTD(1)"),
        VER,
    ),
    key=("run", "metric_id", "step", "rank"),
    ttl_days_option="raw_ttl_days",
)

RAW_VECTORS = Table(
    "raw_vectors",
    (
        RUN,
        Column("rank", "Int32", "ZSTD(1)"),
        Column("step", "Int64", "DoubleDelta, ZSTD(1)"),
        Column("layout", "UInt64"),
        Column("values", "String", "ZSTD(1)"),
        VER,
    ),
    key=("run", "rank", "step", "layout"),
    ttl_days_option="raw_ttl_days",
)

RAW_LAYOUTS = Table(
    "raw_layouts",
    (  # no TTL: vectors outlive a layout's
        RUN,
        Column("layout", "UInt64"),
        Column("ids", "Array(Int32)"),
        VER,
    ),  # first insert
    key=("run", "layout"),
)

REDUCED = Table(
    "reduced",
    (
        RUN,
        *_VALUE_COLUMNS,
        Column("value", "Float32", "Gorilla, ZSTD(1)"),
        Column("n_ranks", "Int32", "ZSTD(1)"),
        VER,
    ),
    key=("run", "metric_id", "step"),
)

STEPS = Table(
    "steps",
    (
        RUN,
        Column("step", "Int64", "DoubleDelta, ZSTD(1)"),
        Column("n_ranks", "Int32"),
        Column("missing_ranks", "Array(Int32)"),
        Column("complete", "UInt8"),
        Column("wall_time", "Float64"),
        VER,
    ),
    key=("run", "step"),
)

# Detector events and the clip-control log (Store.write_events / write_clips).
EVENTS = Table(
    "events",
    (
        RUN,
        Column("step", "Int64", "DoubleDelta, ZSTD(1)"),
        _lc("kind"),
        _lc("site"),
        Column("value", "Float64"),
        Column("threshold", "Float64"),
        _lc("severity"),
        Column("onset_step", "Int64"),
        Column("detail", "String", "ZSTD(3)"),
        VER,
    ),  # detail: JSON
    key=("run", "step", "kind", "site"),
)

CLIP_UPDATES = Table(
    "clip_updates",
    (
        RUN,
        Column("version", "Int64"),
        Column("step", "Int64"),
        Column("layer", "Int32"),
        _lc("site"),
        Column("limit", "Float32"),
        Column("reason", "String", "ZSTD(3)"),
        Column("acked_step", "Int64"),
        VER,
    ),  # acked_step -1 until a rank acknowledges
    key=("run", "version", "layer", "site"),
)

SCHEMA_VERSION = Table(
    "schema_version",
    (
        Column("version", "UInt32"),
        Column("description", "String"),
        Column("server_version", "String"),
        Column("applied_at", "Float64"),
        Column("ver", "UInt64"),
    ),
    key=("version",),
)

V1_TABLES = (RUNS, METRICS, RAW, REDUCED, STEPS, EVENTS, CLIP_UPDATES)
ALL_TABLES = (*V1_TABLES, RAW_VECTORS, RAW_LAYOUTS)


@dataclass(frozen=True)
class StoreOptions:
    """Table options from the store URL's query string (clickhouse://...?raw_ttl_days=30)."""

    raw_ttl_days: int = 0  # delete raw per-rank values this many days after insert; 0 = keep


# ---------------------------------------------------------------- DDL generator


def column_sql(col: Column, caps: Capabilities) -> str:
    type_ = col.type
    if col.low_cardinality and caps.low_cardinality:
        type_ = f"LowCardinality({type_})"
    codec = f" CODEC({col.codec})" if col.codec and caps.codecs else ""
    return f"{quote(col.name)} {type_}{codec}"


def create_table_sql(
    database: str, table: Table, caps: Capabilities, options: StoreOptions = StoreOptions()
) -> str:
    cols = ",\n    ".join(column_sql(c, caps) for c in table.columns)
    order = ", ".join(quote(k) for k in table.key)
    sql = (
        f"CREATE TABLE IF NOT EXISTS {quote(database)}.{quote(table.name)} (\n    {cols}\n)"
        f"\nENGINE = ReplacingMergeTree({quote('ver')})\nORDER BY ({order})"
    )
    days = int(getattr(options, table.ttl_days_option, 0)) if table.ttl_days_option else 0
    if days > 0 and caps.ttl:
        # ver is insert time in ns (clickhouse.py), so the TTL counts from insertion.
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
