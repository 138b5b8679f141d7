"""Detection across a collector killed -9 and restarted: a real `python -m collector serve`
(Parquet), one rank streaming a synthetic run with a blow-up (clamped, recovered, then
relaxed 100 steps later) frame by frame. The collector is killed -9 at step 120, between
the clamp and its relaxation and 21 steps after its last saved detector state, and restarted
on the same store. The restarted run's stored events, stored clip rows and the clip updates
the rank received equal those of the same run through one uninterrupted collector: the
restarted collector restored the state of step 99, replayed steps 100-120 from the store
into it, and its relaxation is a version the rank takes (2, not a second 1)."""

from __future__ import annotations

import json

import pytest

from collector.process import start_collector, stop_collector
from store import open_store
from tests.analytics.synthetic import SyntheticRun, blowup
from tests.collector.conftest import RawClient
from tests.collector.test_detect import PARAM_ROWS, STEP_ROWS, defs, stream_steps

pytestmark = pytest.mark.timeout(300)
RUN = "killed"
STEPS, KILL_AT = 200, 120
ARGS = ("--insecure", "--flush-interval", "0.02")


def synthetic() -> SyntheticRun:
    syn = SyntheticRun(seed=3, run=RUN)
    grow = blowup(2, 3, start=40)
    syn.faults.append(lambda step, v: grow(step, v) if step < 55 else None)
    return syn


def connect(address: str, seq: int) -> RawClient:
    c = RawClient(address, RUN, 0, 1, seq=seq)
    c.expect("welcome")
    c.schema(1, defs(STEP_ROWS))
    c.schema(2, defs(PARAM_ROWS))
    c.wait_ack()
    return c


def through(tmp_path, name: str, kill_at: int | None) -> dict:
    url, log = f"parquet:{tmp_path / name}", tmp_path / f"{name}.log"
    syn = synthetic()
    proc, address = start_collector(url, *ARGS, log_path=log)
    received = []
    try:
        c = connect(address, 0)
        stream_steps(c, syn, range(STEPS if kill_at is None else kill_at + 1))
        received += c.clips
        if kill_at is not None:
            proc.kill()  # every step it acked is in the store: nothing is resent
            proc.wait()
            c.channel.close()
            proc, address = start_collector(url, *ARGS, log_path=log)
            c = connect(address, c.seq)
            stream_steps(c, syn, range(kill_at + 1, STEPS))
            received += c.clips
        c.half_close()
        c.wait_end()
        c.channel.close()
    finally:
        assert stop_collector(proc) == 0
    with open_store(url) as st:
        events = [
            (r["step"], r["kind"], r["site"], json.loads(r["detail"]).get("decision"))
            for r in st.events(RUN).iter_rows(named=True)
        ]
        clips = st.clips(RUN).select("version", "step", "layer", "site", "limit").rows()
    return {
        "events": events,
        "clips": clips,
        "received": [
            (u.version, [(s.layer, s.site, s.limit) for s in u.settings]) for u in received
        ],
        "log": log.read_text(),
    }


def test_a_collector_killed_and_restarted_detects_as_one_that_was_not(tmp_path):
    ref = through(tmp_path, "uninterrupted", None)
    got = through(tmp_path, "restarted", KILL_AT)
    limits = [c[4] for c in ref["clips"]]
    assert len(limits) == 2 and limits[0] < float("inf") == limits[1]  # clamped, then relaxed
    assert ref["clips"][0][1] < KILL_AT < ref["clips"][1][1]  # the kill falls in between
    assert got["events"] == ref["events"]
    assert got["clips"] == ref["clips"]
    assert got["received"] == ref["received"]
    assert "detector state restored as of step 99" in got["log"]
    assert "21 stored steps after the restored state replayed (100-120)" in got["log"]
