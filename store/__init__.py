"""stepwatch's columnar store: one contract (base.py), backends chosen by URL.

    open_store("memory:")            private in-memory store (tests)
    open_store("parquet:DIR")        Parquet files under DIR ("parquet:///abs/dir" also works)
    open_store("clickhouse://U:P@HOST:PORT/DB")  ClickHouse (store/clickhouse/config.py: TLS,
                                     and what the environment fills in)
    open_store("clickhouse://U:P@HOST:PORT/DB?cluster=NAME")  a ClickHouse cluster
                                     (store/clickhouse/cluster.py)

Backends are imported inside open_store so nobody pays for one they don't use.
"""

from __future__ import annotations

from store.base import (
    REDUCE_OPS,
    RUN_NAME_RE,
    SEVERITIES,
    ClipRecord,
    EventRecord,
    InvalidInput,
    MetricDict,
    NotFound,
    RawBlock,
    RunInfo,
    StepStatus,
    Store,
    StoreError,
    ValueBatch,
    check_run_name,
)

SUPPORTED_URLS = ("memory:", "parquet:DIR", "clickhouse://USER:PASS@HOST:PORT/DB")

__all__ = [
    "REDUCE_OPS",
    "RUN_NAME_RE",
    "SEVERITIES",
    "ClipRecord",
    "EventRecord",
    "InvalidInput",
    "MetricDict",
    "NotFound",
    "RawBlock",
    "RunInfo",
    "StepStatus",
    "Store",
    "StoreError",
    "ValueBatch",
    "check_run_name",
    "open_store",
    "SUPPORTED_URLS",
]


def open_store(url: str) -> Store:
    """Open the store a URL names; InvalidInput (listing the supported forms) otherwise."""
    if not isinstance(url, str):
        raise InvalidInput(f"store URL must be a string, got {type(url).__name__}")
    scheme, sep, rest = url.partition(":")
    if sep and scheme == "memory" and rest in ("", "//"):
        from store.memory import MemoryStore

        return MemoryStore()
    if sep and scheme in ("clickhouse", "clickhouses"):
        from store.clickhouse import ClickHouseStore  # clickhouse-driver only when asked for

        return ClickHouseStore(url)
    if rest.startswith("///"):  # parquet:///abs/dir -> /abs/dir
        rest = rest[2:]
    if sep and scheme == "parquet" and rest:
        from store.parquet import ParquetStore

        return ParquetStore(rest)
    raise InvalidInput(f"unsupported store URL {url!r}; supported: {', '.join(SUPPORTED_URLS)}")
