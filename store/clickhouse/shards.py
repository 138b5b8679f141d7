"""The connections of a cluster store: one per node, migrations on each, rows to their shard.

cluster.py says what goes where (topology, sharding keys, DDL per node); this module does it
for ClickHouseStore: opens a connection to every node (besides the entry node's, which reads), migrates every
node, and splits each INSERT by shard (`insert`), one INSERT per shard that has rows, each into
that shard's T_local on its first replica.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from store.base import StoreError
from store.clickhouse.cluster import (
    Node,
    Topology,
    discover,
    local_table,
    node_ddl,
    sharding_key,
)
from store.clickhouse.config import Capabilities, ClickHouseConfig
from store.clickhouse.encoder import insert_sql
from store.clickhouse.schema import migrate
from store.clickhouse.tables import Table

if TYPE_CHECKING:  # the driver is imported only when a store is opened (connection.py)
    from store.clickhouse.connection import Connection

log = logging.getLogger(__name__)


def has_keeper(conn: Connection) -> bool:
    """ZooKeeper or ClickHouse Keeper configured: system.zookeeper exists only then (every
    release from 18.16 on)."""
    found = conn.execute(
        "SELECT count() FROM system.tables WHERE database = 'system' AND name = 'zookeeper'"
    )
    return bool(found[0][0])


def _take(column: Any, rows: np.ndarray) -> Any:
    """The rows `rows` of one INSERT column (numpy array or list)."""
    if isinstance(column, np.ndarray):
        return column[rows]
    return [column[i] for i in rows]


class Shards:
    """Every node of the cluster named by config.options.cluster, migrated and connected."""

    def __init__(
        self,
        entry: Connection,
        config: ClickHouseConfig,
        lock: threading.RLock,
        next_ver: Callable[[], int],
    ) -> None:
        from store.clickhouse.connection import Connection

        self.config = config
        self.topology: Topology = discover(entry, config.options.cluster, config.options.nodes)
        self._entry = entry
        self._hashes: dict[str, int] = {}  # run name -> cityHash64, computed by the server
        self._conns: dict[Node, Connection] = {}
        try:
            for node in self.topology.nodes:
                at = dataclasses.replace(config, host=node.host, port=node.port)
                self._conns[node] = Connection(at, lock)
            self.keeper = {node: has_keeper(conn) for node, conn in self._conns.items()}
            self._check_replicas()
            for node, conn in self._conns.items():
                self._migrate(node, conn, next_ver)
            if not self.topology.entry_is_member:  # a reader outside the cluster
                outside = Node(0, 0, f"{config.host}:{config.port}", config.host, config.port)
                self.keeper[outside] = False  # its T_local stay empty: nothing is routed there
                self._migrate(outside, entry, next_ver)
        except BaseException:
            self.disconnect()
            raise
        self._writers = [self._conns[n] for n in self.topology.writers()]
        log.info(
            "clickhouse cluster %s: %d shards, %d nodes, %s",
            self.topology.cluster,
            len(self._writers),
            len(self._conns),
            "replicated (keeper)" if any(self.keeper.values()) else "MergeTree (no keeper)",
        )

    def _check_replicas(self) -> None:
        shards = self.topology.shard_nums
        replicated = len(self.topology.nodes) > len(shards)
        if replicated and not all(self.keeper.values()):
            lacking = sorted(n.name for n, k in self.keeper.items() if not k)
            raise StoreError(
                f"cluster {self.topology.cluster} has shards with several replicas, which need "
                f"ReplicatedMergeTree and so a keeper; no ZooKeeper/Keeper on: {lacking}"
            )

    def _migrate(self, node: Node, conn: Connection, next_ver: Callable[[], int]) -> None:
        version = conn.execute("SELECT version()")[0][0]
        caps = Capabilities.for_version(version)
        create = node_ddl(
            self.config.database, self.topology, node, caps, conn.config, keeper=self.keeper[node]
        )
        migrate(conn, conn.config, caps, version, next_ver, create, distributed=True)

    # ---- writes -------------------------------------------------------------------------------
    def _run_hashes(self, runs: list[str]) -> np.ndarray:
        """cityHash64 of each run name, as the Distributed table would compute it."""
        new = sorted(set(runs) - set(self._hashes))
        if new:
            got = self._entry.execute("SELECT arrayMap(x -> cityHash64(x), %(v)s)", {"v": new})
            self._hashes.update(zip(new, got[0][0]))
        return np.array([self._hashes[r] for r in runs], dtype=np.uint64)

    def insert(self, database: str, table: Table, data: list[Any], settings: Any) -> None:
        """One INSERT's columns (table order), split by shard: each part into its shard's
        T_local. Returns once every shard acknowledged its part."""
        key = sharding_key(table)
        column = data[table.column_names.index(key.column)]
        keys = self._run_hashes(list(column)) if key.hashed else np.asarray(column)
        shard = self.topology.shard_of(keys)
        sql = insert_sql(database, local_table(table))
        for i, conn in enumerate(self._writers):
            rows = np.flatnonzero(shard == i)
            if rows.size == 0:
                continue
            part = data if rows.size == shard.size else [_take(c, rows) for c in data]
            conn.execute(sql, part, columnar=True, settings=settings)

    def disconnect(self) -> None:
        for conn in self._conns.values():
            conn.disconnect()
