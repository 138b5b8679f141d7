"""The one place that knows which backends exist: every contract test runs on each of them.

A backend enters the suite as a `Backend`: a URL plus capability flags. Tests never branch on
the backend's name, only on capabilities (`shared`, `litter`), so the ClickHouse issue adds a
param here and nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from store import Store, open_store


@dataclass
class Backend:
    name: str
    url: str
    shared: bool
    """A second open_store(url), in this process or another, sees this store's flushed data."""
    litter: Callable[[str], None] | None = None
    """Leave behind what a writer killed mid-flush of `run` would (half-written temp files)."""

    def open(self) -> Store:
        return open_store(self.url)


def _parquet_litter(root: str) -> Callable[[str], None]:
    def litter(run: str) -> None:
        junk = b"PAR1 truncated by a crash"
        for sub in ("", "raw", "reduced", "steps"):
            d = os.path.join(root, run, sub)
            os.makedirs(d, exist_ok=True)
            # Named the way the writer names its temp files, and also plain names ending .tmp.
            for name in (
                ".000000009999-000000009999.L0.s0-99.n5.parquet.abc123.tmp",
                "run.parquet.tmp",
                "x.tmp",
            ):
                with open(os.path.join(d, name), "wb") as f:
                    f.write(junk)

    return litter


@pytest.fixture(params=["memory", "parquet", "clickhouse", "clickhouse-cluster"])
def store_factory(request, tmp_path) -> Backend:
    if request.param == "memory":
        return Backend("memory", "memory:", shared=False)
    if request.param == "clickhouse":  # tests/conftest.py: one real server per session,
        url = request.getfixturevalue("clickhouse_url")  # a fresh database per test
        return Backend("clickhouse", url, shared=True)
    if request.param == "clickhouse-cluster":  # two servers, one shard each, per session
        url = request.getfixturevalue("clickhouse_cluster_url")  # a fresh database per test
        return Backend("clickhouse-cluster", url, shared=True)
    root = str(tmp_path / "pq")
    return Backend("parquet", f"parquet:{root}", shared=True, litter=_parquet_litter(root))


@pytest.fixture
def store(store_factory) -> Iterator[Store]:
    st = store_factory.open()
    yield st
    st.close()
