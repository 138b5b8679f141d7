"""writer.py with a store that goes away: jobs spool and are reported durable only once fsynced,
drain in order when the store is back, are held (never reported) when the spool is full, and a
close bounded in time leaves the rest in the spool. jobs.py: every kind of store write
survives its spool record."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from collector.jobs import (
    EventSink,
    FinishRun,
    OpenRun,
    WriteClips,
    WriteEvents,
    WriteMetrics,
    WriteRaw,
    WriteRows,
    decode,
)
from collector.reduction import StepRows
from collector.spool import Spool
from collector.stats import Counters
from collector.writer import StoreHandle, Writer
from store import (
    ClipRecord,
    EventRecord,
    MetricDict,
    RawBlock,
    RunInfo,
    StepStatus,
    StoreError,
    ValueBatch,
)
from store.memory import MemoryStore

WAIT_S = 20.0


class FlakyStore(MemoryStore):
    """A memory store whose backend can be switched off: every read and commit then fails
    as a dead server's would (writes still buffer, as BufferedStore's do)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = threading.Event()
        self.commits = 0

    def _check(self) -> None:
        if self.down.is_set():
            raise StoreError("connection refused (the test switched the store off)")

    def _committed_run(self, run):
        self._check()
        return super()._committed_run(run)

    def _committed_metrics(self, run):
        self._check()
        return super()._committed_metrics(run)

    def _commit(self, runs, metrics, values, layouts):
        self._check()
        self.commits += 1
        super()._commit(runs, metrics, values, layouts)


class Durable:
    """on_flushed, recorded: the highest job id reported durable, and failed ones."""

    def __init__(self) -> None:
        self.through = 0
        self.failed: set[int] = set()
        self.cond = threading.Condition()

    def __call__(self, through: int, failed: set[int]) -> None:
        with self.cond:
            self.through = max(self.through, through)
            self.failed |= failed
            self.cond.notify_all()

    def wait(self, job: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.through >= job, WAIT_S), self.through


def raw(step: int, rank: int = 0, n: int = 3) -> WriteRaw:
    batch = ValueBatch(
        step=np.full(n, step, np.int64),
        metric_id=np.arange(n, dtype=np.int32),
        value=np.arange(n, dtype=np.float32) + step,
        rank=np.full(n, rank, np.int32),
    )
    return WriteRaw("r", batch, nbytes=100)


def make(tmp_path, *, spool=True, max_bytes=1 << 20, store=None):
    store = store or FlakyStore()
    durable, released = Durable(), []
    w = Writer(
        StoreHandle(store),
        flush_interval_s=0.02,
        flush_every_steps=64,
        on_flushed=durable,
        release=released.append,
        counters=Counters(),
        spool=Spool(str(tmp_path / "spool"), max_bytes=max_bytes) if spool else None,
        retry_initial_s=0.02,
        retry_max_s=0.1,
    )
    w.start()
    return w, store, durable, released


def wait_direct(w: Writer) -> None:
    deadline = time.monotonic() + WAIT_S
    while w.spooling and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not w.spooling, "the spool did not drain"


def steps_in(store, rank: int = 0) -> list[int]:
    return sorted(set(store.series("r", "m1", rank=rank)["step"].to_list()))


def metrics() -> WriteMetrics:
    md = MetricDict(
        metric_id=np.arange(3, dtype=np.int32),
        name=["m0", "m1", "m2"],
        layer=np.full(3, -1, np.int32),
        expert=np.full(3, -1, np.int32),
        head=np.full(3, -1, np.int32),
        stat=["a", "b", "c"],
        unit=["", "", ""],
        reduce=["sum", "mean", "max"],
    )
    return WriteMetrics("r", md)


def test_a_run_first_seen_while_the_store_is_down_is_spooled_acked_and_drained(tmp_path):
    w, store, durable, released = make(tmp_path)
    store.down.set()  # down before the run's first write: OpenRun too must wait, not fail
    jobs = [w.submit(OpenRun(RunInfo("r", 1))), w.submit(metrics())]
    jobs += [w.submit(raw(s)) for s in range(10)]
    durable.wait(jobs[-1])  # acked: they are in the spool, fsynced
    assert w.spooling and store.commits == 0 and w.spool.size > 0
    assert sum(released) == 10 * 100  # the memory went with the records
    time.sleep(0.3)  # the store is retried meanwhile, and still down
    store.down.clear()
    wait_direct(w)
    assert not w.spool.pending
    assert steps_in(store) == list(range(10))
    assert store.runs()["status"].to_list() == ["live"]
    more = w.submit(raw(10))  # direct again
    durable.wait(more)
    assert steps_in(store) == list(range(11)) and not durable.failed
    assert w.close(5.0)


def test_a_failed_flush_spools_what_the_store_had_not_taken(tmp_path):
    w, store, durable, _ = make(tmp_path)
    first = [w.submit(OpenRun(RunInfo("r", 1))), w.submit(metrics()), w.submit(raw(0))]
    durable.wait(first[-1])
    store.down.set()  # writes still buffer in the store; its flush fails
    later = [w.submit(raw(s)) for s in range(1, 6)]
    durable.wait(later[-1])
    assert w.spooling and store._pending == {}  # the store's buffer was dropped, not kept
    store.down.clear()
    wait_direct(w)
    assert steps_in(store) == list(range(6))
    w.close(10.0)


def test_nothing_is_reported_durable_without_a_spool_while_the_store_is_down(tmp_path):
    w, store, durable, released = make(tmp_path, spool=False)
    first = w.submit(OpenRun(RunInfo("r", 1)))
    durable.wait(first)
    store.down.set()
    held = [w.submit(metrics()), w.submit(raw(0))]
    time.sleep(0.5)
    assert durable.through == first and w.saturated and sum(released) == 0
    store.down.clear()  # back: the held jobs go to the store, in order, then are reported
    durable.wait(held[-1])
    assert steps_in(store) == [0] and not w.saturated and sum(released) == 100
    w.close(5.0)


def test_a_full_spool_holds_jobs_unreported_until_the_store_returns(tmp_path):
    w, store, durable, released = make(tmp_path, max_bytes=10_000)
    store.down.set()
    ids = [w.submit(OpenRun(RunInfo("r", 1))), w.submit(metrics())]
    ids += [w.submit(raw(s, n=200)) for s in range(6)]  # ~4 KB each: the spool holds 2
    deadline = time.monotonic() + WAIT_S
    while not w.saturated and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert w.saturated and durable.through < ids[-1]
    assert w._counters.snapshot()["spool_full"] >= 1
    store.down.clear()
    durable.wait(ids[-1])  # held jobs went to the spool (room drained) or the store
    wait_direct(w)
    assert steps_in(store) == list(range(6)) and not w.saturated
    assert sum(released) == 6 * 100
    w.close(5.0)


def test_a_bounded_close_spools_the_rest_and_the_next_writer_drains_it(tmp_path):
    w, store, durable, _ = make(tmp_path)
    store.down.set()
    ids = [w.submit(OpenRun(RunInfo("r", 1))), w.submit(metrics())]
    ids += [w.submit(raw(s)) for s in range(20)]
    t0 = time.monotonic()
    assert w.close(2.0)  # everything durable: in the spool
    assert time.monotonic() - t0 < 2.0 + 5.0  # generous: the bound, not a benchmark
    assert durable.through == ids[-1] and w.spool.pending
    store.down.clear()
    w2, _, _, _ = make(tmp_path, store=store)  # the next collector, same spool
    wait_direct(w2)
    assert steps_in(store) == list(range(20))
    w2.close(5.0)


def test_a_job_the_store_refuses_for_good_fails_alone(tmp_path):
    w, store, durable, _ = make(tmp_path)
    ok = w.submit(OpenRun(RunInfo("r", 1)))
    bad = w.submit(WriteRaw("never-opened", raw(0).batch, nbytes=100))  # NotFound: no run
    after = w.submit(metrics())
    durable.wait(after)
    assert durable.failed == {bad} and ok < bad < after and not w.spooling
    w.close(5.0)


@pytest.mark.parametrize(
    "job",
    [
        OpenRun(RunInfo("r", 4, '{"lr": 0.1}', 12.5)),
        FinishRun("r", "abandoned"),
        metrics(),
        raw(7, rank=3),
        WriteClips("r", [ClipRecord(2, 9, 1, "routed", float("inf"), "operator", -1)]),
        WriteEvents(
            "r", [EventRecord(5, "blowup", "moe/layer01", float("nan"), 3.0, "warning", 4)]
        ),
        WriteRows(
            "r",
            StepRows(
                blocks=[
                    RawBlock(
                        3,
                        np.array([0, 1], np.int32),
                        np.array([4, 5, 6], np.int32),
                        np.arange(6, dtype=np.float32).reshape(2, 3),
                    )
                ],
                rest=raw(3, rank=2).batch,
                reduced=ValueBatch(
                    step=np.full(2, 3, np.int64),
                    metric_id=np.array([4, 5], np.int32),
                    value=np.array([1.5, -2.0], np.float32),
                    n_ranks=np.array([2, 2], np.int32),
                ),
                status=StepStatus(3, 2, (1,), False, 99.5),
            ),
        ),
    ],
    ids=lambda j: type(j).__name__,
)
def test_every_store_write_survives_its_spool_record(job):
    back = decode(job.kind, b"".join(bytes(p) for p in job.encode()))
    assert type(back) is type(job)
    assert repr(_fields(back)) == repr(_fields(job))


def _fields(job) -> dict:
    """A job's content as comparable text (arrays as lists; NaN prints as nan)."""

    def plain(v):
        if isinstance(v, np.ndarray):
            return (str(v.dtype), v.tolist())
        if hasattr(v, "__dataclass_fields__"):  # nbytes: memory held, not content
            return {k: plain(getattr(v, k)) for k in v.__dataclass_fields__ if k != "nbytes"}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(job)


def test_flush_soon_flushes_after_the_jobs_before_it_not_at_the_tick(tmp_path):
    store = FlakyStore()
    durable = Durable()
    w = Writer(
        StoreHandle(store),
        flush_interval_s=3600.0,  # the tick never comes in this test
        flush_every_steps=10_000,
        on_flushed=durable,
        release=lambda n: None,
        counters=Counters(),
    )
    w.start()
    first = w.submit(OpenRun(RunInfo("r", 1)))
    durable.wait(first)  # the first job flushes at once: no flush happened before
    jobs = [w.submit(metrics()), *(w.submit(raw(s)) for s in range(3))]
    w.flush_soon()
    durable.wait(jobs[-1])
    assert steps_in(store) == [0, 1, 2] and store.commits == 2
    assert w.close(5.0)


def test_an_observers_put_off_work_runs_after_the_flush_and_is_stored(tmp_path):
    """Observer.on_durable runs after a flush reported everything before it durable (the
    finish of a run is acked without waiting for its detector-state save), and what it
    writes through the EventSink reaches the store, at the writer's close at the latest."""
    store, durable, sink = FlakyStore(), Durable(), EventSink()

    class PutOff:
        def __init__(self) -> None:
            self.due, self.durable_at_save = False, None

        def on_finish(self, run: str) -> None:
            self.due = True

        def on_durable(self) -> None:
            if self.due:
                self.due, self.durable_at_save = False, durable.through
                sink.write_detector_state("r", 2, b"state", "detect")

    observer = PutOff()
    w = Writer(
        StoreHandle(store),
        flush_interval_s=3600.0,  # only flush_soon and the close flush
        flush_every_steps=10_000,
        on_flushed=durable,
        release=lambda n: None,
        counters=Counters(),
        observer=observer,
        events=sink,
    )
    w.start()
    w.submit(OpenRun(RunInfo("r", 1)))
    w.submit(metrics())
    finish = w.submit(FinishRun("r"))
    w.flush_soon()
    durable.wait(finish)
    assert w.close(5.0)
    assert observer.durable_at_save is not None and observer.durable_at_save >= finish
    assert store.detector_state("r") == (2, b"state")
