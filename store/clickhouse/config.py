"""Where the ClickHouse store connects, and what the server there supports.

    clickhouse://USER:PASSWORD@HOST:PORT/DATABASE?raw_ttl_days=30    (clickhouses:// = TLS)
    clickhouse://USER:PASSWORD@HOST:PORT/DATABASE?cluster=NAME      (a cluster: cluster.py)

Resolution, field by field: what the URL says; else the environment (CLICKHOUSE_HOST, _PORT,
_USER, _PASSWORD, _DB); else the defaults below. A bare "clickhouse:" or "clickhouse://" first
tries STEPWATCH_CLICKHOUSE_URL. The password may also come from the file CLICKHOUSE_PASSWORD_FILE
names (a Docker/Kubernetes secret). So a deployment keeps the password out of command lines,
where /proc/PID/cmdline shows it to every local user (docker-compose passes
CLICKHOUSE_PASSWORD), while the URL names host and database. The query string carries table
options (StoreOptions).

The SQL must run on every server from Debian's 18.16 (the tests) to current releases
(docker-compose), so the server version is read once (`SELECT version()`) and the DDL
(schema.py) adds only what that server understands (Capabilities):

| feature                        | first release | what 18.16 gets instead |
|--------------------------------|---------------|-------------------------|
| LowCardinality(String)         | 19.3          | String                  |
| TTL on the raw values table    | 19.6          | no TTL (rows are kept)  |
| CODEC(Delta/DoubleDelta/       | 19.10 (the    | the server's default    |
|  Gorilla, ZSTD) per column     |  last two)    |  compression (LZ4)      |
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypedDict
from urllib.parse import parse_qsl, unquote, urlsplit

from store.base import InvalidInput
from store.clickhouse.tables import check_identifier


class _Fields(TypedDict):
    host: str
    port: int
    user: str
    password: str
    database: str


URL_ENV = "STEPWATCH_CLICKHOUSE_URL"
DEFAULTS = _Fields(host="localhost", port=9000, user="default", password="", database="stepwatch")
FIELD_ENV = {
    "host": "CLICKHOUSE_HOST",
    "port": "CLICKHOUSE_PORT",
    "user": "CLICKHOUSE_USER",
    "password": "CLICKHOUSE_PASSWORD",
    "database": "CLICKHOUSE_DB",
}
PASSWORD_FILE_ENV = "CLICKHOUSE_PASSWORD_FILE"


@dataclass(frozen=True)
class StoreOptions:
    """Table options from the store URL's query string (clickhouse://...?raw_ttl_days=30)."""

    raw_ttl_days: int = 0  # delete raw per-rank values this many days after insert; 0 = keep
    cluster: str = ""  # remote_servers name: local tables per node + Distributed (cluster.py)
    nodes: str = ""  # host:port,... how this client reaches the cluster's nodes (cluster.py)


_OPTIONS = {f.name for f in fields(StoreOptions)}
_TEXT_OPTIONS = {"cluster", "nodes"}


@dataclass(frozen=True)
class ClickHouseConfig:
    host: str = DEFAULTS["host"]
    port: int = DEFAULTS["port"]
    user: str = DEFAULTS["user"]
    password: str = field(default="", repr=False)  # never in logs or error messages
    database: str = DEFAULTS["database"]
    secure: bool = False
    connect_timeout_s: float = 10.0
    options: StoreOptions = StoreOptions()

    def __post_init__(self) -> None:
        check_identifier(self.database)
        if not self.host:
            raise InvalidInput("ClickHouse host must not be empty")
        if not 0 < self.port < 65536:
            raise InvalidInput(f"ClickHouse port must be in 1..65535, got {self.port}")

    @property
    def display_url(self) -> str:
        scheme = "clickhouses" if self.secure else "clickhouse"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{self.database}"

    @classmethod
    def from_url(
        cls, url: str | None = None, env: Mapping[str, str] | None = None
    ) -> ClickHouseConfig:
        env = os.environ if env is None else env
        url = url or "clickhouse://"
        if not isinstance(url, str):
            raise InvalidInput(f"ClickHouse URL must be a string, got {type(url).__name__}")
        if url.rstrip("/") in ("clickhouse:", "clickhouses:") and env.get(URL_ENV):
            if env[URL_ENV].rstrip("/") in ("clickhouse:", "clickhouses:"):
                raise InvalidInput(f"{URL_ENV} must name a server, got {env[URL_ENV]!r}")
            return cls.from_url(env[URL_ENV], env)
        parts = urlsplit(url)
        if parts.scheme not in ("clickhouse", "clickhouses"):
            raise InvalidInput(
                f"not a ClickHouse URL: {_redact(url)!r} "
                "(expected clickhouse://user:pass@host:port/db)"
            )
        try:
            url_port = parts.port
        except ValueError:
            raise InvalidInput(f"bad port in ClickHouse URL {_redact(url)!r}") from None

        def pick(key: str, given: str | None, default: str) -> str:
            """What the URL gave (None: nothing), else the environment's, else the default."""
            return given if given is not None else (env.get(FIELD_ENV[key]) or default)

        port: int | str = (
            url_port if url_port is not None else env.get(FIELD_ENV["port"]) or DEFAULTS["port"]
        )
        try:
            port = int(port)
        except ValueError:
            raise InvalidInput(f"{FIELD_ENV['port']} must be an integer, got {port!r}") from None
        return cls(
            host=pick("host", parts.hostname, DEFAULTS["host"]),
            port=port,
            user=pick(
                "user", unquote(parts.username) if parts.username else None, DEFAULTS["user"]
            ),
            password=pick(
                "password",
                unquote(parts.password) if parts.password is not None else None,
                _password_file(env) or DEFAULTS["password"],
            ),
            database=pick("database", unquote(parts.path.strip("/")) or None, DEFAULTS["database"]),
            secure=parts.scheme == "clickhouses",
            options=_options(parts.query),
        )


def _password_file(env: Mapping[str, str]) -> str | None:
    """The password in the file CLICKHOUSE_PASSWORD_FILE names (trailing newline dropped)."""
    path = env.get(PASSWORD_FILE_ENV)
    if not path:
        return None
    try:
        with open(path) as f:
            return f.read().rstrip("\r\n")
    except OSError as exc:
        raise InvalidInput(f"cannot read {PASSWORD_FILE_ENV}={path!r}: {exc.strerror}") from None


def _options(query: str) -> StoreOptions:
    values: dict[str, Any] = {}  # int fields, and the text ones named in _TEXT_OPTIONS
    for key, raw in parse_qsl(query, keep_blank_values=True):
        if key not in _OPTIONS:
            raise InvalidInput(
                f"unknown ClickHouse store option {key!r}; known: {sorted(_OPTIONS)}"
            )
        if key in _TEXT_OPTIONS:  # checked where they are used (cluster.py)
            values[key] = raw
            continue
        try:
            number = int(raw)
        except ValueError:
            raise InvalidInput(f"store option {key} must be an integer, got {raw!r}") from None
        if number < 0:
            raise InvalidInput(f"store option {key} must be >= 0, got {raw!r}")
        values[key] = number
    return StoreOptions(**values)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


@dataclass(frozen=True)
class Capabilities:
    """What the connected server's DDL may use; derived from `SELECT version()` only."""

    version: tuple[int, int]
    low_cardinality: bool  # LowCardinality(String) without the experimental setting
    ttl: bool  # table TTL expressions
    codecs: bool  # per-column CODEC(...) incl. DoubleDelta and Gorilla

    @classmethod
    def for_version(cls, version: str) -> Capabilities:
        m = re.match(r"^\s*(\d+)\.(\d+)", version or "")
        if not m:
            raise InvalidInput(f"cannot parse ClickHouse server version {version!r}")
        v = (int(m.group(1)), int(m.group(2)))
        return cls(version=v, low_cardinality=v >= (19, 3), ttl=v >= (19, 6), codecs=v >= (19, 10))
