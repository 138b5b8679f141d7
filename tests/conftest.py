"""Fixtures every test folder can reach.

clickhouse_server (session): a real ClickHouse server started as an ordinary child process
(benchmarks/clickhouse_server.py, shared with `make bench`) in a temp dir, on free loopback
ports. One server per test session, shared by tests/store (the contract suite's "clickhouse"
param), tests/integration and tests/benchmarks.

clickhouse_cluster (session): two more such servers, one shard each, that know each other as a
cluster (benchmarks/clickhouse_server.py: ClickHouseCluster); the contract suite's
"clickhouse-cluster" param and tests/integration/test_clickhouse_cluster.py share it.

Without the binary the ClickHouse tests skip, unless CI is set: then a missing server fails.

tests/torchtitan needs torchtitan, which lives in its own venv (Makefile: .venv-titan, run by
`make test` after the rest): `pytest tests` in a venv without it does not collect that folder;
naming the folder there fails on the missing import, never skips.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator

import pytest

from benchmarks.clickhouse_server import ClickHouseCluster, ClickHouseServer, server_command

collect_ignore = [] if importlib.util.find_spec("torchtitan") else ["torchtitan"]


def _server_command() -> list[str]:
    command = server_command()
    if command is None:
        msg = "clickhouse-server binary not found (scripts/system-deps.sh installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; CI is set, so this is a failure, not a skip")
        pytest.skip(msg)
    return command


@pytest.fixture(scope="session")
def clickhouse_server(tmp_path_factory) -> Iterator[ClickHouseServer]:
    command = _server_command()
    server = ClickHouseServer(command, tmp_path_factory.mktemp("clickhouse"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clickhouse_url(clickhouse_server: ClickHouseServer) -> Iterator[str]:
    """A store URL on a database of its own (created by the store), dropped afterwards."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    yield clickhouse_server.url(database)
    clickhouse_server.client(f"DROP DATABASE IF EXISTS {database}")


@pytest.fixture(scope="session")
def clickhouse_cluster(tmp_path_factory) -> Iterator[ClickHouseCluster]:
    cluster = ClickHouseCluster(_server_command(), tmp_path_factory.mktemp("ch-cluster"), shards=2)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def clickhouse_cluster_url(clickhouse_cluster: ClickHouseCluster) -> Iterator[str]:
    """A cluster store URL on a database of its own (created on every node by the store),
    dropped on every node afterwards."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    yield clickhouse_cluster.url(database)
    for shard in range(len(clickhouse_cluster.servers)):
        clickhouse_cluster.client(shard, f"DROP DATABASE IF EXISTS {database}")
