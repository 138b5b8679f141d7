"""The collector's footprint: a real `python -m collector serve` on a Parquet store that takes a
fresh run (a rank's stream, detection on, the run finished) never loads pyarrow.dataset or the
pandas it pulls in (~50 MiB of RSS); only a read of stored segments does. Checked in the
process's own memory map."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from collector.process import start_collector, stop_collector
from hooks import frames
from hooks.buffer import StepItem
from hooks.config import MonitorConfig
from hooks.layout import STEP_SCHEMA_ID, MetricSpec
from hooks.sender import Sender
from store import open_store

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc maps")

HEAVY = ("pyarrow/_dataset.", "pandas/_libs/")


class Ready:
    def __init__(self, v: np.ndarray) -> None:
        self.v = v

    def materialize(self) -> np.ndarray:
        return self.v


def mapped(pid: int) -> set[str]:
    """Which of HEAVY's libraries the process has mapped."""
    text = Path(f"/proc/{pid}/maps").read_text()
    return {h for h in HEAVY if h in text}


def test_a_fresh_run_never_loads_pyarrow_dataset_or_pandas(tmp_path):
    url = f"parquet:{tmp_path / 'store'}"
    names = [f"moe/layer{l:02d}/expert{e:03d}/act_rms" for l in range(2) for e in range(8)]
    specs = [MetricSpec(n, "mean", "act_rms", i // 8, i % 8) for i, n in enumerate(names)]
    proc, address = start_collector(url, "--insecure", log_path=tmp_path / "collector.log")
    try:
        sender = Sender(
            address, frames.Identity("fresh", 0, 1), [(STEP_SCHEMA_ID, specs)], MonitorConfig()
        )
        for s in range(20):
            v = np.full(len(names), 1.0 + 0.01 * s, np.float32)
            sender.submit(StepItem(s, Ready(v), [(STEP_SCHEMA_ID, v.size)], wall_time=time.time()))
        assert sender.close(60.0)  # every step acknowledged: durable
        assert mapped(proc.pid) == set(), mapped(proc.pid)
    finally:
        assert stop_collector(proc) == 0
    with open_store(url) as store:  # ... and the run reads back (the reader loads them)
        assert store.steps("fresh")["step"].to_list() == list(range(20))
