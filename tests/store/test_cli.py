"""`python -m store ...` as a user runs it: a subprocess on a Parquet store, CSV parsed back."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from store import MetricDict, RunInfo, StepStatus, ValueBatch, open_store
from tests.store.cli_runner import cli, csv


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> str:
    url = f"parquet:{tmp_path_factory.mktemp('cli')}/store"
    with open_store(url) as st:
        st.open_run(RunInfo("run-a", 2, '{"lr": 3e-4}', 100.0))
        st.write_metrics(
            "run-a",
            MetricDict(
                np.array([0, 1]),
                ["loss", "moe/l0/e1/act_rms"],
                np.array([-1, 0]),
                np.array([-1, 1]),
                np.array([-1, -1]),
                ["loss", "act_rms"],
                ["nats", ""],
                ["mean", "max"],
            ),
        )
        steps = np.repeat(np.arange(6), 2)
        mids = np.tile([0, 1], 6)
        st.write_reduced(
            "run-a", ValueBatch(steps, mids, steps * 10.0 + mids, n_ranks=np.full(12, 2))
        )
        st.write_raw(
            "run-a",
            ValueBatch(
                np.arange(6),
                np.ones(6, np.int32),
                np.array([1, 2, np.nan, 4, 5, 6.0]),
                rank=np.ones(6, np.int32),
            ),
        )
        st.write_steps("run-a", [StepStatus(0, 2), StepStatus(1, 1, (0, 1), False, 2.5)])
        st.open_run(RunInfo("run-b", 1, "{}", 50.0))
    return url


def test_runs_and_metrics(url):
    runs = csv(cli("runs", "--store", url))
    assert runs.select("run", "world_size", "last_step", "status").rows() == [
        ("run-b", 1, None, "live"),
        ("run-a", 2, 5, "live"),
    ]
    md = csv(cli("metrics", "--store", url, "--run", "run-a"))
    assert md.select("metric_id", "name", "unit", "reduce").rows() == [
        (0, "loss", "nats", "mean"),
        (1, "moe/l0/e1/act_rms", "", "max"),
    ]


def test_series_reduced_range_and_rank(url):
    s = csv(
        cli(
            "series",
            "--store",
            url,
            "--run",
            "run-a",
            "--metric",
            "moe/l0/e1/act_rms",
            "--start",
            "2",
            "--stop",
            "5",
        )
    )
    assert s.columns == ["step", "value"]
    assert s.rows() == [(2, 21.0), (3, 31.0), (4, 41.0)]
    r = csv(
        cli(
            "series",
            "--store",
            url,
            "--run",
            "run-a",
            "--metric",
            "moe/l0/e1/act_rms",
            "--rank",
            "1",
        )
    )
    assert r["step"].to_list() == list(range(6))
    assert r["value"].is_nan().to_list() == [False, False, True, False, False, False]


def test_steps_and_at_step(url):
    st = csv(cli("steps", "--store", url, "--run", "run-a"))
    assert st.select("step", "n_ranks", "complete", "wall_time").rows() == [
        (0, 2, True, 0.0),
        (1, 1, False, 2.5),
    ]
    assert st["missing_ranks"].cast(pl.Utf8).to_list() == ["", "0;1"]
    snap = csv(
        cli("at-step", "--store", url, "--run", "run-a", "--step", "3", "--pattern", "moe/*")
    )
    assert snap.select("name", "value").rows() == [("moe/l0/e1/act_rms", 31.0)]


@pytest.mark.parametrize(
    "args, needle",
    [
        (("series", "--run", "nope", "--metric", "loss"), "no run named 'nope'"),
        (("series", "--run", "run-a", "--metric", "nope"), "no metric named 'nope'"),
        (("steps", "--run", "bad name"), "must match"),
    ],
)
def test_unknown_or_bad_names_exit_2_without_traceback(url, args, needle):
    proc = cli(args[0], "--store", url, *args[1:])
    assert proc.returncode == 2 and proc.stdout == ""
    assert needle in proc.stderr and "Traceback" not in proc.stderr
