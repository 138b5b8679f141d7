"""benchmarks/tier.py at a tiny size: both setups run, nothing is dropped, and the last line
carries both rates and their ratio; with --agents every rank's stream goes through an agent in
both setups."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAST = re.compile(r"tier_metrics/s=([\d.]+) single_metrics/s=([\d.]+) ratio=([\d.]+)")


@pytest.mark.parametrize("agents", [0, 2])
def test_tier_smoke(agents):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.tier",
            "--metrics-per-step",
            "20000",
            "--ranks",
            "4",
            "--steps",
            "4",
            "--depth",
            "2",
            "--flush-interval",
            "0.1",
            "--agents",
            str(agents),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    m = LAST.fullmatch(lines[-1])
    assert m, lines[-1]
    tier, single, ratio = map(float, m.groups())
    assert tier > 0 and single > 0 and abs(ratio - tier / single) < 1e-3
    assert "dropped steps 0" in out.stdout
    for name in ("coordinator", "collector0", "collector1"):
        assert f"| {name} |" in out.stdout
    for setup in ("single", "tier"):  # 4 ranks through 2 agents, 1 per tier collector
        assert (f"| {setup} | 2 agents (4 rank streams) |" in out.stdout) == bool(agents)
