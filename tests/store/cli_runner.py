"""Run `python -m store ...` as a user does (a subprocess from the repository root) and parse
its CSV output; shared by the CLI test modules."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "store", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def csv(proc: subprocess.CompletedProcess, *, as_text: bool = False) -> pl.DataFrame:
    """The command's CSV; as_text keeps every column a string (exact text checks)."""
    assert proc.returncode == 0, proc.stderr
    return pl.read_csv(io.StringIO(proc.stdout), infer_schema_length=0 if as_text else 100)
