"""`make demo`'s script, shortened: collector + monitored training + summary of what was stored."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_script_reports_what_was_stored(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "scripts/demo.py",
            "--preset",
            "tiny",
            "--steps",
            "3",
            "--store-dir",
            str(tmp_path / "store"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert f"[demo] data: {tmp_path / 'store'}" in text
    m = re.search(r"\[demo\] (\d+) metrics stored per step \(\+(\d+) parameter norms", text)
    assert m, text
    assert int(m.group(1)) > 200 and int(m.group(2)) > 0
    assert "3 steps" in text
    assert re.search(r"\[demo\] \d+ detector events, \d+ clip updates", text), text
    report = tmp_path / "demo-report.html"
    assert report.exists() and report.with_suffix(".json").exists()
    assert "<svg" in report.read_text()
    # the store it names really holds the run
    series = subprocess.run(
        [
            sys.executable,
            "-m",
            "store",
            "series",
            "--store",
            f"parquet:{tmp_path / 'store'}",
            "--run",
            "demo",
            "--metric",
            "train/loss",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    assert series[0] == "step,value" and len(series) == 4
