"""The ClickHouse tables, declared once: identifiers, columns, natural keys.

Every table is a ReplacingMergeTree ordered by its natural key with `ver` (UInt64) as the
version column: the last write of a key wins once parts merge, and readers aggregate with
argMax(col, ver) grouped by the key so they are exact before merges too (reads.py). The DDL for
a given server is rendered from these declarations by schema.py; writes and reads take column
names and keys from here, so the three cannot drift.

Raw per-rank values live in `raw_vectors` (schema v2): one row per (run, rank, step, layout)
whose `values` String holds the rank's float32 values, little-endian, in the order of the
layout's ids (`raw_layouts`, one row per layout hash, written once per run). The v1 `raw` table
(one row per value) is no longer written or read. Reduced values likewise live in
`reduced_vectors` (schema v3): one row per (run, step, layout) with the reduced float32 values of
the layout's ids (layouts shared with the raw vectors), their n_ranks, and `source` (>= 0: the
values are that rank's raw values, stored once; store/reduced.py). The v1 `reduced` table is no
longer written; its rows are still read, below any vector.

Identifiers (database, table, column names) cannot be query parameters, so they are interpolated
only after `check_identifier`; they come from config or from this module, never from run names
or metric names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from store.base import InvalidInput

IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def check_identifier(name: str) -> str:
    if not isinstance(name, str) or not IDENT_RE.match(name):
        raise InvalidInput(f"ClickHouse identifier {name!r} must match {IDENT_RE.pattern}")
    return name


def quote(name: str) -> str:
    return f"`{check_identifier(name)}`"


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


def qualified(database: str, table: Table) -> str:
    """`database`.`table`, both checked."""
    return f"{quote(database)}.{quote(table.name)}"


def _lc(name: str) -> Column:
    return Column(name, "String", low_cardinality=True)


VER = Column("ver", "UInt64", "ZSTD(1)")  # last write wins: base + row index, see store.py
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
)  # v1-v2 only: see reduced_vectors

REDUCED_VECTORS = Table(
    "reduced_vectors",
    (  # schema v3: reduced values as vectors (store/reduced.py), layouts in raw_layouts
        RUN,
        Column("step", "Int64", "DoubleDelta, ZSTD(1)"),
        Column("layout", "UInt64"),
        Column("n_ranks", "Int32", "ZSTD(1)"),
        Column("source", "Int32", "ZSTD(1)"),  # -1: own values; r: rank r's raw values
        Column("values", "String", "ZSTD(1)"),
        VER,
    ),
    key=("run", "step", "layout"),
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

# The online detectors' saved state (Store.write_detector_state, schema v4): one row per
# (run, kind), the last write wins; state is the blob as base64 text.
DETECTOR_STATE = Table(
    "detector_state",
    (
        RUN,
        _lc("kind"),
        Column("step", "Int64"),
        Column("state", "String", "ZSTD(1)"),
        VER,
    ),
    key=("run", "kind"),
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

# Schema v1's tables; v2 (schema.py) adds RAW_VECTORS and RAW_LAYOUTS.
V1_TABLES = (RUNS, METRICS, RAW, REDUCED, STEPS, EVENTS, CLIP_UPDATES)
