"""`python -m benchmarks.peers` at a tiny size (M=1,000, 3 steps, 1 repeat), every system.

What it proves: each system really ran and stored the workload (the benchmark's own read-back
says "yes" for every row, and it is checked again here for stepwatch through the store API,
for one run kept on disk), the table and the documented last line come out, the JSON has a rate
for every system, and a system that cannot run is a table row with its reason, not a crash.
No wall-clock assertion. Needs the `bench` extra (`make bench-peers` installs it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("wandb", reason="the bench extra is not installed (pip install -e '.[bench]')")
pytest.importorskip("tensorboard", reason="the bench extra is not installed")
pytest.importorskip("psutil", reason="the bench extra is not installed")

from benchmarks.peers_run import RUN, base_values, metric_names, step_values
from store import open_store

ROOT = Path(__file__).resolve().parents[2]
M, STEPS = 1000, 3
LAST_LINE = re.compile(
    r"^peers M=1000 stepwatch=(\d+) fastest_peer=(wandb|tensorboard):(\d+) "
    r"ratio=([\d.e+-]+) floor_ratio=([\d.e+-]+)$"
)


def bench(tmp_path: Path, *extra: str) -> tuple[str, dict]:
    js = tmp_path / "peers.json"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--metrics", str(M), "--steps", str(STEPS),
         "--repeats", "1", "--out", str(tmp_path / "PEERS.md"), "--json", str(js), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout, json.loads(js.read_text())


@pytest.mark.slow
def test_peers_smoke(tmp_path):
    stdout, result = bench(tmp_path)
    lines = stdout.strip().splitlines()
    m = LAST_LINE.match(lines[-1])
    assert m, lines[-1]
    sw, peer = int(m.group(1)), int(m.group(3))
    assert sw > 0 and peer > 0
    assert float(m.group(4)) == pytest.approx(sw / peer, rel=1e-3)
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"stepwatch", "wandb", "tensorboard", "np.save"}
    for name, r in rows.items():
        assert r["verified"] == "yes", (name, r)
        assert r["metrics_per_s"] > 0 and r["bytes_per_value"] > 0 and r["peak_rss_mib"] > 0
    # every value was read back: stepwatch raw + reduced, the others once
    runs = {r["system"]: r for r in result["runs"]}
    assert runs["stepwatch"]["raw"] == runs["stepwatch"]["reduced"] == M * STEPS
    for name in ("wandb", "tensorboard", "np.save"):
        assert runs[name]["values"] == M * STEPS
    table = [ln for ln in lines if ln.startswith(f"| {M:,} |")]
    assert len(table) == 4 and all(ln.rstrip().endswith("| yes |") for ln in table)
    assert (tmp_path / "PEERS.md").read_text().strip().splitlines()[-1] == lines[-1]


def test_peers_stepwatch_run_stores_the_workload(tmp_path):
    """The stepwatch runner alone, its store kept: every step's raw vector and reduced values
    are exactly what was logged, read through the store API (independently of peers_check)."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers_run", "stepwatch", str(M), str(STEPS),
         str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert "error" not in r, r
    assert r["sender"]["steps_sent"] == STEPS and r["collector_exit"] == 0
    names, base = metric_names(M), base_values(M)
    assert len(set(names)) == M
    with open_store(f"parquet:{tmp_path / 'store'}") as st:
        assert st.steps(RUN)["complete"].to_list() == [True] * STEPS
        for s in range(STEPS):
            for rank in (0, None):
                got = st.at_step(RUN, s, rank=rank)
                assert got["name"].to_list() == names  # metric ids follow schema order
                np.testing.assert_array_equal(got["value"].to_numpy(), step_values(base, s))


def test_peers_reports_failed_runs_and_goes_on(tmp_path):
    """Runs that fail (here: killed at a 1 s timeout, before they could log) are rows saying
    why, with their whole process tree gone; the benchmark finishes, the last line says so."""
    stdout, result = bench(tmp_path, "--systems", "stepwatch,wandb", "--timeout", "1")
    for r in result["rows"]:
        assert r["metrics_per_s"] is None
        assert r["verified"].startswith("failed: timed out after 1 s"), r
    assert stdout.strip().splitlines()[-1] == (
        "peers M=1000 stepwatch=failed fastest_peer=none:n/a ratio=n/a floor_ratio=n/a"
    )
