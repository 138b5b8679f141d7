"""Fixtures for the dashboard tests: a store filled by real monitored runs (once per session),
and helpers to drive the app with Streamlit's AppTest and read back what its charts show."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # importlib mode: make `tests.dashboard.*` importable
    sys.path.insert(0, str(ROOT))

from tests.dashboard.runs import DEAD_INJECT, record_tiny_runs  # noqa: E402

APP = str(ROOT / "dashboard" / "app.py")
STEPS = {"tiny-a": 8, "tiny-b": 5}


@dataclass(frozen=True)
class Recorded:
    dir: Path
    url: str

    def copy(self, dest: Path) -> str:
        """A private copy of the store (for tests that add rows); its URL."""
        shutil.copytree(self.dir, dest)
        return f"parquet:{dest}"


@pytest.fixture(scope="session")
def recorded(tmp_path_factory) -> Recorded:
    """Two real runs of the tiny model through a real collector: tiny-a (8 steps, expert 3 of
    layer 4 killed from step 3 by model/'s fault injection), then tiny-b (5 steps, clean)."""
    d = tmp_path_factory.mktemp("dashboard") / "store"
    url = record_tiny_runs(
        d,
        {
            "tiny-a": dict(steps=STEPS["tiny-a"], seed=0, injects=[DEAD_INJECT]),
            "tiny-b": dict(steps=STEPS["tiny-b"], seed=1),
        },
    )
    return Recorded(d, url)


def run_app(url: str, monkeypatch, **state):
    """The app on `url` after its first run; `state` preset into session_state."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("STEPWATCH_STORE", url)
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in state.items():
        at.session_state[k] = v
    return check(at.run())


def check(at):
    """No exception, no error box: the run went through."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


@dataclass
class Chart:
    meta: dict
    spec: dict
    datasets: dict[str, pl.DataFrame]

    def layer(self, i: int = 0) -> pl.DataFrame:
        """The rows the i-th layer draws."""
        source = self.spec["layer"][i].get("data") or self.spec["data"]  # altair hoists a
        return self.datasets[source["name"]]  # lone data source


def charts(at) -> dict[str, Chart]:
    """Every Vega-Lite chart on the page by its usermeta chart id, with its data decoded."""
    out = {}
    for el in at.get("vega_lite_chart"):
        spec = json.loads(el.proto.spec)
        data = {
            d.name: pl.from_arrow(pa.ipc.open_stream(d.data.data).read_all())
            for d in el.proto.datasets
        }
        meta = spec.get("usermeta", {}).get("stepwatch", {})
        out[meta.get("chart")] = Chart(meta, spec, data)
    return out


def texts(at) -> list[str]:
    return [
        e.value
        for kind in ("caption", "markdown", "info", "warning", "subheader")
        for e in getattr(at, kind)
    ]


def table_with(at, column: str):
    """The first st.dataframe on the page that has `column` (pandas, as AppTest gives it)."""
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise KeyError(f"no table with a {column!r} column")
