"""Store URL and environment resolution for the ClickHouse backend (no server needed)."""

from __future__ import annotations

import pytest

from store.base import InvalidInput
from store.clickhouse.config import ClickHouseConfig, StoreOptions


def test_full_url_wins_over_environment():
    env = {"CLICKHOUSE_HOST": "envhost", "CLICKHOUSE_PASSWORD": "envpw", "CLICKHOUSE_DB": "envdb"}
    c = ClickHouseConfig.from_url("clickhouse://alice:s%40cret%3A1@db.example:9440/metrics_1", env)
    assert (c.host, c.port, c.user, c.password, c.database) == (
        "db.example",
        9440,
        "alice",
        "s@cret:1",
        "metrics_1",
    )
    assert not c.secure and c.options == StoreOptions()


def test_missing_fields_come_from_environment_then_defaults():
    env = {"CLICKHOUSE_PORT": "19001", "CLICKHOUSE_USER": "bob", "CLICKHOUSE_PASSWORD": "pw"}
    c = ClickHouseConfig.from_url("clickhouse://clickhouse/stepwatch", env)
    assert (c.host, c.port, c.user, c.password, c.database) == (
        "clickhouse",
        19001,
        "bob",
        "pw",
        "stepwatch",
    )
    d = ClickHouseConfig.from_url("clickhouse://", {})
    assert (d.host, d.port, d.user, d.password, d.database) == (
        "localhost",
        9000,
        "default",
        "",
        "stepwatch",
    )


def test_bare_url_uses_stepwatch_clickhouse_url():
    env = {
        "STEPWATCH_CLICKHOUSE_URL": "clickhouses://u:p@h:9440/d?raw_ttl_days=14",
        "CLICKHOUSE_HOST": "ignored",
    }
    for bare in ("clickhouse:", "clickhouse://", None):
        c = ClickHouseConfig.from_url(bare, env)
        assert (c.host, c.port, c.user, c.password, c.database, c.secure) == (
            "h",
            9440,
            "u",
            "p",
            "d",
            True,
        )
        assert c.options.raw_ttl_days == 14


def test_password_never_shown():
    c = ClickHouseConfig.from_url("clickhouse://u:topsecret@h:1/d", {})
    assert "topsecret" not in repr(c) and "topsecret" not in c.display_url
    with pytest.raises(InvalidInput) as e:
        ClickHouseConfig.from_url("postgres://u:topsecret@h/d", {})
    assert "topsecret" not in str(e.value)


@pytest.mark.parametrize(
    "url, match",
    [
        ("clickhouse://h/bad-db", "identifier"),
        ("clickhouse://h/a;DROP", "identifier"),
        ("clickhouse://h:notaport/d", "port"),
        ("clickhouse://h:0/d", "port"),
        ("clickhouse://h/d?nope=1", "unknown ClickHouse store option"),
        ("clickhouse://h/d?raw_ttl_days=x", "integer"),
        ("clickhouse://h/d?raw_ttl_days=-1", ">= 0"),
        ("http://h/d", "not a ClickHouse URL"),
    ],
)
def test_bad_urls_are_clear_errors(url, match):
    with pytest.raises(InvalidInput, match=match):
        ClickHouseConfig.from_url(url, {})


def test_bad_port_in_environment():
    with pytest.raises(InvalidInput, match="CLICKHOUSE_PORT"):
        ClickHouseConfig.from_url("clickhouse://h/d", {"CLICKHOUSE_PORT": "x"})
