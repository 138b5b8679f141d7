"""Where the ClickHouse store connects: a URL, with environment variables as fallbacks.

    clickhouse://USER:PASSWORD@HOST:PORT/DATABASE?raw_ttl_days=30    (clickhouses:// = TLS)

Resolution, field by field: what the URL says; else the environment (CLICKHOUSE_HOST, _PORT,
_USER, _PASSWORD, _DB); else the defaults below. A bare "clickhouse:" or "clickhouse://" first
tries STEPWATCH_CLICKHOUSE_URL. So a deployment can keep the password out of command lines
(docker-compose passes CLICKHOUSE_PASSWORD) while the URL names host and database.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from urllib.parse import parse_qsl, unquote, urlsplit

from store.base import InvalidInput
from store.clickhouse_schema import StoreOptions, check_identifier

URL_ENV = "STEPWATCH_CLICKHOUSE_URL"
DEFAULTS = {
    "host": "localhost",
    "port": 9000,
    "user": "default",
    "password": "",
    "database": "stepwatch",
}
FIELD_ENV = {
    "host": "CLICKHOUSE_HOST",
    "port": "CLICKHOUSE_PORT",
    "user": "CLICKHOUSE_USER",
    "password": "CLICKHOUSE_PASSWORD",
    "database": "CLICKHOUSE_DB",
}
_OPTIONS = {f.name for f in fields(StoreOptions)}


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
        given = {
            "host": parts.hostname,
            "port": url_port,
            "user": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else None,
            "database": unquote(parts.path.strip("/")) or None,
        }
        resolved = {}
        for key, value in given.items():
            if value is None:
                value = env.get(FIELD_ENV[key]) or DEFAULTS[key]
            resolved[key] = value
        try:
            resolved["port"] = int(resolved["port"])
        except ValueError:
            raise InvalidInput(
                f"{FIELD_ENV['port']} must be an integer, got {resolved['port']!r}"
            ) from None
        return cls(**resolved, secure=parts.scheme == "clickhouses", options=_options(parts.query))


def _options(query: str) -> StoreOptions:
    values = {}
    for key, raw in parse_qsl(query, keep_blank_values=True):
        if key not in _OPTIONS:
            raise InvalidInput(
                f"unknown ClickHouse store option {key!r}; known: {sorted(_OPTIONS)}"
            )
        try:
            values[key] = int(raw)
        except ValueError:
            raise InvalidInput(f"store option {key} must be an integer, got {raw!r}") from None
        if values[key] < 0:
            raise InvalidInput(f"store option {key} must be >= 0, got {raw!r}")
    return StoreOptions(**values)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)
