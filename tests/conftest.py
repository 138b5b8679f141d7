"""Fixtures every test folder can reach.

clickhouse_server (session): a real ClickHouse server started as an ordinary child process
(benchmarks/clickhouse_server.py, shared with `make bench`) in a temp dir, on free loopback
ports. One server per test session, shared by tests/store (the contract suite's "clickhouse"
param), tests/integration and tests/benchmarks.

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

from benchmarks.clickhouse_server import ClickHouseServer, server_command

collect_ignore = [] if importlib.util.find_spec("torchtitan") else ["torchtitan"]


@pytest.fixture(scope="session")
def clickhouse_server(tmp_path_factory) -> Iterator[ClickHouseServer]:
    command = server_command()
    if command is None:
        msg = "clickhouse-server binary not found (scripts/system-deps.sh installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; CI is set, so this is a failure, not a skip")
        pytest.skip(msg)
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
