"""The version-gated DDL generator and the migrations, on paper and on the real server."""

from __future__ import annotations

import re

import pytest

from store.base import InvalidInput, StoreError
from store.clickhouse.config import Capabilities, StoreOptions
from store.clickhouse.schema import LATEST_VERSION, MIGRATIONS, create_table_sql, pending_migrations
from store.clickhouse.tables import (
    DETECTOR_STATE,
    RAW,
    RAW_LAYOUTS,
    RAW_VECTORS,
    REDUCED_VECTORS,
    RUNS,
    STEPS,
    V1_TABLES,
    check_identifier,
    quote,
)

OLD, NEW = "18.16.1", "24.8.4.13"
ALL_TABLES = (*V1_TABLES, RAW_VECTORS, RAW_LAYOUTS, REDUCED_VECTORS, DETECTOR_STATE)  # v1-v4


def column_lines(sql: str) -> dict[str, str]:
    """`name` -> the rest of its line in a CREATE TABLE statement."""
    return {
        m.group(1): m.group(2).rstrip(",")
        for m in re.finditer(r"^\s+`(\w+)` (.+)$", sql, flags=re.M)
    }


@pytest.mark.parametrize(
    "version, lc, ttl, codecs",
    [
        ("18.16.1", False, False, False),
        ("19.1.6", False, False, False),
        ("19.3.4", True, False, False),
        ("19.6.2.11", True, True, False),
        ("19.9.5.36", True, True, False),
        ("19.10.1.5", True, True, True),
        ("24.8.4.13", True, True, True),
        ("25.3.2.39-lts", True, True, True),
    ],
)
def test_capabilities_follow_the_release_that_introduced_each_feature(version, lc, ttl, codecs):
    caps = Capabilities.for_version(version)
    assert (caps.low_cardinality, caps.ttl, caps.codecs) == (lc, ttl, codecs)


@pytest.mark.parametrize("bad", ["", "latest", "v24", None])
def test_unparseable_version_is_a_clear_error(bad):
    with pytest.raises(InvalidInput, match="server version"):
        Capabilities.for_version(bad)


def test_old_server_gets_plain_types_only():
    sql = create_table_sql("sw", RAW, Capabilities.for_version(OLD), StoreOptions(raw_ttl_days=30))
    for word in ("CODEC", "LowCardinality", "TTL", "Gorilla", "DoubleDelta"):
        assert word not in sql
    cols = column_lines(sql)
    assert cols == {
        "run": "String",
        "metric_id": "Int32",
        "step": "Int64",
        "rank": "Int32",
        "value": "Float32",
        "ver": "UInt64",
    }
    assert "ENGINE = ReplacingMergeTree(`ver`)" in sql
    assert "ORDER BY (`run`, `metric_id`, `step`, `rank`)" in sql
    assert sql.startswith("CREATE TABLE IF NOT EXISTS `sw`.`raw` (")


def test_new_server_gets_codecs_low_cardinality_and_ttl():
    sql = create_table_sql("sw", RAW, Capabilities.for_version(NEW), StoreOptions(raw_ttl_days=30))
    cols = column_lines(sql.split("\nENGINE")[0])
    assert cols["run"] == "LowCardinality(String)"
    assert cols["step"] == "Int64 CODEC(DoubleDelta, ZSTD(1))"
    assert cols["metric_id"] == "Int32 CODEC(Delta, ZSTD(1))"
    assert cols["value"] == "Float32 CODEC(Gorilla, ZSTD(1))"
    assert sql.rstrip().endswith("TTL toDateTime(intDiv(`ver`, 1000000000)) + toIntervalDay(30)")
    # the key and engine do not depend on the version: a store moves between servers
    assert "ORDER BY (`run`, `metric_id`, `step`, `rank`)" in sql


def test_ttl_only_where_asked_and_only_on_the_raw_table():
    new = Capabilities.for_version(NEW)
    assert "TTL" not in create_table_sql("sw", RAW, new)
    for table in ALL_TABLES:
        if table not in (RAW, RAW_VECTORS):
            assert "TTL" not in create_table_sql("sw", table, new, StoreOptions(raw_ttl_days=7))


def test_array_and_keyword_columns_render():
    sql = create_table_sql("sw", STEPS, Capabilities.for_version(NEW))
    assert column_lines(sql)["missing_ranks"] == "Array(Int32)"
    assert "`status` LowCardinality(String)" in create_table_sql(
        "sw", RUNS, Capabilities.for_version(NEW)
    )


@pytest.mark.parametrize("bad", ["", "a;b", "x`y", "1abc", "db name", "a" * 64, "é"])
def test_identifiers_are_validated_before_interpolation(bad):
    with pytest.raises(InvalidInput):
        check_identifier(bad)
    with pytest.raises(InvalidInput):
        create_table_sql(bad, RAW, Capabilities.for_version(OLD))


def test_quote_and_migration_list():
    assert quote("limit") == "`limit`"
    assert [m.version for m in MIGRATIONS] == list(range(1, LATEST_VERSION + 1))
    assert pending_migrations(0) == list(MIGRATIONS)
    assert pending_migrations(LATEST_VERSION) == []


# ---------------------------------------------------------------- on the real server


def test_migration_creates_every_table_once(clickhouse_server, clickhouse_url):
    from store.clickhouse import ClickHouseStore

    db = clickhouse_url.rsplit("/", 1)[1]
    for _ in range(2):  # the second open applies nothing
        ClickHouseStore(clickhouse_url).close()
    tables = clickhouse_server.client(
        f"SELECT name, engine FROM system.tables WHERE database = '{db}' ORDER BY name"
    )
    expected = sorted([t.name for t in ALL_TABLES] + ["schema_version"])
    assert tables.splitlines() == [f"{name}\tReplacingMergeTree" for name in expected]
    assert clickhouse_server.client(
        f"SELECT version, server_version FROM {db}.schema_version ORDER BY version FORMAT TSV"
    ).splitlines() == [f"{m.version}\t{clickhouse_server.version}" for m in MIGRATIONS]
    types = dict(
        line.split("\t")
        for line in clickhouse_server.client(
            f"SELECT name, type FROM system.columns WHERE database = '{db}' AND table = 'clip_updates'"
        ).splitlines()
    )
    want = Capabilities.for_version(clickhouse_server.version)
    assert types["run"] == ("LowCardinality(String)" if want.low_cardinality else "String")
    assert types["limit"] == "Float32" and types["acked_step"] == "Int64"


def test_a_newer_schema_than_the_code_is_refused(clickhouse_server, clickhouse_url):
    from store.clickhouse import ClickHouseStore

    db = clickhouse_url.rsplit("/", 1)[1]
    ClickHouseStore(clickhouse_url).close()
    clickhouse_server.client(
        f"INSERT INTO {db}.schema_version VALUES ({LATEST_VERSION + 1}, 'future', '', 0, 1)"
    )
    with pytest.raises(StoreError, match=f"schema v{LATEST_VERSION + 1}, newer"):
        ClickHouseStore(clickhouse_url)


def test_v3_reduced_vectors_stored_once_and_v2_rows_still_read(clickhouse_server, clickhouse_url):
    """A world-1 run's reduced rows reference its raw vectors (no values of their own); rows of
    the v1-v2 `reduced` table (one per value) still read, below a vector written since; with
    raw_ttl_days (raw values may expire) no reference is stored."""
    import numpy as np

    from store import MetricDict, RawBlock, RunInfo, ValueBatch
    from store.clickhouse import ClickHouseStore

    db = clickhouse_url.rsplit("/", 1)[1]
    ids = np.array([2, 0, 1], np.int32)

    def write(st, run):
        st.open_run(RunInfo(run, 1))
        st.write_metrics(
            run,
            MetricDict(
                np.arange(3),
                ["a", "b", "c"],
                *[np.full(3, -1)] * 3,
                [""] * 3,
                [""] * 3,
                ["mean"] * 3,
            ),
        )
        for step in range(3):
            v = np.array([[step + 0.5, step + 0.25, step + 0.75]], np.float32)
            st.write_raw_block(run, RawBlock(step, np.array([0], np.int32), ids, v))
            order = np.argsort(ids)
            st.write_reduced(
                run,
                ValueBatch(np.full(3, step), ids[order], v[0][order], n_ranks=np.ones(3, np.int32)),
            )
        st.flush()

    with ClickHouseStore(clickhouse_url) as st:
        write(st, "w1")
        assert st.series("w1", "a").rows() == [(0, 0.25), (1, 1.25), (2, 2.25)]
        assert st.at_step("w1", 2)["value"].to_list() == [2.25, 2.75, 2.5]
    rows = clickhouse_server.client(
        f"SELECT source, length(`values`) FROM {db}.reduced_vectors WHERE run = 'w1' FORMAT TSV"
    )
    assert rows.splitlines() == ["0\t0"] * 3
    with ClickHouseStore(clickhouse_url + "?raw_ttl_days=30") as st:
        write(st, "ttl")
    rows = clickhouse_server.client(
        f"SELECT source, length(`values`) FROM {db}.reduced_vectors WHERE run = 'ttl' FORMAT TSV"
    )
    assert rows.splitlines() == ["-1\t12"] * 3
    clickhouse_server.client(  # what a v2 collector wrote
        f"INSERT INTO {db}.reduced (run, metric_id, step, value, n_ranks, ver) VALUES "
        "('w1', 1, 5, 7.5, 1, 1), ('w1', 1, 2, -1.0, 1, 1)"
    )
    with ClickHouseStore(clickhouse_url) as st:
        assert st.series("w1", "b").rows() == [(0, 0.75), (1, 1.75), (2, 2.75), (5, 7.5)]
        assert st.at_step("w1", 5)["name"].to_list() == ["b"]
