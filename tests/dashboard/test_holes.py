"""Holes a client reported (steps_dropped events, collector/holes.py) are shown above the
replay as missing on purpose, per rank with their step ranges."""

from __future__ import annotations

import json

from store import open_store
from store.base import HOLE_EVENT_KIND, EventRecord
from tests.dashboard.conftest import run_app


def hole(rank: int, first: int, last: int) -> EventRecord:
    detail = {"rank": rank, "first": first, "last": last, "steps": last - first + 1}
    return EventRecord(
        step=last,
        kind=HOLE_EVENT_KIND,
        site=f"telemetry/rank{rank}",
        value=float(last - first + 1),
        threshold=0.0,
        severity="warning",
        onset_step=first,
        detail=json.dumps(detail),
    )


def test_holes_are_named_above_the_replay(recorded, monkeypatch, tmp_path):
    url = recorded.copy(tmp_path / "store")
    with open_store(url) as store:
        store.write_events("tiny-a", [hole(0, 2, 4), hole(0, 6, 6)])
    at = run_app(url, monkeypatch, runs=["tiny-a"])
    (warning,) = [w.value for w in at.warning if "Telemetry holes" in w.value]
    assert "rank0: 4 step(s) never sent (2-4, 6)" in warning
    at = run_app(recorded.url, monkeypatch, runs=["tiny-a"])  # a run without holes: nothing
    assert not [w for w in at.warning if "Telemetry holes" in w.value]
