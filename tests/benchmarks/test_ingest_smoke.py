"""`python -m benchmarks.ingest` at a tiny size, end to end, against Parquet and a real ClickHouse.

What it proves: the benchmark runs the real pipeline (load-generator processes with the hooks
Sender, a collector process, the store), its last line has the documented format, and the store
holds exactly the rows the workload implies - checked here independently of the benchmark's own
count, through the store API and (ClickHouse) a second client. No wall-clock assertion.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.workload import Values, Workload
from store import open_store
from store.clickhouse.schema import raw_cells_sql

ROOT = Path(__file__).resolve().parents[2]
LAST_LINE = re.compile(r"^metrics/s=(\d+(?:\.\d+)?) ratio_to_raw=(\d+(?:\.\d+)?)$")
TOTAL, RANKS, STEPS = 600, 4, 4  # 150 metrics per rank, 4 ranks in 2 processes
RUN = "bench-ingest"


def run_bench(url: str, steps: int = STEPS, *extra: str) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.ingest",
            "--store",
            url,
            "--metrics-per-step",
            str(TOTAL),
            "--ranks",
            str(RANKS),
            "--steps",
            str(steps),
            "--warmup",
            "1",
            "--flush-interval",
            "0.05",
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def check_output(stdout: str) -> Workload:
    lines = stdout.strip().splitlines()
    m = LAST_LINE.match(lines[-1])
    assert m, lines[-1]
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0
    w = Workload.for_total(TOTAL, RANKS)
    assert w.values_per_rank * RANKS <= TOTAL
    assert f"stored raw={STEPS * RANKS * w.values_per_rank} " in stdout
    return w


def check_store(url: str, w: Workload) -> None:
    """Exact rows through the store API: every step complete, rank 2's raw vector of step 3
    equals what the workload generated, and a 'sum' metric reduced over its EP group."""
    with open_store(url) as st:
        steps = st.steps(RUN)
        assert steps["step"].to_list() == list(range(STEPS))
        assert steps["complete"].all() and (steps["n_ranks"] == RANKS).all()
        d = st.metrics(RUN)
        assert d.height == w.distinct_metrics()
        raw = st.at_step(RUN, 3, rank=2)
        assert raw.height == w.values_per_rank
        by_name = dict(zip(raw["name"], raw["value"]))
        expected = Values(w).step(2, 3)
        got = np.array([by_name[s.name] for s in w.specs(2)], dtype=np.float32)
        np.testing.assert_array_equal(got, expected)
        tokens = st.series(RUN, "train/tokens")  # sum over every rank
        want = sum(Values(w).step(r, 0)[len(w.common) - 2] for r in range(RANKS))
        assert tokens.height == STEPS
        assert tokens["value"][0] == pytest.approx(want, rel=1e-6)


def test_ingest_smoke_parquet(tmp_path):
    url = f"parquet:{tmp_path / 'store'}"
    w = check_output(run_bench(url))
    check_store(url, w)


def test_ingest_smoke_clickhouse(clickhouse_server, clickhouse_url):
    w = check_output(run_bench(clickhouse_url))
    check_store(clickhouse_url, w)
    db = clickhouse_url.rsplit("/", 1)[1]
    raw = clickhouse_server.client(
        f"SELECT count() FROM (SELECT rank, step, metric_id FROM ({raw_cells_sql(db)}) "
        f"GROUP BY rank, step, metric_id)"
    )
    assert int(raw) == STEPS * RANKS * w.values_per_rank
    leftovers = clickhouse_server.client(
        f"SELECT count() FROM system.databases WHERE name LIKE '{db}_ceiling%'"
    )
    assert int(leftovers) == 0  # the ceiling cleans up after itself


def test_ingest_reports_spike_to_clip_latency(tmp_path):
    """From 16 steps on, the workload's x40 max|h| spike (step 12, rank 0's first expert) must
    come back as a clip update to the load generator, and the report says how fast."""
    out = run_bench(f"parquet:{tmp_path / 'store'}", 18, "--no-flat")
    line = next((ln for ln in out.splitlines() if "spike to clip applied" in ln), None)
    assert line is not None, out[-3000:]
    m = re.search(r"\| (\d+) steps, (\d+) ms \|", line)
    assert m, line
    # the load generator plays as fast as backpressure lets it, up to --depth (8) steps ahead
    # of the acks, so the clip lands within that many steps; a real 1 s step sees 1-2
    assert 1 <= int(m.group(1)) <= 8 + 2
    assert int(m.group(2)) > 0


def test_ingest_through_node_agents_parquet(tmp_path):
    """--agents 2: the 4 ranks stream through two real node agents (benchmarks/agents.py), the
    collector holds 2 multiplexed streams and no rank stream, and the store is exactly as
    direct."""
    url, result = f"parquet:{tmp_path / 'store'}", tmp_path / "r.json"
    w = check_output(run_bench(url, STEPS, "--agents", "2", "--no-flat", "--json", str(result)))
    check_store(url, w)
    r = json.loads(result.read_text())
    assert r["collector_streams"] == {"streams_opened": 0, "mux_streams_opened": 2}
    assert r["agent_stats"]["upstream_connects"] == 2
    assert r["agent_stats"]["local_streams"] == RANKS
