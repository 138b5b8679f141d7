"""The same app on a real ClickHouse server (tests/conftest.py's clickhouse_url fixture)."""

from __future__ import annotations

import numpy as np

from store import open_store
from tests.dashboard.conftest import charts, check, run_app
from tests.dashboard.runs import synthetic_dict, write_synthetic_run


def test_replay_on_clickhouse(clickhouse_url, monkeypatch):
    values = write_synthetic_run(
        clickhouse_url, "ch", 300, layers=(1, 2, 3), experts=4, spike=(123, 50.0)
    )
    with open_store(clickhouse_url) as s:
        loss = s.series("ch", "train/loss")
    at = run_app(clickhouse_url, monkeypatch)
    assert charts(at)["loss"].layer(0).select("step", "value").equals(loss)
    check(at.radio(key="hm_view").set_value("activation RMS").run())
    check(at.slider(key="step").set_value(123).run())
    cells = charts(at)["heatmap_step"].layer(0).sort("layer", "expert")
    md = synthetic_dict((1, 2, 3), 4)
    want = [
        values[123, md.name.index(f"moe/layer{r['layer']:02d}/expert{r['expert']:03d}/act_rms")]
        for r in cells.iter_rows(named=True)
    ]
    np.testing.assert_array_equal(
        cells["value"].cast(float).to_numpy(), np.asarray(want, np.float32).astype(float)
    )
    assert charts(at)["loss"].layer(0)["value"].max() == 50.0  # the spike, at step 123
