"""The writer's two threads: detection sees a step while the store is still busy with earlier
ones, and the store still gets every job, in order, with acks only after a flush."""
from __future__ import annotations

import threading

import numpy as np

from collector.barrier import ReadyStep
from collector.reduction import OP_MAX, OP_SUM
from collector.stats import Counters
from collector.writer import OpenRun, Writer, WriteMetrics, WriteStep
from store import MetricDict, RunInfo, open_store
from store.base import StepStatus

RUN = "w"
WAIT_S = 60                   # an upper bound on a busy machine, never an expectation


class GatedStore:
    """The memory store, except that raw writes wait until `gate` is set."""

    def __init__(self) -> None:
        self.inner = open_store("memory:")
        self.gate = threading.Event()
        self.blocked = threading.Event()

    def write_raw_block(self, run, block):
        self.blocked.set()
        assert self.gate.wait(WAIT_S)
        self.inner.write_raw_block(run, block)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Observer:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.seen = threading.Condition()

    def on_metrics(self, run, md) -> None:
        pass

    def on_step(self, run, rows, included, ready_at) -> None:
        with self.seen:
            self.steps.append(rows.status.step)
            self.seen.notify_all()


def step_job(step: int) -> WriteStep:
    ids = np.arange(3, dtype=np.int32)
    parts = [(r, 1, np.array([step, r, 1.0], np.float32), np.ones(3, bool)) for r in (0, 1)]
    ready = ReadyStep(step, parts, {0, 1}, StepStatus(step=step, n_ranks=2), nbytes=0)
    return WriteStep(RUN, ready, [ids, ids], np.array([OP_MAX, OP_SUM, OP_SUM], np.int8))


def test_detection_does_not_wait_for_the_store_and_the_store_gets_everything():
    store, obs, acked = GatedStore(), Observer(), []
    writer = Writer(store, flush_interval_s=0.01, flush_every_steps=1,
                    on_flushed=lambda through, failed: acked.append(through),
                    release=lambda n: None, counters=Counters(), observer=obs)
    writer.start()
    writer.submit(OpenRun(RunInfo(RUN, world_size=2)))
    none = np.full(3, -1, np.int32)
    writer.submit(WriteMetrics(RUN, MetricDict(np.arange(3, dtype=np.int32), ["a", "b", "c"],
                                               none, none, none, ["x"] * 3, [""] * 3,
                                               ["max", "sum", "sum"])))
    for s in range(3):
        writer.submit(step_job(s))
    assert store.blocked.wait(WAIT_S)                 # the store thread is stuck in step 0
    with obs.seen:                                   # yet every step reached the detectors
        assert obs.seen.wait_for(lambda: obs.steps == [0, 1, 2], WAIT_S), obs.steps
    assert not acked or max(acked) < 3               # no step is durable yet
    store.gate.set()
    writer.close(WAIT_S)
    assert max(acked) == 5                           # every job flushed, then acknowledged
    inner = store.inner
    assert inner.steps(RUN)["step"].to_list() == [0, 1, 2]
    at = inner.at_step(RUN, 2, rank=1)
    assert at["value"].to_list() == [2.0, 1.0, 1.0]  # rank 1's vector of step 2, as sent


def test_a_step_is_observed_only_after_its_run_was_stored_as_opened():
    """Detectors write events for the run at once; the open must already be in the store."""
    class SlowOpen(GatedStore):
        def open_run(self, info):
            self.blocked.set()
            assert self.gate.wait(WAIT_S)
            self.inner.open_run(info)

    store, obs = SlowOpen(), Observer()
    store.gate.clear()
    writer = Writer(store, flush_interval_s=0.01, flush_every_steps=1,
                    on_flushed=lambda *a: None, release=lambda n: None, counters=Counters(),
                    observer=obs)
    writer.start()
    writer.submit(OpenRun(RunInfo(RUN, world_size=2)))
    writer.submit(step_job(0))
    assert store.blocked.wait(WAIT_S)
    assert obs.steps == []                           # held until the open is applied
    store.gate.set()
    with obs.seen:
        assert obs.seen.wait_for(lambda: obs.steps == [0], WAIT_S)
    writer.close(WAIT_S)
