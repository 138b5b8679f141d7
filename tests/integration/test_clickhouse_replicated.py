"""ClickHouseStore on a replicated cluster: one shard, two Debian 18.16 replicas and a ZooKeeper
(benchmarks/zookeeper_server.py), so the local tables are ReplicatedReplacingMergeTree. Rows
written to the shard's first replica reach the second, either replica serves the same reads,
and resends after a rewrite stay exact. Optional: skips without Debian's `zookeeper` package
(scripts/system-deps.sh does not install it: it pulls in a JRE)."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from benchmarks.clickhouse_server import ClickHouseCluster, server_command
from benchmarks.zookeeper_server import ZooKeeperServer, zookeeper_command
from store import RawBlock, RunInfo, ValueBatch, open_store
from store.clickhouse.schema import LATEST_VERSION

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # importlib mode: make `tests.integration.*` importable
    sys.path.insert(0, str(ROOT))

from tests.integration.test_clickhouse_cluster import (  # noqa: E402 - after the path fix
    ALL_TABLES,
    metric_dict,
    rows,
)

RANKS, STEPS, METRICS = 4, 6, 5


@pytest.fixture(scope="module")
def replicated(tmp_path_factory) -> Iterator[ClickHouseCluster]:
    zk_cmd, ch_cmd = zookeeper_command(), server_command()
    if zk_cmd is None or ch_cmd is None:
        msg = "needs Debian's zookeeper and clickhouse-server packages (scripts/system-deps.sh)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; CI is set, so this is a failure, not a skip")
        pytest.skip(msg)
    root = tmp_path_factory.mktemp("ch-replicated")
    zk = ZooKeeperServer(zk_cmd, root / "zookeeper")
    zk.start()
    try:
        cluster = ClickHouseCluster(
            ch_cmd, root, shards=1, replicas=2, name="swr", keeper=(zk.host, zk.port)
        )
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        zk.stop()


@pytest.fixture
def url(replicated) -> Iterator[str]:
    database = f"t_{uuid.uuid4().hex[:12]}"
    yield replicated.url(database)
    for node in range(2):
        rows(replicated, node, f"DROP DATABASE IF EXISTS {database}")


def db_of(url: str) -> str:
    return url.split("?", 1)[0].rsplit("/", 1)[1]


def write(st, *, steps=range(STEPS), bump: float = 0.0) -> None:
    ranks, ids = np.arange(RANKS, dtype=np.int32), np.arange(METRICS, dtype=np.int32)
    st.open_run(RunInfo("r1", RANKS))
    st.write_metrics("r1", metric_dict(METRICS))
    for s in steps:
        v = (s * 100 + ranks[:, None] + ids[None, :] / 8 + bump).astype(np.float32)
        st.write_raw_block("r1", RawBlock(s, ranks, ids, np.ascontiguousarray(v)))
        st.write_reduced(
            "r1",
            ValueBatch(
                step=np.full(METRICS, s),
                metric_id=ids,
                value=v.mean(axis=0).astype(np.float32),
                n_ranks=np.full(METRICS, RANKS),
            ),
        )
    st.flush()


def test_replicated_tables_on_both_replicas_and_rows_reach_the_second(replicated, url):
    db = db_of(url)
    for _ in range(2):  # the second open applies nothing
        open_store(url).close()
    for node in range(2):
        engines = dict(
            rows(
                replicated,
                node,
                "SELECT name, engine FROM system.tables WHERE database = %(db)s",
                {"db": db},
            )
        )
        for t in ALL_TABLES:
            assert engines[t.name + "_local"] == "ReplicatedReplacingMergeTree", (node, t.name)
            assert engines[t.name] == "Distributed"
        versions = rows(replicated, node, f"SELECT version FROM {db}.schema_version")
        assert sorted(v for (v,) in versions) == list(range(1, LATEST_VERSION + 1))
    with open_store(url) as st:
        write(st)
        write(st, steps=range(2), bump=0.5)  # a rewrite ...
        write(st, steps=range(2), bump=0.5)  # ... and its resend
    latest = (
        f"SELECT rank, step, argMax(`values`, ver), count() FROM {db}.raw_vectors_local"
        " GROUP BY rank, step ORDER BY rank, step"
    )
    rows(replicated, 1, f"SYSTEM SYNC REPLICA {db}.raw_vectors_local")
    first, second = rows(replicated, 0, latest), rows(replicated, 1, latest)
    assert len(first) == RANKS * STEPS and first == second  # every version reached replica 2
    # either replica serves the reads, exactly one value per key, the rewrite's
    entry2 = url.replace(
        f":{replicated.servers[0].tcp_port}/", f":{replicated.servers[1].tcp_port}/"
    )
    for u in (url, entry2):
        with open_store(u) as st:
            got = st.series("r1", "moe/layer00/expert002/act_rms", rank=3)
            want = [np.float32(s * 100 + 3 + 2 / 8 + (0.5 if s < 2 else 0)) for s in range(STEPS)]
            assert got["value"].to_list() == want
            assert st.series("r1", "moe/layer00/expert002/act_rms")["step"].to_list() == list(
                range(STEPS)
            )
    for node in range(2):  # merges on each replica leave one row per key
        rows(replicated, node, f"OPTIMIZE TABLE {db}.raw_vectors_local FINAL")
    rows(replicated, 1, f"SYSTEM SYNC REPLICA {db}.raw_vectors_local")
    for node in range(2):
        counts = rows(
            replicated,
            node,
            f"SELECT count(), uniqExact(rank, step) FROM {db}.raw_vectors_local",
        )
        assert counts == [(RANKS * STEPS, RANKS * STEPS)], node
