"""A client or Parquet-only install has no clickhouse-driver: only opening a ClickHouse store
may need it (DESIGN.md: optional backends are extras, imported lazily)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WITHOUT_DRIVER = """
import sys
sys.modules["clickhouse_driver"] = None  # any import of it now raises ImportError

import store.clickhouse
import store.clickhouse.config
import store.clickhouse.schema
from store import open_store

with open_store("parquet:" + sys.argv[1]) as s:
    assert s.runs().height == 0
try:
    open_store("clickhouse://127.0.0.1:9/db")
except ImportError as e:
    print("ImportError:", e)
"""


def test_only_opening_a_clickhouse_store_imports_the_driver(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_DRIVER, str(tmp_path / "pq")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ImportError:"), out.stdout
    assert "clickhouse_driver" in out.stdout
