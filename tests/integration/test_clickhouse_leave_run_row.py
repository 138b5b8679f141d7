"""BufferedStore.leave_run_row on ClickHouse (several writers of one run are allowed there,
unlike Parquet's one writer per run): a collector tier's collector adds rows to a run but
never rewrites the run's row, so the coordinator's status stands whatever the order."""

from __future__ import annotations

import numpy as np
import pytest

from store import MetricDict, NotFound, RunInfo, ValueBatch, open_store


def raw(step: int) -> ValueBatch:
    return ValueBatch(
        step=np.array([step], np.int64),
        metric_id=np.array([0], np.int32),
        value=np.array([1.5], np.float32),
        rank=np.array([1], np.int32),
    )


@pytest.mark.parametrize("leave", [True, False])
def test_a_writer_that_left_the_run_row_never_rewrites_it(clickhouse_url, leave):
    owner, other = open_store(clickhouse_url), open_store(clickhouse_url)
    try:
        owner.open_run(RunInfo("r", world_size=2))
        one = np.zeros(1, np.int32)
        owner.write_metrics(
            "r", MetricDict(one, ["m"], one - 1, one - 1, one - 1, [""], [""], ["sum"])
        )
        owner.flush()
        if leave:
            other.leave_run_row("r")
        other.write_raw("r", raw(0))  # the other writer holds the run's row from here
        owner.finish_run("r")
        owner.flush()
        for step in range(1, 3):  # its rows come after the owner's finish
            other.write_raw("r", raw(step))
            other.flush()
        with open_store(clickhouse_url) as st:
            status = st.runs().filter(run="r")["status"].to_list()
            assert st.series("r", "m", rank=1)["step"].to_list() == [0, 1, 2]
        # without leave_run_row the other writer's stale row ("live") wins: the bug it fixes
        assert status == (["finished"] if leave else ["live"])
    finally:
        owner.close()
        other.close()


def test_leaving_a_run_that_was_never_opened_is_not_found(clickhouse_url):
    with open_store(clickhouse_url) as st, pytest.raises(NotFound):
        st.leave_run_row("nope")
