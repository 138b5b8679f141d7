"""The buffer's drop bookkeeping: DropLog ranges (what the collector is told), the byte bound,
the rate-limited warning, and the stop after a permanent error."""

from __future__ import annotations

import logging

import numpy as np

from hooks.buffer import DropLog, StepBuffer, StepItem


class Values:
    def __init__(self, n: int) -> None:
        self.n = n

    def materialize(self) -> np.ndarray:
        return np.zeros(self.n, np.float32)


def step(s: int, n: int = 4) -> StepItem:
    return StepItem(s, Values(n), [(1, n)], 0.0)


def test_droplog_keeps_disjoint_ascending_ranges():
    log = DropLog()
    for s in [5, 6, 7, 9, 3, 8, 1, 2, 20, 20]:
        log.add(s)
    assert log.ranges == [[1, 3], [5, 9], [20, 20]] and log.total == 10
    assert log.take() == [(1, 3), (5, 9), (20, 20)] and log.ranges == []


def test_droplog_is_bounded():
    log = DropLog()
    for s in range(0, 2 * (DropLog.MAX_RANGES + 10), 2):  # every other step: one range each
        log.add(s)
    assert len(log.ranges) == DropLog.MAX_RANGES and log.unrecorded == 10
    assert log.total == DropLog.MAX_RANGES + 10


def test_bytes_bound_the_buffer_too_and_drops_are_warned_with_counts(caplog):
    buf = StepBuffer(100, "drop_oldest", 0.1, capacity_bytes=4 * 40, log_interval_s=3600)
    with caplog.at_level(logging.WARNING, "stepwatch.hooks"):
        for s in range(10):
            assert buf.submit(step(s, 10))  # 40 bytes each: 4 fit
    assert buf.buffered() == 4 and buf.buffered_bytes() == 160
    assert [i.step for i in buf.waiting_steps()] == [6, 7, 8, 9]
    assert buf.counters["dropped_oldest"] == 6 and buf.drops.take() == [(0, 5)]
    (first,) = caplog.messages  # the first drop at once, the rest wait for the interval
    assert "dropped 1 step(s) between 0 and 0, 1 in total" in first
    buf.log_drops()
    assert "dropped 5 step(s) between 1 and 5, 6 in total" in caplog.messages[-1]


def test_a_step_bigger_than_the_byte_bound_still_goes_alone():
    buf = StepBuffer(100, "drop_oldest", 0.1, capacity_bytes=16)
    assert buf.submit(step(0, 100))  # an empty buffer takes any one step
    assert buf.submit(step(1, 100))  # the next one replaces it (drop_oldest)
    assert [i.step for i in buf.waiting_steps()] == [1] and buf.counters["dropped_oldest"] == 1


def test_stop_drops_everything_and_every_later_step_quietly(caplog):
    buf = StepBuffer(4, "drop_oldest", 0.1)
    for s in range(3):
        buf.submit(step(s))
    assert buf.stop() == 3 and buf.buffered() == 0 and buf.counters["lost_stopped"] == 3
    with caplog.at_level(logging.WARNING, "stepwatch.hooks"):
        assert buf.submit(step(3)) is False
    assert buf.counters["dropped_stopped"] == 1 and caplog.messages == []
    assert buf.drops.ranges == []  # nothing to report: the stream is gone for good
