"""The one module that imports clickhouse-driver: a client on the configured database.

store.py imports this inside ClickHouseStore's constructor, so `import store.clickhouse` (and
its config, tables and schema modules) works on an install without the clickhouse extra; only
opening a ClickHouse store needs the driver.

Every call runs under the store's lock (the driver is not thread-safe), and driver and socket
errors become StoreError naming the server, never the password.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors

from store.base import StoreError
from store.clickhouse.config import ClickHouseConfig
from store.clickhouse.tables import quote

UNKNOWN_DATABASE = 81  # ClickHouse error code
# Failures reach our callers as StoreError naming the server; the driver's own traceback per
# connect attempt would flood a collector's log while it retries a server that is down.
logging.getLogger("clickhouse_driver.connection").setLevel(logging.ERROR)


class Connection:
    def __init__(self, config: ClickHouseConfig, lock: threading.RLock) -> None:
        """Connect, creating the configured database when it is missing."""
        self.config = config
        self._lock = lock
        self._client = self._connect()

    def _new_client(self, database: str) -> Client:
        c = self.config
        return Client(
            c.host,
            port=c.port,
            user=c.user,
            password=c.password,
            database=database,
            secure=c.secure,
            connect_timeout=c.connect_timeout_s,
            send_receive_timeout=300,
            client_name="stepwatch",
        )

    def _connect(self) -> Client:
        """A client on the configured database, creating the database when it is missing."""
        client = self._new_client(self.config.database)
        try:
            with self.errors("connect"):
                try:
                    client.execute("SELECT 1")
                except ch_errors.ServerException as e:
                    if e.code != UNKNOWN_DATABASE:
                        raise
                    client.disconnect()
                    boot = self._new_client("system")  # exists on every server
                    boot.execute(f"CREATE DATABASE IF NOT EXISTS {quote(self.config.database)}")
                    boot.disconnect()
                    client.execute("SELECT 1")
        except BaseException:
            client.disconnect()
            raise
        return client

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Driver and socket errors become StoreError naming the server (never the password)."""
        try:
            yield
        except (ch_errors.Error, OSError, EOFError) as e:
            raise StoreError(
                f"ClickHouse {self.config.display_url}: {what} failed: {type(e).__name__}: {e}"
            ) from e

    def execute(self, sql: str, params: Any = None, **kw: Any) -> Any:
        """clickhouse_driver.Client.execute; errors name the statement's first words."""
        with self._lock, self.errors(sql.split("(", 1)[0][:80]):  # the driver is not
            return self._client.execute(sql, params, **kw)  # thread-safe

    def query_arrow(self, sql: str, params: dict[str, Any], what: str) -> pa.Table:
        """One SELECT as an Arrow table (no rows: a table without columns)."""
        with self._lock, self.errors(what):
            return self._client.query_arrow(sql, params)

    def disconnect(self) -> None:
        with self._lock:
            self._client.disconnect()
