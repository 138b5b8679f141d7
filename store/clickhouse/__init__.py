"""The ClickHouse backend, a folder split by concern (as Vector's sinks/clickhouse/):

    config.py      where to connect (URL, environment, options) and what the server supports
    tables.py      identifiers and the declarative tables: columns, natural keys
    schema.py      DDL for the connected server's version, the migrations, raw_cells_sql
    connection.py  the clickhouse-driver client (the only module that imports the driver)
    reads.py       the SQL of reads: argMax over ver, raw cells cut out on the server
    store.py       ClickHouseStore: BufferedStore's hooks, versions, commits
    cluster.py     ?cluster=NAME: topology, sharding keys, the DDL of each node
    shards.py      the cluster's connections: migrations on every node, rows to their shard

`open_store("clickhouse://...")` (store/__init__.py) imports this package; clickhouse-driver is
imported only when a ClickHouseStore is constructed, so the other modules (and this import) work
without the clickhouse extra.
"""

from store.clickhouse.store import ClickHouseStore

__all__ = ["ClickHouseStore"]
