"""benchmarks/frame_cost.py at a tiny size: every step leaves the barrier (it exits non-zero
otherwise) and the last line carries both per-frame figures and their ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAST = re.compile(r"^frame_us=([\d.]+) parse_us=([\d.]+) ratio=([\d.]+)$")


def test_frame_cost_smoke():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.frame_cost", "--ranks", "16", "--metrics", "50"]
        + ["--steps", "5", "--stagger", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert "80 frames, 5 steps reduced" in lines[0]
    m = LAST.match(lines[-1])
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0
