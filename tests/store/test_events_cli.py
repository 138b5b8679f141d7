"""`python -m store events|clips` as a user runs them: a subprocess on a Parquet store, CSV back."""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np
import pytest

from store import ClipRecord, EventRecord, MetricDict, RunInfo, open_store
from tests.store.cli_runner import cli
from tests.store.cli_runner import csv as read_csv

csv = partial(read_csv, as_text=True)  # every column as the text the CLI printed


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> str:
    url = f"parquet:{tmp_path_factory.mktemp('events-cli')}/store"
    with open_store(url) as st:
        st.open_run(RunInfo("run-a", 1, "{}", 100.0))
        st.write_metrics(
            "run-a",
            MetricDict(
                np.array([0]),
                ["train/loss"],
                np.array([-1]),
                np.array([-1]),
                np.array([-1]),
                ["loss"],
                [""],
                ["mean"],
            ),
        )
        st.write_events(
            "run-a",
            [
                EventRecord(
                    12,
                    "blowup",
                    "moe/layer04/expert003",
                    9.5,
                    4.0,
                    "warning",
                    10,
                    json.dumps({"layer": 4, "expert": 3, "note": 'a, "quoted" text'}),
                ),
                EventRecord(3, "nonfinite", "resid/layer02/rms", math.nan, 0.0, "critical", 3),
            ],
        )
        st.write_clips(
            "run-a",
            [
                ClipRecord(1, 12, 4, "routed", 1.5, "blowup@12", 14),
                ClipRecord(2, 60, 4, "routed", math.inf, "relax", -1),
            ],
        )
    return url


def test_events_csv(url):
    ev = csv(cli("events", "--store", url, "--run", "run-a"))
    assert ev.columns == [
        "step",
        "kind",
        "site",
        "value",
        "threshold",
        "severity",
        "onset_step",
        "detail",
    ]
    assert ev.select("step", "kind", "site", "onset_step").rows() == [
        ("3", "nonfinite", "resid/layer02/rms", "3"),
        ("12", "blowup", "moe/layer04/expert003", "10"),
    ]
    assert ev["value"][0] == "NaN"
    assert json.loads(ev["detail"][1])["note"] == 'a, "quoted" text'  # CSV quoting survives


def test_clips_csv(url):
    cl = csv(cli("clips", "--store", url, "--run", "run-a"))
    assert cl.columns == ["version", "step", "layer", "site", "limit", "reason", "acked_step"]
    assert cl.rows() == [
        ("1", "12", "4", "routed", "1.5", "blowup@12", "14"),
        ("2", "60", "4", "routed", "inf", "relax", "-1"),
    ]


def test_unknown_run_exits_2(url):
    for command in ("events", "clips"):
        proc = cli(command, "--store", url, "--run", "nope")
        assert proc.returncode == 2 and "no run named 'nope'" in proc.stderr
