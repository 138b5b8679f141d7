"""The client through a collector outage, against real processes: `python -m collector serve`
is SIGTERMed and restarted on the same port while two monitored tiny runs keep training.

  run "ride": the default MonitorConfig. Its buffer covers the outage: every step stored once.
  run "tight": a 4-step buffer, so the outage overflows it. Nothing is lost silently: every
               step is either stored or a hole the store holds (steps_dropped events), each
               exactly once; the drops were logged with counts and are in the
               telemetry/dropped_steps metric.

Both: the reconnect backs off (a handful of connect attempts over dozens of steps, where one
per step was the bug) and never dropped a sent frame.

And a TCP proxy that stops forwarding without closing (tcpproxy.py): the client finds the
silent stream dead within its ack bound (net_timeout_s), reconnects through the proxy once it
flows again, and every step lands once.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from collector.holes import HOLE_KIND
from collector.process import start_collector, stop_collector
from hooks import MonitorConfig
from store import open_store
from tests.integration.monitored import Records, Trainer, free_port, step_counts
from tests.integration.tcpproxy import StallingProxy

pytestmark = pytest.mark.timeout(400)
STEPS = 90
DOWN_AT = 12  # both runs pause at this step until the collector is gone
OUTAGE_STEPS = 45  # steps each run trains while nothing listens


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def outage(tmp_path_factory):
    """Both runs, one outage; returns what the tests check."""
    tmp = tmp_path_factory.mktemp("outage")
    url, port = f"parquet:{tmp / 'store'}", free_port()
    log = tmp / "collector.log"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two trainers and the collector share 2 cores
    args = ("--insecure", "--port", str(port), "--flush-interval", "0.1")
    proc, address = start_collector(url, *args, log_path=log)
    trainers = {
        "ride": Trainer(address, "ride", STEPS, pause_at=DOWN_AT),
        "tight": Trainer(address, "tight", STEPS, MonitorConfig(buffer_steps=4), DOWN_AT),
    }
    with Records("stepwatch.hooks") as records:
        try:
            for t in trainers.values():
                t.start()
            for t in trainers.values():
                assert t.paused.wait(120) and t.error is None, t.error
            wait_for(
                lambda: all(t.stats().get("acked_seq", 0) > 0 for t in trainers.values()),
                60,
                "both runs acknowledged",
            )
            before = {name: t.stats() for name, t in trainers.items()}
            assert stop_collector(proc) == 0  # SIGTERM: flushes, ends streams, exits
            for t in trainers.values():
                t.go.set()
            wait_for(
                lambda: all(t.progress >= DOWN_AT + OUTAGE_STEPS for t in trainers.values()),
                240,
                "steps trained during the outage",
            )
            during = {name: t.stats() for name, t in trainers.items()}
            proc, _ = start_collector(url, *args, log_path=log)  # the same port again
            for t in trainers.values():
                assert t.done.wait(240) and t.error is None, t.error
        finally:
            torch.set_num_threads(threads)
            assert stop_collector(proc) == 0
    with open_store(url) as store:
        stored = {name: step_counts(store, name) for name in trainers}
        events = {name: store.events(name) for name in trainers}
        dropped_metric = {
            name: store.series(name, "telemetry/dropped_steps")["value"].to_list()
            for name in trainers
        }
    return {
        "trainers": trainers,
        "before": before,
        "during": during,
        "stats": {name: t.stats() for name, t in trainers.items()},
        "stored": stored,
        "events": events,
        "dropped_metric": dropped_metric,
        "records": records,
    }


@pytest.mark.parametrize("run", ["ride", "tight"])
def test_reconnect_backs_off_instead_of_one_attempt_per_step(outage, run):
    before, during = outage["before"][run], outage["during"][run]
    attempts = during["connect_attempts"] - before["connect_attempts"]
    # >= 45 steps (several seconds) with nothing listening. Doubling waits from 0.2 s, each
    # [1/2, 1] of nominal, make about log2(outage / 0.1 s) attempts; one per step was the bug
    assert 1 <= attempts <= 12, attempts
    assert during["steps"] - before["steps"] >= OUTAGE_STEPS
    stats = outage["stats"][run]
    assert stats["connects"] == 2 and "fatal_error" not in stats


def test_the_default_buffer_rides_out_a_collector_restart(outage):
    stored, stats = outage["stored"]["ride"], outage["stats"]["ride"]
    missing = sorted(set(range(STEPS)) - set(stored))
    duplicated = sorted(s for s, n in stored.items() if n > 1)
    assert (len(stored), missing, duplicated) == (STEPS, [], [])
    assert stats.get("dropped_steps", 0) == 0 and stats["lost_at_close"] == 0
    assert outage["events"]["ride"].filter(kind=HOLE_KIND).height == 0


def test_an_overflowing_buffer_loses_nothing_silently(outage):
    stored, stats = outage["stored"]["tight"], outage["stats"]["tight"]
    holes = outage["events"]["tight"].filter(kind=HOLE_KIND).sort("step")
    hole_steps: list[int] = []
    for row in holes.iter_rows(named=True):
        detail = json.loads(row["detail"])
        assert (detail["rank"], row["site"]) == (0, "telemetry/rank0")
        assert (detail["first"], detail["last"]) == (row["onset_step"], row["step"])
        assert row["value"] == row["step"] - row["onset_step"] + 1
        hole_steps += range(row["onset_step"], row["step"] + 1)
    dropped = stats["dropped_steps"]
    assert dropped >= OUTAGE_STEPS - 4  # the buffer holds 4; the rest of the outage dropped
    # every (rank, step) exactly once: stored or a hole, never both, never twice
    assert sorted(hole_steps) == sorted(set(hole_steps)) and len(hole_steps) == dropped
    assert set(stored).isdisjoint(hole_steps)
    assert sorted([*stored, *hole_steps]) == list(range(STEPS))
    assert all(n == 1 for n in stored.values())
    assert stats["holes_reported"] == dropped and stats["holes_unreported"] == 0
    # the metric: this rank's drops before each step it sent. After the last stored step's
    # count was taken, later submits could still drop the older steps waiting then (at most
    # the buffer, 4) and every step after it (the run's trailing holes: under load the acks
    # can lag the last steps by more than the buffer, which then drops them as the newest)
    series = outage["dropped_metric"]["tight"]
    trailing = STEPS - 1 - max(stored)
    assert series == sorted(series) and dropped - 4 - trailing <= series[-1] <= dropped
    # and the trainer's log said so, with counts, in a few lines (not one per step): at the
    # first drop, every drop_log_interval_s (10 s), on reconnect, at close
    warnings = outage["records"].messages(logging.WARNING, "run 'tight' rank 0: client buffer")
    assert 1 <= len(warnings) <= 6
    counts = [int(w.split(" in total")[0].rsplit(" ", 1)[1]) for w in warnings]
    assert counts[-1] == dropped


def test_a_stalled_connection_is_found_dead_and_the_run_resumes(tmp_path):
    url = f"parquet:{tmp_path / 'store'}"
    proc, address = start_collector(
        url, "--insecure", "--flush-interval", "0.1", log_path=tmp_path / "collector.log"
    )
    proxy = StallingProxy(address)
    net_timeout = 2.0
    cfg = MonitorConfig(net_timeout_s=net_timeout, backoff_max_s=2.0)
    trainer = Trainer(proxy.target, "stall", 40, cfg, pause_at=10)
    try:
        trainer.start()
        assert trainer.paused.wait(120) and trainer.error is None, trainer.error
        wait_for(lambda: trainer.stats().get("acked_seq", 0) > 0, 60, "the first acks")
        proxy.stall()  # nothing moves; no socket closes
        stalled_at = time.monotonic()
        trainer.go.set()
        wait_for(lambda: trainer.stats().get("stale_streams", 0) >= 1, 60, "a stale stream")
        detected_s = time.monotonic() - stalled_at
        wait_for(lambda: trainer.progress >= 25, 120, "steps while stalled")
        assert trainer.stats()["connects"] == 1  # no stream got through the stalled proxy
        proxy.resume()
        assert trainer.done.wait(120) and trainer.error is None, trainer.error
    finally:
        proxy.close()
        assert stop_collector(proc) == 0
    # the silence was noticed within the ack bound (+ generous slack for a loaded machine)
    assert detected_s <= 3 * (net_timeout + 2.0), detected_s
    stats = trainer.stats()
    assert stats["connects"] >= 2 and stats.get("dropped_steps", 0) == 0
    with open_store(url) as store:
        stored = step_counts(store, "stall")
    assert sorted(stored) == list(range(40)) and set(stored.values()) == {1}
