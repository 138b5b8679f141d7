"""benchmarks/tier.py at a tiny size: both setups run, nothing is dropped, and the last line
carries both rates and their ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAST = re.compile(r"tier_metrics/s=([\d.]+) single_metrics/s=([\d.]+) ratio=([\d.]+)")


def test_tier_smoke():
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
