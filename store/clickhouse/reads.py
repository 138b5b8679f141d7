"""The SQL of every ClickHouse read, and the frames it comes back as.

Merges eventually keep the highest `ver` of a key, but until then both copies exist on disk, so
reads do not use FINAL (single-threaded and slow on old servers) but aggregate:
`SELECT key..., argMax(col, ver) ... GROUP BY key` - exact before, during and after merges, on
every server version (`latest`).

Reads of raw values, the trade-off. series(rank=) is computed on the server (`raw_series`):
the layouts that hold the metric and its position in each, then only that rank's rows of those
layouts (the table is ordered by run, rank, step), 4 bytes cut out of each vector (substring +
reinterpretAsFloat32), argMax over ver per step - but the server still reads and decompresses each of those rows' whole vectors,
thousands of values for one. at_step(rank=) fetches the few vectors of that rank and step
(`raw_vectors`) and decodes them in the store (vectors.vector_cells), with layouts cached by
hash (they never change).

Values always travel as query parameters (`%(pN)s`), never inside SQL text; operators are a
fixed set and identifiers are quoted (tables.quote).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from store.clickhouse.tables import (
    RAW_LAYOUTS,
    RAW_VECTORS,
    REDUCED_VECTORS,
    Table,
    qualified,
    quote,
)
from store.frames import (
    RAW_SCHEMA,
    RAW_VECTORS_SCHEMA,
    REDUCED_VECTORS_SCHEMA,
    empty,
    from_arrow,
)

if TYPE_CHECKING:  # the driver is imported only when a store is opened (connection.py)
    from store.clickhouse.connection import Connection

Conditions = list[tuple[str, Any]]  # (column, value) or (column, (op, value)) pairs


def where(conds: Conditions) -> tuple[str, dict[str, Any]]:
    """`col op %(pN)s AND ...` over (column, value) or (column, (op, value)) pairs."""
    sql, params = [], {}
    for i, (col, cond) in enumerate(conds):
        op, value = cond if isinstance(cond, tuple) else ("=", cond)
        assert op in ("=", ">=", "<", "IN"), op  # fixed operators, never input
        sql.append(f"{quote(col)} {op} %(p{i})s")
        params[f"p{i}"] = value
    return " AND ".join(sql) or "1", params


def steps_between(start: int | None, stop: int | None) -> Conditions:
    """start <= step < stop as `where` conditions."""
    return ([] if start is None else [("step", (">=", start))]) + (
        [] if stop is None else [("step", ("<", stop))]
    )


def latest(
    conn: Connection, database: str, table: Table, conds: Conditions, schema: pl.Schema
) -> pl.DataFrame:
    """The last-written row of every natural key matching `conds`, as a polars frame with
    `schema`'s columns and dtypes."""
    rest = [c for c in table.column_names if c not in table.key and c != "ver"]
    select = [quote(k) for k in table.key] + [
        f"argMax({quote(c)}, {quote('ver')}) AS {quote(c + '__last')}" for c in rest
    ]
    cond_sql, params = where(conds)
    sql = (
        f"SELECT {', '.join(select)} FROM {qualified(database, table)}"
        f" WHERE {cond_sql}"
        f" GROUP BY {', '.join(quote(k) for k in table.key)}"
    )
    arrow = conn.query_arrow(sql, params, f"read {table.name}")
    if arrow.num_columns == 0:  # no rows: no schema either
        return empty(schema)
    df = from_arrow(arrow).rename({c + "__last": c for c in rest})
    return df.select(list(schema)).cast(schema)


def _rank_steps(run: str, rank: int | None, start: int | None, stop: int | None) -> Conditions:
    return [("run", run)] + ([] if rank is None else [("rank", rank)]) + steps_between(start, stop)


def holding(conn: Connection, database: str, run: str, metric_id: int) -> list[tuple[int, int]]:
    """(layout, 1-based position of metric_id in it) of every layout of the run holding it
    (raw and reduced vectors share the layout table)."""
    return conn.execute(
        f"SELECT layout, indexOf(any({quote('ids')}), %(m)s) AS pos"
        f" FROM {qualified(database, RAW_LAYOUTS)} WHERE run = %(run)s"
        " GROUP BY layout HAVING pos > 0",
        {"run": run, "m": metric_id},
    )


def _cut(held: list[tuple[int, int]], params: dict[str, Any]) -> str:
    """SQL of one metric's float32 cut out of `values` by its position in the row's layout."""
    params.update(hs=[h for h, _ in held], ps=[p for _, p in held])
    return (
        f"reinterpretAsFloat32(substring({quote('values')},"
        " transform(layout, %(hs)s, %(ps)s, 0) * 4 - 3, 4))"
    )


def raw_series(
    conn: Connection,
    database: str,
    run: str,
    metric_id: int,
    *,
    rank: int | None,
    start: int | None,
    stop: int | None,
) -> pl.DataFrame:
    """One metric's raw cells (RAW_SCHEMA), cut out of the vectors on the server: first the
    layouts holding the metric and its position in each, then one aggregate over the vectors
    of those layouts. No JOIN, so on a cluster every shard does its own part of the work."""
    held = holding(conn, database, run, metric_id)
    if not held:
        return empty(RAW_SCHEMA)
    conds = _rank_steps(run, rank, start, stop) + [("layout", ("IN", tuple(h for h, _ in held)))]
    cond_sql, params = where(conds)
    sql = (
        f"SELECT rank, step, argMax({_cut(held, params)}, {quote('ver')}) AS value"
        f" FROM {qualified(database, RAW_VECTORS)} WHERE {cond_sql} GROUP BY rank, step"
    )
    arrow = conn.query_arrow(sql, params, "read raw_vectors")
    if arrow.num_columns == 0:
        return empty(RAW_SCHEMA)
    return (
        from_arrow(arrow)
        .with_columns(metric_id=pl.lit(metric_id, pl.Int32))
        .select(list(RAW_SCHEMA))
        .cast(RAW_SCHEMA)
    )


def reduced_series(
    conn: Connection,
    database: str,
    run: str,
    metric_id: int,
    *,
    start: int | None,
    stop: int | None,
) -> pl.DataFrame:
    """One metric's reduced cells as stored (BufferedStore._reduced_cells: step, n_ranks,
    source, ver, metric_id, value), cut out of the vectors on the server, the last version of
    each (step, layout); the caller resolves layouts and references (reduced.resolve)."""
    held = holding(conn, database, run, metric_id)
    if not held:
        return _empty_cells()
    conds = [
        ("run", run),
        *steps_between(start, stop),
        ("layout", ("IN", tuple(h for h, _ in held))),
    ]
    cond_sql, params = where(conds)
    ver = quote("ver")
    sql = (
        f"SELECT step, argMax(n_ranks, {ver}) AS n_ranks_, argMax(source, {ver}) AS source_,"
        f" max({ver}) AS ver_, argMax({_cut(held, params)}, {ver}) AS value"
        f" FROM {qualified(database, REDUCED_VECTORS)} WHERE {cond_sql} GROUP BY step, layout"
    )
    arrow = conn.query_arrow(sql, params, "read reduced_vectors")
    if arrow.num_columns == 0:
        return _empty_cells()
    return (  # aliases _-suffixed: a column's own name would shadow it in the other aggregates
        from_arrow(arrow)
        .rename({"n_ranks_": "n_ranks", "source_": "source", "ver_": "ver"})
        .with_columns(metric_id=pl.lit(metric_id, pl.Int32))
        .select(list(_CELLS))
        .cast(_CELLS)
    )


_CELLS = pl.Schema(
    {
        "step": pl.Int64,
        "n_ranks": pl.Int32,
        "source": pl.Int32,
        "ver": pl.UInt64,
        "metric_id": pl.Int32,
        "value": pl.Float32,
    }
)


def _empty_cells() -> pl.DataFrame:
    return empty(_CELLS)


def reduced_vectors(
    conn: Connection,
    database: str,
    run: str,
    known: dict[int, np.ndarray],
    *,
    start: int | None,
    stop: int | None,
) -> pl.DataFrame:
    """The reduced vectors as stored (REDUCED_VECTORS_SCHEMA); layouts as for raw_vectors."""
    return _vectors(
        conn,
        database,
        REDUCED_VECTORS,
        REDUCED_VECTORS_SCHEMA,
        run,
        known,
        [("run", run), *steps_between(start, stop)],
    )


def raw_vectors(
    conn: Connection,
    database: str,
    run: str,
    known: dict[int, np.ndarray],
    *,
    rank: int | None,
    start: int | None,
    stop: int | None,
) -> pl.DataFrame:
    """The vectors as stored (RAW_VECTORS_SCHEMA, repeated keys left for vector_cells); the
    layouts they use that `known` (hash -> ids, the run's cache) lacks are fetched into it."""
    conds = _rank_steps(run, rank, start, stop)
    return _vectors(conn, database, RAW_VECTORS, RAW_VECTORS_SCHEMA, run, known, conds)


def _vectors(
    conn: Connection,
    database: str,
    table: Table,
    schema: pl.Schema,
    run: str,
    known: dict[int, np.ndarray],
    conds: Conditions,
) -> pl.DataFrame:
    cond_sql, params = where(conds)
    cols = list(schema)
    rows = conn.execute(
        f"SELECT {', '.join(map(quote, cols))} FROM {qualified(database, table)} WHERE {cond_sql}",
        params,
        columnar=True,
        settings={"strings_as_bytes": True},
    )
    vec = pl.DataFrame(dict(zip(cols, rows)) if rows else None, schema=schema)
    missing = sorted(set(vec["layout"].to_list()) - set(known))
    if missing:
        for h, ids in conn.execute(
            f"SELECT layout, any({quote('ids')}) FROM {qualified(database, RAW_LAYOUTS)} "
            "WHERE run = %(run)s AND layout IN %(h)s GROUP BY layout",
            {"run": run, "h": tuple(missing)},
        ):
            known[h] = np.asarray(ids, np.int32)
    return vec
