"""One rank of M metrics end to end: registered in packed schema parts, streamed through a real
`python -m collector serve` into Parquet, read back exactly; how long each part took and how
much the collector grew.

    python -m benchmarks.wide_rank [--metrics 10000000] [--steps 2] [--dir DIR]

The names come as numpy columns (`SpecColumns.from_arrays`: no MetricSpec object per metric),
as a rank of that width would declare them. Timed: registration and streaming until close
returns (every step acknowledged, durable), then the read-back: the dictionary (every name,
layer and op), every step's full vector, and one metric's series. tests/integration/
test_wide_rank.py runs it at 1 M.

Last line: `wide_rank M=<metrics> steps=<S> parts=<schema parts> send_s=<register + stream +
close> collector_grew_mib=<RSS growth> collector_peak_mib=<VmHWM> read_s=<read-back>`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from collector.process import start_collector, stop_collector
from hooks import frames, schemas
from hooks.buffer import StepItem
from hooks.config import MonitorConfig
from hooks.sender import Sender
from store import open_store

RUN = "wide"
OPS = ("sum", "mean", "max", "min")
PER_LAYER = 4096


class _Ready:
    """Stands in for hooks.stats.HostVector: the step's values, already on the host."""

    def __init__(self, v: np.ndarray) -> None:
        self._v = v

    def materialize(self) -> np.ndarray:
        return self._v


def _status_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def names_of(m: int) -> list[str]:
    return [f"wide/layer{i // PER_LAYER:04d}/m{i % PER_LAYER:04d}/v" for i in range(m)]


def run(m: int, steps: int, root: Path) -> dict:
    """Streams and reads back; raises AssertionError when anything read back differs."""
    names = names_of(m)
    layer = np.arange(m, dtype=np.int32) // PER_LAYER
    reduce = list(OPS) * (m // len(OPS)) + list(OPS[: m % len(OPS)])
    cols = schemas.SpecColumns.from_arrays(names, reduce, "v", layer=layer, unit="s")
    rng = np.random.default_rng(5)
    values = [rng.standard_normal(m).astype(np.float32) for _ in range(steps)]
    url = f"parquet:{root / 'store'}"
    proc, address = start_collector(url, "--insecure", log_path=root / "collector.log")
    try:
        base = _status_mib(proc.pid, "VmRSS")
        cfg = MonitorConfig(full_policy="block", net_timeout_s=120.0, close_timeout_s=1800.0)
        t0 = time.perf_counter()
        sender = Sender(address, frames.Identity(RUN, 0, 1), [(1, cols)], cfg, run_config={})
        for s in range(steps):
            sender.submit(StepItem(s, _Ready(values[s]), [(1, m)], wall_time=1e9 + s))
        closed = sender.close(1800.0)
        send_s = time.perf_counter() - t0
        stats = sender.stats()
        grown = _status_mib(proc.pid, "VmRSS") - base
        peak = _status_mib(proc.pid, "VmHWM")
        packed = all(f.schema.HasField("packed") for f in sender._schema_frames or [])
        parts = len(sender._schemas)
    finally:
        stopped = stop_collector(proc, timeout_s=600)
    assert closed and stopped == 0, (closed, stopped)
    assert stats["lost_at_close"] == 0 and stats["buffered_steps"] == 0, stats
    t0 = time.perf_counter()
    with open_store(url) as store:
        d = store.metrics(RUN)
        assert d.height == m
        assert d["metric_id"].to_list() == list(range(m))  # one rank: ids in schema order
        assert d["name"].to_list() == names
        np.testing.assert_array_equal(d["layer"].to_numpy(), layer)
        assert d["reduce"].to_list()[:8] == (list(OPS) * 2)[: min(m, 8)]
        assert set(d["unit"].unique()) == {"s"}
        for s in range(steps):
            at = store.at_step(RUN, s)
            np.testing.assert_array_equal(at["metric_id"].to_numpy(), np.arange(m))
            np.testing.assert_array_equal(at["value"].to_numpy(), values[s])
        far = names[m - 3]
        raw = store.series(RUN, far, rank=0)
        assert raw["step"].to_list() == list(range(steps))
        np.testing.assert_array_equal(raw["value"].to_numpy(), [v[m - 3] for v in values])
    return {
        "metrics": m,
        "steps": steps,
        "parts": parts,
        "packed": packed,
        "send_s": send_s,
        "collector_grew_mib": grown,
        "collector_peak_mib": peak,
        "read_s": time.perf_counter() - t0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics", type=int, default=10_000_000)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None, help="store here (default: a temp dir)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        r = run(a.metrics, a.steps, Path(tmp))
    print(
        f"wide_rank M={r['metrics']} steps={r['steps']} parts={r['parts']} "
        f"send_s={r['send_s']:.1f} collector_grew_mib={r['collector_grew_mib']:.0f} "
        f"collector_peak_mib={r['collector_peak_mib']:.0f} read_s={r['read_s']:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
