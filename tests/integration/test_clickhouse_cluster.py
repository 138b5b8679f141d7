"""ClickHouseStore on a two-shard cluster of Debian 18.16 servers on loopback (tests/conftest.py:
clickhouse_cluster): tables and migrations on every node, every row on the shard its key names,
every value stored once across the shards, resends after a rewrite de-duplicated exactly, a
shard's own read equal to the Distributed read, and the store CLI, the dashboard's reads and the
report giving the same answers on the cluster as on Parquet. The whole contract suite runs on the
cluster too (tests/store/conftest.py: the "clickhouse-cluster" backend)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from store import (
    ClipRecord,
    EventRecord,
    InvalidInput,
    MetricDict,
    RawBlock,
    RunInfo,
    StepStatus,
    StoreError,
    ValueBatch,
    open_store,
)
from store.clickhouse.cluster import (
    SHARDING_KEYS,
    Node,
    Topology,
    local_table,
    node_ddl,
    sharding_key,
)
from store.clickhouse.config import Capabilities, ClickHouseConfig
from store.clickhouse.schema import LATEST_VERSION
from store.clickhouse.tables import (
    DETECTOR_STATE,
    RAW_LAYOUTS,
    RAW_VECTORS,
    REDUCED_VECTORS,
    V1_TABLES,
)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # importlib mode: make `tests.analytics.*` importable
    sys.path.insert(0, str(ROOT))
ALL_TABLES = (*V1_TABLES, RAW_VECTORS, RAW_LAYOUTS, REDUCED_VECTORS, DETECTOR_STATE)  # v1-v4
RANKS, STEPS, METRICS = 8, 12, 5
SYNC = {"insert_distributed_sync": 1}  # an INSERT into a Distributed table returns when stored
VALUE_TABLES = ("raw_vectors", "reduced_vectors", "steps", "events", "clip_updates", "metrics")


def db_of(url: str) -> str:
    return url.split("?", 1)[0].rsplit("/", 1)[1]


def rows(
    cluster, shard: int, sql: str, params: dict | None = None, settings: dict | None = None
) -> list[tuple]:
    """A query on one node, typed (clickhouse-driver, a client of its own)."""
    from clickhouse_driver import Client

    server = cluster.servers[shard]
    client = Client(server.host, port=server.tcp_port, send_receive_timeout=60)
    try:
        return client.execute(sql, params, settings=settings)
    finally:
        client.disconnect()


def metric_dict(n: int = METRICS) -> MetricDict:
    return MetricDict(
        np.arange(n, dtype=np.int32),
        [f"moe/layer00/expert{i:03d}/act_rms" for i in range(n)],
        np.zeros(n, np.int32),
        np.arange(n, dtype=np.int32),
        np.full(n, -1, np.int32),
        ["act_rms"] * n,
        [""] * n,
        ["mean"] * n,
    )


def cell(step, rank, metric, bump: float = 0.0) -> np.ndarray:
    """Exact in float32: the value of one raw cell."""
    return np.float32(step * 100 + rank + metric / 8 + bump)


def write_run(st, run: str = "r1", *, steps=range(STEPS), bump: float = 0.0) -> None:
    """Raw blocks of RANKS ranks, reduced values, steps, events and clips for `steps`."""
    ranks = np.arange(RANKS, dtype=np.int32)
    ids = np.arange(METRICS, dtype=np.int32)
    st.open_run(RunInfo(run, RANKS))
    st.write_metrics(run, metric_dict())
    for s in steps:
        v = cell(s, ranks[:, None], ids[None, :], bump).astype(np.float32)
        st.write_raw_block(run, RawBlock(s, ranks, ids, np.ascontiguousarray(v)))
        st.write_reduced(
            run,
            ValueBatch(
                step=np.full(METRICS, s),
                metric_id=ids,
                value=v.mean(axis=0).astype(np.float32),
                n_ranks=np.full(METRICS, RANKS),
            ),
        )
    st.write_steps(run, [StepStatus(s, RANKS, wall_time=s + bump) for s in steps])
    st.write_events(
        run,
        [
            EventRecord(s, "blowup", "moe/layer00/expert001", s + bump, 1.0, "warning", s)
            for s in steps
        ],
    )
    st.write_clips(
        run,
        [ClipRecord(s + 1, s, 0, "routed", 7.0 + bump, "test") for s in steps],
    )
    st.flush()


# ---------------------------------------------------------------- on paper


def test_every_table_has_a_sharding_key_from_its_natural_key():
    assert set(SHARDING_KEYS) == {t.name for t in ALL_TABLES}
    for t in ALL_TABLES:
        assert sharding_key(t).column in t.key, t.name  # every version of a key: one shard


def test_shard_rule_is_the_distributed_engines_with_weights():
    two = Topology("c", (1, 1), ())
    assert two.shard_of(np.arange(6)).tolist() == [0, 1, 0, 1, 0, 1]
    weighted = Topology("c", (2, 1), ())  # slots [0, 0, 1]
    assert weighted.shard_of(np.array([0, 1, 2, 3, 4, 5, 2**64 - 1], np.uint64)).tolist() == [
        0,
        0,
        1,
        0,
        0,
        1,
        0,  # 2**64 - 1 = 0 mod 3
    ]


def test_ddl_per_node_local_then_distributed_and_replicated_with_a_keeper():
    topo = Topology("sw", (1, 1), ())
    node = Node(2, 1, "ch2:9000", "10.0.0.2", 9000)
    caps = Capabilities.for_version("24.8.4.13")
    plain = node_ddl("db", topo, node, caps, ClickHouseConfig(), keeper=False)(RAW_VECTORS)
    assert len(plain) == 2
    assert plain[0].startswith("CREATE TABLE IF NOT EXISTS `db`.`raw_vectors_local`")
    assert "ENGINE = ReplacingMergeTree(`ver`)" in plain[0]
    assert plain[1] == (
        "CREATE TABLE IF NOT EXISTS `db`.`raw_vectors` AS `db`.`raw_vectors_local`"
        " ENGINE = Distributed('sw', 'db', 'raw_vectors_local', `rank`)"
    )
    repl = node_ddl("db", topo, node, caps, ClickHouseConfig(), keeper=True)(RAW_VECTORS)
    assert (
        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/stepwatch/db/raw_vectors/shard2',"
        " 'ch2:9000', `ver`)" in repl[0]
    )
    runs = node_ddl("db", topo, node, caps, ClickHouseConfig(), keeper=False)(ALL_TABLES[0])
    assert runs[1].endswith("cityHash64(`run`))")
    bad = Node(1, 1, "x'); DROP", "h", 1)
    with pytest.raises(InvalidInput):
        node_ddl("db", topo, bad, caps, ClickHouseConfig(), keeper=True)


# ---------------------------------------------------------------- on the cluster


def test_every_node_has_its_local_tables_the_distributed_ones_and_its_migrations(
    clickhouse_cluster, clickhouse_cluster_url
):
    db = db_of(clickhouse_cluster_url)
    for _ in range(2):  # the second open applies nothing
        open_store(clickhouse_cluster_url).close()
    for shard in range(2):
        engines = dict(
            rows(
                clickhouse_cluster,
                shard,
                "SELECT name, engine FROM system.tables WHERE database = %(db)s",
                {"db": db},
            )
        )
        want = {"schema_version": "ReplacingMergeTree"}
        for t in ALL_TABLES:
            want[local_table(t).name] = "ReplacingMergeTree"  # no keeper in these tests
            want[t.name] = "Distributed"
        assert engines == want, shard
        versions = rows(
            clickhouse_cluster, shard, f"SELECT version FROM {db}.schema_version ORDER BY version"
        )
        assert [v for (v,) in versions] == list(range(1, LATEST_VERSION + 1))
        (create,) = rows(
            clickhouse_cluster,
            shard,
            "SELECT create_table_query FROM system.tables WHERE database = %(db)s"
            " AND name = 'reduced_vectors'",
            {"db": db},
        )[0]
        assert f"Distributed('sw', '{db}', 'reduced_vectors_local', step)" in create


def test_rows_live_on_the_shard_their_key_names_and_both_shards_get_rows(
    clickhouse_cluster, clickhouse_cluster_url
):
    db = db_of(clickhouse_cluster_url)
    with open_store(clickhouse_cluster_url) as st:
        write_run(st)
        topo = st.shards.topology
    for table in ALL_TABLES:
        if table.name in ("raw", "reduced", "runs", "detector_state"):  # v1-v2 never written;
            continue  # runs: below; detector_state (hashed run, like runs): not written here
        col = sharding_key(table).column
        for shard in range(2):
            keys = np.array(
                [
                    k
                    for (k,) in rows(
                        clickhouse_cluster, shard, f"SELECT {col} FROM {db}.{table.name}_local"
                    )
                ],
                np.uint64,
            )
            assert (topo.shard_of(keys) == shard).all(), (table.name, shard)
            if table.name in VALUE_TABLES:  # (one run has one layout: on one shard)
                assert keys.size > 0, (table.name, shard)


def test_the_store_routes_rows_where_the_distributed_table_does(
    clickhouse_cluster, clickhouse_cluster_url
):
    """Another writer inserting through the Distributed tables (insert_distributed_sync=1)
    lands each key on the shard the store writes it to, runs' string hash included."""
    db = db_of(clickhouse_cluster_url)
    names = [f"run-{i}" for i in range(8)]
    with open_store(clickhouse_cluster_url) as st:
        for name in names:
            st.open_run(RunInfo(name, 1))
        st.flush()
        rows(
            clickhouse_cluster,
            0,
            f"INSERT INTO {db}.reduced (run, metric_id, step, value, n_ranks, ver)"
            " SELECT 'via-dist', 0, number, 1.0, 1, 1 FROM numbers(20)",
            settings=SYNC,  # (a SETTINGS clause here would be the SELECT's)
        )
        rows(
            clickhouse_cluster,
            0,
            f"INSERT INTO {db}.runs (run, world_size, config_json, started_at, updated_at,"
            " last_step, status, ver) SELECT run, 1, '{}', 0, 0, -1, 'via-dist', 1"
            f" FROM {db}.runs",
            settings=SYNC,
        )
        topo = st.shards.topology
    steps_at, runs_at, dist_runs_at = {}, {}, {}
    for shard in range(2):
        for (step,) in rows(
            clickhouse_cluster, shard, f"SELECT step FROM {db}.reduced_local WHERE run = 'via-dist'"
        ):
            steps_at[step] = shard
        for run, status in rows(
            clickhouse_cluster, shard, f"SELECT run, status FROM {db}.runs_local"
        ):
            (dist_runs_at if status == "via-dist" else runs_at)[run] = shard
    assert steps_at == {s: int(topo.shard_of(np.array([s]))[0]) for s in range(20)}
    assert runs_at == dist_runs_at  # runs: cityHash64(run), by the store and by the engine
    assert set(runs_at) == set(names) and set(runs_at.values()) == {0, 1}  # both shards


def key_counts(cluster, db: str, table: str, key: str) -> pl.DataFrame:
    """Stored rows per key on each shard: columns key..., shard, copies."""
    parts = []
    for shard in range(2):
        got = rows(cluster, shard, f"SELECT {key}, count() FROM {db}.{table}_local GROUP BY {key}")
        names = key.split(", ")
        parts.append(
            pl.DataFrame(
                [list(r) for r in got] or None,
                schema=[*names, "copies"],
                orient="row",
            ).with_columns(shard=pl.lit(shard))
        )
    return pl.concat(parts)


def test_every_value_stored_once_and_resends_after_a_rewrite_deduplicate_exactly(
    clickhouse_cluster, clickhouse_cluster_url
):
    db = db_of(clickhouse_cluster_url)
    for shard in range(2):  # keep every insert's part apart until we look
        for t in ("raw_vectors", "reduced_vectors"):
            rows(clickhouse_cluster, shard, f"SYSTEM STOP MERGES {db}.{t}_local")
    with open_store(clickhouse_cluster_url) as st:
        write_run(st)
        once = key_counts(clickhouse_cluster, db, "raw_vectors", "rank, step")
        assert once.height == RANKS * STEPS and (once["copies"] == 1).all()  # once, cluster-wide
        write_run(st, steps=range(4), bump=0.5)  # a rewrite of steps 0-3 ...
        write_run(st, steps=range(4), bump=0.5)  # ... and its resend after a reconnect
        for table, key in (("raw_vectors", "rank, step"), ("reduced_vectors", "step, layout")):
            on_disk = key_counts(clickhouse_cluster, db, table, key)
            per_key = on_disk.group_by(key.split(", ")).agg(
                pl.col("shard").n_unique().alias("shards"), pl.col("copies").sum()
            )
            assert (per_key["shards"] == 1).all(), table  # every version on one shard
            assert per_key["copies"].sum() == on_disk["copies"].sum()
            assert per_key.filter(pl.col("step") < 4)["copies"].unique().to_list() == [3]
        for rank in (0, 5):
            got = st.series("r1", "moe/layer00/expert002/act_rms", rank=rank)
            want = [cell(s, rank, 2, 0.5 if s < 4 else 0.0) for s in range(STEPS)]
            assert got["value"].to_list() == want
        red = st.series("r1", "moe/layer00/expert002/act_rms")
        assert red["step"].to_list() == list(range(STEPS))  # exactly one value per step
        assert red["value"][0] == np.float32(cell(0, np.arange(RANKS), 2, 0.5).mean())
        assert st.steps("r1")["wall_time"].to_list() == [
            s + (0.5 if s < 4 else 0) for s in range(STEPS)
        ]
        for shard in range(2):
            for t in ("raw_vectors", "reduced_vectors"):
                rows(clickhouse_cluster, shard, f"SYSTEM START MERGES {db}.{t}_local")
                rows(clickhouse_cluster, shard, f"OPTIMIZE TABLE {db}.{t}_local FINAL")
        merged = key_counts(clickhouse_cluster, db, "raw_vectors", "rank, step")
        assert merged.height == RANKS * STEPS and (merged["copies"] == 1).all()
        reduced = key_counts(clickhouse_cluster, db, "reduced_vectors", "step, layout")
        assert reduced.height == STEPS and (reduced["copies"] == 1).all()  # a vector a step
        again = st.series("r1", "moe/layer00/expert002/act_rms", rank=5)
        assert again["value"].to_list() == [
            cell(s, 5, 2, 0.5 if s < 4 else 0.0) for s in range(STEPS)
        ]


def test_a_shards_own_read_equals_the_distributed_read(clickhouse_cluster, clickhouse_cluster_url):
    db = db_of(clickhouse_cluster_url)
    with open_store(clickhouse_cluster_url) as st:
        write_run(st)
        write_run(st, steps=range(3), bump=0.25)  # unmerged versions on both shards
        topo = st.shards.topology
    for table, key, col in (
        ("raw_vectors", "rank, step", "values"),
        ("reduced_vectors", "step, layout", "values"),
        ("events", "step, kind, site", "value"),
    ):
        shard_col = sharding_key(next(t for t in ALL_TABLES if t.name == table)).column
        latest = f"SELECT {key}, argMax(`{col}`, ver) FROM {db}.{{t}} WHERE run = 'r1' {{w}} GROUP BY {key} ORDER BY {key}"
        union = []
        for shard in range(2):
            local = rows(clickhouse_cluster, shard, latest.format(t=table + "_local", w=""))
            owned = sorted({r[key.split(", ").index(shard_col)] for r in local})
            assert (topo.shard_of(np.array(owned)) == shard).all()
            through = rows(
                clickhouse_cluster,
                1 - shard,  # the Distributed read, from the other node
                latest.format(t=table, w=f"AND {shard_col} IN %(k)s"),
                {"k": tuple(owned)},
            )
            assert local == through, (table, shard)
            union += local
        whole = rows(clickhouse_cluster, 0, latest.format(t=table, w=""))
        assert sorted(union) == whole, table


def test_a_database_is_opened_the_way_it_was_made(clickhouse_cluster, clickhouse_cluster_url):
    single = clickhouse_cluster_url.split("?", 1)[0]
    open_store(clickhouse_cluster_url).close()
    with pytest.raises(StoreError, match="made for a cluster"):
        open_store(single)
    other = single.rsplit("/", 1)[0] + "/" + db_of(clickhouse_cluster_url) + "_single"
    try:
        open_store(other).close()
        with pytest.raises(StoreError, match="made for a single server"):
            open_store(other + "?cluster=sw")
    finally:
        for shard in range(2):
            rows(clickhouse_cluster, shard, f"DROP DATABASE IF EXISTS {db_of(other)}")


def test_cluster_url_errors_are_clear_and_nodes_say_where_to_connect(
    clickhouse_cluster, clickhouse_cluster_url
):
    base = clickhouse_cluster_url.split("?", 1)[0]
    with pytest.raises(InvalidInput, match=r"cluster 'nope' is not in the remote_servers.*'sw'"):
        open_store(base + "?cluster=nope")
    with pytest.raises(InvalidInput, match="must match"):
        open_store(base + "?cluster=a%27b")
    ports = [s.tcp_port for s in clickhouse_cluster.servers]
    with pytest.raises(InvalidInput, match="names 1 nodes; cluster 'sw' has 2"):
        open_store(base + f"?cluster=sw&nodes=localhost:{ports[0]}")
    with pytest.raises(InvalidInput, match="is not HOST:PORT"):
        open_store(base + "?cluster=sw&nodes=a:1,b")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with pytest.raises(StoreError, match=f"localhost:{dead}"):
        open_store(base + f"?cluster=sw&nodes=localhost:{ports[0]},localhost:{dead}")
    via = base + f"?cluster=sw&nodes=localhost:{ports[0]},localhost:{ports[1]}"
    with open_store(via) as st:  # other addresses for the same nodes: same cluster
        write_run(st, steps=range(2))
    with open_store(clickhouse_cluster_url) as st:
        assert st.steps("r1")["step"].to_list() == [0, 1]


def test_replicas_without_a_keeper_are_refused(clickhouse_cluster, clickhouse_cluster_url):
    """Two replicas of one shard need ReplicatedMergeTree; these servers have no keeper."""
    clickhouse_cluster.define("sw_replicas", [[0, 1]])
    base = clickhouse_cluster_url.split("?", 1)[0]
    with pytest.raises(StoreError, match="need ReplicatedMergeTree and so a keeper"):
        open_store(base + "?cluster=sw_replicas")


# ---------------------------------------------------------------- the tools, unchanged


def in_process(main, capsys, *args: str) -> str:
    """A `python -m` entry point run here (a subprocess per command costs seconds)."""
    capsys.readouterr()
    assert main(list(args)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_store_cli_dashboard_reads_and_report_answer_as_on_parquet(
    clickhouse_cluster_url, tmp_path, capsys
):
    """The same run written to the cluster and to Parquet: `python -m store`, the dashboard's
    read functions and `python -m analytics report` give the same answers on both."""
    from analytics.__main__ import main as analytics_main
    from dashboard import reads
    from store.__main__ import main as store_main
    from tests.analytics.test_offline_report import STEPS as REPORT_STEPS
    from tests.analytics.test_offline_report import faulty, store_run

    parquet = f"parquet:{tmp_path / 'pq'}"
    for url in (clickhouse_cluster_url, parquet):
        with open_store(url) as st:
            store_run(st, faulty(), REPORT_STEPS)
            write_run(st, "r1")
    metric = "moe/layer00/expert003/act_rms"
    commands = [
        ("runs",),
        ("metrics", "--run", "r1"),
        ("steps", "--run", "r1"),
        ("series", "--run", "r1", "--metric", metric),
        ("series", "--run", "r1", "--metric", metric, "--rank", "3", "--start", "2", "--stop", "9"),
        ("at-step", "--run", "r1", "--step", "7", "--pattern", "moe/*"),
        ("at-step", "--run", "r1", "--step", "7", "--rank", "6"),
        ("events", "--run", "r1"),
        ("clips", "--run", "r1"),
        ("series", "--run", "faulty", "--metric", "train/loss", "--rank", "1"),
    ]
    for args in commands:
        on_cluster = in_process(
            store_main, capsys, args[0], "--store", clickhouse_cluster_url, *args[1:]
        )
        on_parquet = in_process(store_main, capsys, args[0], "--store", parquet, *args[1:])
        if args[0] == "runs":  # updated_at is each store's own write time
            on_cluster, on_parquet = (
                pl.read_csv(t.encode()).drop("updated_at") for t in (on_cluster, on_parquet)
            )
            assert_frame_equal(on_cluster, on_parquet)
            assert on_cluster["run"].to_list() == ["faulty", "r1"]  # by started_at
        else:
            assert on_cluster == on_parquet, args
            assert on_cluster.count("\n") > 1, args  # a header and rows

    def dashboard_view(url: str) -> list[pl.DataFrame]:
        row, r1 = reads.run_row(url, "faulty"), reads.run_row(url, "r1")
        v = reads.version_of(row)
        return [
            reads.metrics(url, "faulty", v),
            reads.series(url, "faulty", "train/loss", v),
            reads.at_step(url, "faulty", 50, "moe/*", row),
            reads.expert_wide(url, "faulty", 40, 60, ("act_rms", "tokens"), row),
            reads.events(url, "r1", reads.version_of(r1)),
            reads.clips(url, "r1", reads.version_of(r1)),
        ]

    for a, b in zip(dashboard_view(clickhouse_cluster_url), dashboard_view(parquet)):
        assert a.height > 0
        assert_frame_equal(a, b)

    findings = []
    for name, url in (("cluster", clickhouse_cluster_url), ("parquet", parquet)):
        out = tmp_path / f"{name}.html"
        in_process(
            analytics_main, capsys, "report", "--store", url, "--run", "faulty", "--out", str(out)
        )
        findings.append(json.loads(out.with_suffix(".json").read_text()))
    assert findings[0] == findings[1]
    assert findings[0]["events"]  # a real report: the faulty run's blow-up, death and NaN
    user = subprocess.run(  # and once as a user runs it
        [sys.executable, "-m", "store", *commands[4][:1], "--store", clickhouse_cluster_url]
        + list(commands[4][1:]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert user.returncode == 0, user.stderr
    assert user.stdout == in_process(
        store_main, capsys, commands[4][0], "--store", parquet, *commands[4][1:]
    )
