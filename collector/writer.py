"""The writer stage: one thread between the event loop and the store.

The loop submits jobs (open a run, new metric rows, a ready step, a late rank's raw values,
finish a run) and gets back increasing job ids. The thread applies them in order (reducing
ready steps here, off the loop), and flushes the store when `flush_interval_s` has passed since
the last flush or `flush_every_steps` steps wait, whichever comes first. Only after a flush
returns does it report "durable through job J" to `on_flushed`, which turns into acks.

CPU time of this thread per stage (reduce, step writes, dictionary writes, observer, flush;
thread CPU, so waiting for the GIL or the disk is not counted) is summed in `stage_s` and
logged when the writer closes (`writer stage seconds: ...`; benchmarks/ingest.py reads it).

Store failures never escape: a job that keeps failing is reported as failed (its frames are
never acked), a failing flush is retried at the next interval (nothing is acked meanwhile).
Memory is bounded upstream: step bytes stay reserved in the ByteBudget until written here.

An optional observer (detect.py: the online detectors) sees every new metric-dictionary row
and every reduced step, once each, in job order, right after the job was applied; its errors
are logged and never fail the job.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from collector.barrier import ReadyStep
from collector.reduction import StepRows, reduce_step
from collector.stats import Counters
from store.base import ClipRecord, MetricDict, NotFound, RunInfo, Store, ValueBatch

log = logging.getLogger(__name__)
ATTEMPTS = 3  # a job is tried this often before it is reported failed
_STOP = object()


# ---- jobs ------------------------------------------------------------------------------------
@dataclass
class OpenRun:
    info: RunInfo
    nbytes = 0

    def apply(self, store: Store) -> int:
        store.open_run(self.info)
        return 0


@dataclass
class FinishRun:
    run: str
    nbytes = 0

    def apply(self, store: Store) -> int:
        store.finish_run(self.run)
        return 0


@dataclass
class WriteMetrics:
    run: str
    metrics: MetricDict
    nbytes = 0

    def apply(self, store: Store) -> int:
        store.write_metrics(self.run, self.metrics)
        return 0

    def notify(self, observer) -> None:
        observer.on_metrics(self.run, self.metrics)


@dataclass
class WriteRaw:
    """Values of a step that was already reduced: recorded, never reduced."""

    run: str
    batch: ValueBatch
    nbytes: int

    def apply(self, store: Store) -> int:
        store.write_raw(self.run, self.batch)
        return int(self.batch.value.size)


@dataclass
class WriteStep:
    """A step out of the barrier: reduce it, then write its raw values (one RawBlock per
    layout of whole vectors, flat rows for partial ones), the reduced rows and the status."""

    run: str
    ready: ReadyStep
    id_maps: list[np.ndarray]  # per ready.parts entry: schema position -> metric id
    ops_M: np.ndarray  # op code per metric id, as registered when it was ready
    ready_at: float = 0.0  # monotonic clock when the barrier released the step
    rows: StepRows | None = None  # the reduction, computed once (retries reuse it)

    @property
    def nbytes(self) -> int:
        return self.ready.nbytes

    def reduce(self) -> StepRows:
        if self.rows is None:
            parts = [
                (rank, ids, v, h) for (rank, _, v, h), ids in zip(self.ready.parts, self.id_maps)
            ]
            self.rows = reduce_step(
                self.ready.step, parts, self.ready.included, self.ops_M, self.ready.status
            )
            self.ready.parts, self.id_maps = [], []  # copied into rows: free the vectors now
        return self.rows

    def apply(self, store: Store) -> int:
        rows = self.reduce()
        for block in rows.blocks:
            store.write_raw_block(self.run, block)
        if rows.rest.value.size:
            store.write_raw(self.run, rows.rest)
        if rows.reduced.value.size:
            store.write_reduced(self.run, rows.reduced)
        store.write_steps(self.run, [rows.status])
        return rows.n_raw

    def notify(self, observer) -> None:
        if self.rows is not None:
            observer.on_step(self.run, self.rows, self.ready.included, self.ready_at)


@dataclass
class WriteClips:
    """Clip-update rows (a new version, or a version's rows again with the acked step)."""

    run: str
    records: list[ClipRecord]
    nbytes = 0

    def apply(self, store: Store) -> int:
        try:
            store.write_clips(self.run, self.records)
        except NotFound:  # an operator's update for a run the store has not seen: sent,
            log.warning(
                "clip update for run %r not stored: the store has no such run", self.run
            )  # not recorded (retrying cannot help)
        return 0


# ---- the stage -------------------------------------------------------------------------------
class Writer:
    def __init__(
        self,
        store: Store,
        *,
        flush_interval_s: float,
        flush_every_steps: int,
        on_flushed: Callable[[int, set[int]], None],
        release: Callable[[int], None],
        counters: Counters,
        observer=None,
    ) -> None:
        self.store = store
        self.observer = observer
        self.flush_interval_s = flush_interval_s
        self.flush_every_steps = flush_every_steps
        self._on_flushed = on_flushed
        self._release = release
        self._counters = counters
        self._queue: queue.Queue = queue.Queue()  # bounded by the ByteBudget, not by count
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="collector-writer", daemon=True)
        self._applied = 0  # highest job id applied (writer thread only)
        self._failed: set[int] = set()
        self._dirty = False
        self._steps = 0  # step jobs applied since the last flush
        self._last_flush = float("-inf")
        self.stage_s = dict.fromkeys(("reduce", "write", "dictionary", "detect", "flush"), 0.0)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job) -> int:
        with self._id_lock:
            self._next_id += 1
            job_id = self._next_id
            self._queue.put((job_id, job))
        return job_id

    def close(self, timeout: float | None = None) -> None:
        """Apply everything submitted, flush, stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
        log.info(
            "writer stage seconds: %s", " ".join(f"{k}={v:.3f}" for k, v in self.stage_s.items())
        )

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        while True:
            wait = None
            if self._dirty:
                wait = max(0.0, self._last_flush + self.flush_interval_s - time.monotonic())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP:
                self._flush()
                return
            if item is not None:
                self._apply(*item)
            due = time.monotonic() - self._last_flush >= self.flush_interval_s
            if self._dirty and (due or self._steps >= self.flush_every_steps):
                self._flush()

    def _apply(self, job_id: int, job) -> None:
        try:
            for attempt in range(ATTEMPTS):
                try:
                    t0 = time.thread_time()
                    if isinstance(job, WriteStep):
                        job.reduce()
                    t1 = time.thread_time()
                    n = job.apply(self.store)
                    self.stage_s["reduce"] += t1 - t0
                    self.stage_s[
                        "write" if isinstance(job, (WriteStep, WriteRaw)) else "dictionary"
                    ] += time.thread_time() - t1
                    self._counters.add("values_written", n)
                    break
                except Exception:  # never let the store kill the stage
                    self._counters.add("store_errors")
                    log.exception(
                        "store write failed: %s (attempt %d/%d)",
                        type(job).__name__,
                        attempt + 1,
                        ATTEMPTS,
                    )
                    if attempt + 1 < ATTEMPTS:
                        time.sleep(0.05 * 2**attempt)
            else:
                self._failed.add(job_id)
            t0 = time.thread_time()
            self._notify(job)
            self.stage_s["detect"] += time.thread_time() - t0
        finally:
            if job.nbytes:
                self._release(job.nbytes)
        self._applied = job_id
        self._dirty = True
        self._steps += isinstance(job, WriteStep)

    def _notify(self, job) -> None:
        notify = getattr(job, "notify", None)
        if self.observer is None or notify is None:
            return
        try:
            notify(self.observer)
        except Exception:  # detection never fails a write
            self._counters.add("observer_errors")
            log.exception("observer failed on %s", type(job).__name__)

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._dirty:
            return
        try:
            t0 = time.thread_time()
            self.store.flush()
            self.stage_s["flush"] += time.thread_time() - t0
        except Exception:
            self._counters.add("store_errors")
            log.exception(
                "store flush failed; retrying in %.2fs, nothing is acked meanwhile",
                self.flush_interval_s,
            )
            return
        self._counters.add("flushes")
        through, failed = self._applied, self._failed
        self._dirty, self._steps, self._failed = False, 0, set()
        try:
            self._on_flushed(through, failed)
        except Exception:
            log.exception("ack callback failed")
