"""A rank of a million metrics end to end: registered in packed schema parts, streamed through a
real `python -m collector serve` into Parquet, read back exactly. Before the columnar path this
took ~50 s of registration (a protobuf per metric on both sides, the whole dictionary rewritten
per flush); here it is seconds, so it runs with the fast suite."""

from __future__ import annotations

import time

import numpy as np
import pytest

from collector.process import start_collector, stop_collector
from hooks import frames, schemas
from hooks.buffer import StepItem
from hooks.config import MonitorConfig
from hooks.sender import Sender
from store import open_store

M = 1_000_000
STEPS = 2
RUN = "wide"
OPS = ("sum", "mean", "max", "min")

pytestmark = pytest.mark.timeout(600)


class _Ready:
    """Stands in for hooks.stats.HostVector: the step's values, already on the host."""

    def __init__(self, v: np.ndarray) -> None:
        self._v = v

    def materialize(self) -> np.ndarray:
        return self._v


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_million_metrics_on_one_rank_register_stream_and_read_back_exactly(tmp_path):
    names = [f"wide/layer{i // 4096:03d}/m{i % 4096:04d}/v" for i in range(M)]
    layer = np.arange(M, dtype=np.int32) // 4096
    reduce = [OPS[i % 4] for i in range(4)] * (M // 4)
    cols = schemas.SpecColumns.from_arrays(names, reduce, "v", layer=layer, unit="s")
    rng = np.random.default_rng(5)
    values = [rng.standard_normal(M).astype(np.float32) for _ in range(STEPS)]
    url = f"parquet:{tmp_path / 'store'}"
    proc, address = start_collector(url, "--insecure", log_path=tmp_path / "collector.log")
    try:
        base = _rss(proc.pid)
        cfg = MonitorConfig(full_policy="block", net_timeout_s=120.0, close_timeout_s=300.0)
        t0 = time.perf_counter()
        sender = Sender(address, frames.Identity(RUN, 0, 1), [(1, cols)], cfg, run_config={})
        for s in range(STEPS):
            sender.submit(StepItem(s, _Ready(values[s]), [(1, M)], wall_time=1e9 + s))
        assert sender.close(300.0)
        elapsed = time.perf_counter() - t0
        stats = sender.stats()
        grown = _rss(proc.pid) - base
        parts = sender._schemas
        assert all(f.schema.HasField("packed") for f in sender._schema_frames or [])
    finally:
        assert stop_collector(proc, timeout_s=300) == 0
    assert len(parts) > 40  # really cut into parts under the message limit
    assert stats["lost_at_close"] == 0 and stats["buffered_steps"] == 0
    print(
        f"{M} metrics x {STEPS} steps durable in {elapsed:.1f} s; collector grew {grown >> 20} MiB"
    )
    with open_store(url) as store:
        d = store.metrics(RUN)
        assert d.height == M
        assert d["metric_id"].to_list() == list(range(M))  # one rank: ids in schema order
        assert d["name"].to_list() == names
        np.testing.assert_array_equal(d["layer"].to_numpy(), layer)
        assert d["reduce"].to_list()[:8] == list(OPS) * 2 and set(d["unit"].unique()) == {"s"}
        for s in range(STEPS):
            at = store.at_step(RUN, s)
            np.testing.assert_array_equal(at["metric_id"].to_numpy(), np.arange(M))
            np.testing.assert_array_equal(at["value"].to_numpy(), values[s])
        far = names[M - 3]
        raw = store.series(RUN, far, rank=0)
        assert raw["step"].to_list() == list(range(STEPS))
        np.testing.assert_array_equal(raw["value"].to_numpy(), [v[M - 3] for v in values])
