"""The store on a ClickHouse cluster: local tables on every node, a Distributed table over them.

    clickhouse://USER:PASS@HOST:PORT/DB?cluster=NAME
    clickhouse://USER:PASS@HOST:PORT/DB?cluster=NAME&nodes=H1:P1,H2:P2

NAME is a cluster of the servers' `remote_servers` config; HOST:PORT is the entry node, any server
whose config knows NAME. The store reads the shards and their replicas from the entry node's
`system.clusters` and opens one connection per node, with the URL's user, password and TLS.
`nodes=` is for a client that cannot reach the names remote_servers uses (a client outside a
Docker network): one HOST:PORT per row of system.clusters, in its order (shard_num, then
replica_num), saying where this client reaches that node.

DDL per node. Every migration (schema.py) runs on every node over that node's own connection
(ON CLUSTER DDL needs ZooKeeper in 18.16; this needs nothing) and is recorded in that node's own
`schema_version`. A declared table T becomes, on each node,

    T_local  ReplacingMergeTree(ver) ORDER BY natural key     the node's shard of the rows
             (ReplicatedReplacingMergeTree('/clickhouse/stepwatch/DB/T/shardN', 'HOST:PORT', ver)
              where the node has a keeper: the replicas of a shard stay copies of each other)
    T        Distributed(NAME, DB, T_local, sharding key)     the cluster's rows, read here

so the Distributed tables carry the single-server names and every read (reads.py) and every
SQL client sees the whole cluster under them.

Sharding keys (SHARDING_KEYS): a column of the table's natural key, so every version of a key
lives on one shard. Raw vectors by rank (a rank's series is on one shard; 4,096 ranks spread
evenly), reduced values, steps and events by step (a step's rows are written together by the
coordinator), the dictionary by metric_id, layouts by their hash, clips by version, runs by
cityHash64(run). A row goes to the shard `slots[key % total_weight]`, where `slots` lists shard
i weight_i times in shard order: the rule of the Distributed engine itself.

Write path. The store computes each row's shard with that rule and inserts it straight into the
owning shard's T_local on the first replica of the shard (ReplicatedMergeTree copies it to the
others), never through the Distributed table (whose inserts are queued and sent later unless
insert_distributed_sync=1; another writer going through it must set that, and lands its rows on
the same shards). flush() returns once every shard has acknowledged its part; a flush that fails
half-way is resent whole by the next one, and the rows a shard already had come again with the
same values and higher versions, so no read changes. Runs are sharded by a string hash: the entry
node computes cityHash64 of each new run name once (shards.Shards._run_hashes).

Read path. Through the Distributed tables on the entry node: each shard aggregates its rows
(argMax over ver per key) and the entry node merges the partial states.

Why de-duplication stays exact: argMax(value, ver) merges exactly across shards anyway, but
because the sharding key is part of the natural key, every version of a key (first write,
rewrite, resend) lands on the same shard: ReplacingMergeTree's merges there leave one row per key
across the whole cluster (OPTIMIZE ... FINAL on each node shows it), and a read of the owning
shard's T_local alone gives the same value as the Distributed read.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from store.base import InvalidInput, StoreError
from store.clickhouse.config import Capabilities, ClickHouseConfig
from store.clickhouse.schema import TableDDL, create_table_sql
from store.clickhouse.tables import Table, qualified, quote

if TYPE_CHECKING:  # the driver is imported only when a store is opened (connection.py)
    from store.clickhouse.connection import Connection

LOCAL_SUFFIX = "_local"
CLUSTER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\[\]-]{1,255}$")  # host:port, quoted into DDL
KEEPER_PATH = "/clickhouse/stepwatch/{database}/{table}/shard{shard}"


@dataclass(frozen=True)
class ShardingKey:
    column: str  # a column of the table's natural key
    hashed: bool = False  # cityHash64(column) (a String), else the integer column itself (>= 0)

    @property
    def sql(self) -> str:
        return f"cityHash64({quote(self.column)})" if self.hashed else quote(self.column)


SHARDING_KEYS: dict[str, ShardingKey] = {
    "runs": ShardingKey("run", hashed=True),
    "metrics": ShardingKey("metric_id"),
    "raw": ShardingKey("rank"),  # v1, no longer written
    "raw_vectors": ShardingKey("rank"),
    "raw_layouts": ShardingKey("layout"),
    "reduced": ShardingKey("step"),  # v1-v2, no longer written
    "reduced_vectors": ShardingKey("step"),
    "steps": ShardingKey("step"),
    "events": ShardingKey("step"),
    "clip_updates": ShardingKey("version"),
    "detector_state": ShardingKey("run", hashed=True),
}


def sharding_key(table: Table) -> ShardingKey:
    try:
        return SHARDING_KEYS[table.name]
    except KeyError:
        raise StoreError(
            f"table {table.name} has no sharding key (cluster.SHARDING_KEYS)"
        ) from None


def local_table(table: Table) -> Table:
    """The node-local table behind the Distributed one: same columns and key, name + _local."""
    return dataclasses.replace(table, name=table.name + LOCAL_SUFFIX)


# ---------------------------------------------------------------- topology


@dataclass(frozen=True)
class Node:
    shard: int  # shard_num in system.clusters, from 1
    replica: int  # replica_num, from 1
    name: str  # host_name:port as remote_servers spells it: the replica's identity
    host: str  # where this client connects (nodes= or remote_servers)
    port: int


@dataclass(frozen=True)
class Topology:
    cluster: str
    weights: tuple[int, ...]  # per shard, in shard_num order
    nodes: tuple[Node, ...]  # system.clusters' order
    entry_is_member: bool = True  # the URL's server is one of the nodes (is_local of a shard)

    @property
    def slots(self) -> np.ndarray:
        """Shard index (0-based) per slot: shard i weight_i times, as Distributed does."""
        return np.repeat(np.arange(len(self.weights)), self.weights)

    def shard_of(self, keys: np.ndarray) -> np.ndarray:
        return self.slots[keys.astype(np.uint64) % np.uint64(int(sum(self.weights)))]

    def writers(self) -> list[Node]:
        """The node each shard's rows are inserted on: its first replica."""
        return [next(n for n in self.nodes if n.shard == s) for s in self.shard_nums]

    @property
    def shard_nums(self) -> list[int]:
        return sorted({n.shard for n in self.nodes})


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"store option nodes: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def discover(conn: Connection, cluster: str, nodes: str) -> Topology:
    """The cluster as the entry node's remote_servers describes it, `nodes=` applied."""
    if not CLUSTER_RE.match(cluster):
        raise InvalidInput(f"cluster name {cluster!r} must match {CLUSTER_RE.pattern}")
    rows = conn.execute(
        "SELECT shard_num, shard_weight, replica_num, host_name, port, is_local"
        " FROM system.clusters WHERE cluster = %(c)s ORDER BY shard_num, replica_num",
        {"c": cluster},
    )
    if not rows:
        known = sorted({r[0] for r in conn.execute("SELECT cluster FROM system.clusters")})
        raise InvalidInput(
            f"cluster {cluster!r} is not in the remote_servers of {conn.config.display_url}; "
            f"known: {known}"
        )
    addresses = [(r[3], int(r[4])) for r in rows]
    if nodes:
        addresses = [_address(a) for a in nodes.split(",")]
        if len(addresses) != len(rows):
            raise InvalidInput(
                f"store option nodes names {len(addresses)} nodes; cluster {cluster!r} has "
                f"{len(rows)} (one HOST:PORT per shard replica, in shard then replica order)"
            )
    weights = {int(r[0]): int(r[1]) for r in rows}
    return Topology(
        cluster,
        tuple(weights[s] for s in sorted(weights)),
        tuple(
            Node(int(r[0]), int(r[2]), f"{r[3]}:{r[4]}", host, port)
            for r, (host, port) in zip(rows, addresses)
        ),
        # 18.16 flags every replica of the shard that holds this server, so this says only
        # whether the entry node is a member, never which node it is.
        entry_is_member=any(r[5] for r in rows),
    )


# ---------------------------------------------------------------- DDL per node


def node_ddl(
    database: str,
    topo: Topology,
    node: Node,
    caps: Capabilities,
    config: ClickHouseConfig,
    *,
    keeper: bool,
) -> TableDDL:
    """The CREATE statements of one declared table on `node`: T_local, then T over it."""
    if not NODE_NAME_RE.match(node.name):
        raise InvalidInput(f"cluster node name {node.name!r} must match {NODE_NAME_RE.pattern}")

    def ddl(table: Table) -> list[str]:
        local = local_table(table)
        engine = ""
        if keeper:
            path = KEEPER_PATH.format(database=database, table=table.name, shard=node.shard)
            engine = f"ReplicatedReplacingMergeTree('{path}', '{node.name}', {quote('ver')})"
        return [
            create_table_sql(database, local, caps, config.options, engine=engine),
            f"CREATE TABLE IF NOT EXISTS {qualified(database, table)}"
            f" AS {qualified(database, local)} ENGINE = Distributed('{topo.cluster}',"
            f" '{database}', '{local.name}', {sharding_key(table).sql})",
        ]

    return ddl
