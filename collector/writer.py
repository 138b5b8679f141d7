"""The writer stage: one thread between the event loop and the store, with the spool beside it.

The loop submits jobs (jobs.py) and gets back increasing job ids; the thread takes them in
order (reducing ready steps here, off the loop) and makes each one durable in one of two
places, then reports "durable through job J" to `on_flushed`, which turns into acks:

    direct    the store is up and the spool empty: jobs are applied to the store, which is
              flushed when `flush_interval_s` has passed since the last flush or
              `flush_every_steps` steps wait, whichever comes first, or at once after the
              jobs before a `flush_soon()` (a client said goodbye); durable = flushed.
    spooling  a store write or flush failed (or the spool still holds records from before):
              the jobs applied since the last flush, and every job after them, are appended to
              the spool (spool.py), fsynced at the same cadence; durable = fsynced. Meanwhile
              the store is retried with exponential backoff and jitter (`retry_initial_s`
              doubling to `retry_max_s`); once it answers, the spool drains into it, oldest
              record first, interleaved with new jobs (which keep going to the spool's tail),
              and when the spool is empty the writer is direct again.

Nothing is acked that is in neither place. A job that neither the store nor the spool can take
(the spool is full or there is none) is held in memory, in order, unacknowledged, bounded by
the ByteBudget (step bytes are released only once durable), and `saturated` is set: ingest then
refuses new frames with UNAVAILABLE until the store or the spool takes the held jobs. Store
errors that retrying cannot fix (InvalidInput, NotFound: our own rows failed validation) fail
that job alone: its frames are never acked; in the spool such a record is kept aside
(`Spool.reject`) and the drain goes on.

Shutdown (`close(timeout)`): the jobs still queued go to the store while half the timeout lasts
and to the spool after that; then one last store flush or spool fsync, and the thread stops. A
store call that hangs cannot be interrupted: close() returns after its timeout anyway, and what
was not durable was never acked (the clients resend it to the next collector).

CPU time of this thread per stage (reduce, step writes, dictionary writes, observer, flush,
spool) is summed in `stage_s` and logged when the writer closes (benchmarks/ingest.py reads
it). An optional observer (detect.py) sees every new metric-dictionary row and every reduced
step, once each, in job order, before the job is stored; its errors are logged and never fail
the job; the events it writes (through `events`, jobs.EventSink) are stored right after it.
After each flush its `on_durable()`, if it has one, does what it put off until then (a
finished run's saved detector state: its finish is acked first), stored the same way.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
from collections.abc import Callable

from collector import jobs
from collector.jobs import EventSink, Job, WriteStep
from collector.spool import Spool, SpoolFull
from collector.stats import Counters
from store.base import InvalidInput, NotFound, Store

log = logging.getLogger(__name__)
PERMANENT = (InvalidInput, NotFound)  # our rows failed the store's validation: never retried
DRAIN_BYTES = 16 << 20  # records per drain round before new jobs get a turn
_STOP = object()
_FLUSH = object()  # flush_soon(): flush once every job before it is applied


class StoreHandle:
    """The store, or how to open it: a collector may start while its store is down, and
    opening is then retried like any other store write."""

    def __init__(self, store: Store | None = None, opener: Callable[[], Store] | None = None):
        if store is None and opener is None:
            raise ValueError("StoreHandle needs a store or an opener")
        self.store, self._opener = store, opener

    def get(self) -> Store:
        if self.store is None:
            assert self._opener is not None
            self.store = self._opener()
        return self.store


class Writer:
    def __init__(
        self,
        store: Store | StoreHandle,
        *,
        flush_interval_s: float,
        flush_every_steps: int,
        on_flushed: Callable[[int, set[int]], None],
        release: Callable[[int], None],
        counters: Counters,
        observer=None,
        spool: Spool | None = None,
        events: EventSink | None = None,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
    ) -> None:
        self.handle = store if isinstance(store, StoreHandle) else StoreHandle(store)
        self.observer = observer
        self.spool = spool
        self.events = events
        self.flush_interval_s = flush_interval_s
        self.flush_every_steps = flush_every_steps
        self.retry_initial_s, self.retry_max_s = retry_initial_s, retry_max_s
        self._on_flushed = on_flushed
        self._release = release
        self._counters = counters
        self._queue: queue.Queue = queue.Queue()  # bounded by the ByteBudget, not by count
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="collector-writer", daemon=True)
        self._taken = 0  # highest job id taken off the queue (writer thread only)
        self._failed: set[int] = set()
        self._unflushed: list[tuple[int | None, Job]] = []  # in the store, not yet flushed
        self._held: collections.deque[tuple[int | None, Job]] = collections.deque()
        self._dirty = False  # something waits for a flush or an fsync
        self._steps = 0  # step jobs since the last flush or fsync
        self._flush_now = False  # flush_soon() was called: flush at the next tick
        self._last_flush = float("-inf")
        self._spooling = spool is not None and spool.pending  # an earlier run left records
        self._retry_at = 0.0
        self._backoff = retry_initial_s
        self._outage_since: float | None = time.monotonic() if self._spooling else None
        self._deadline: float | None = None  # close(timeout): after it, the spool takes all
        self.clean = True  # set by close(): everything submitted became durable
        self.stage_s = dict.fromkeys(
            ("reduce", "write", "dictionary", "detect", "flush", "spool"), 0.0
        )

    # ---- the loop's side ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> int:
        with self._id_lock:
            self._next_id += 1
            job_id = self._next_id
            self._queue.put((job_id, job))
        return job_id

    def flush_soon(self) -> None:
        """Flush (or fsync) right after the jobs submitted so far, not at the next cadence
        tick: a client said goodbye, so nothing more is coming that a wait would batch."""
        self._queue.put(_FLUSH)

    def close(self, timeout: float | None = None) -> bool:
        """Make everything submitted durable (store, or spool once half of `timeout` is
        gone), stop the thread; False if something was not (never acked, so resent)."""
        if self._thread.is_alive():
            if timeout is not None:
                self._deadline = time.monotonic() + timeout / 2
            self._queue.put(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.clean = False
                log.error(
                    "writer still busy after %.1f s (a store call that does not return); "
                    "exiting without it: what it holds was never acknowledged",
                    timeout,
                )
        log.info(
            "writer stage seconds: %s", " ".join(f"{k}={v:.3f}" for k, v in self.stage_s.items())
        )
        return self.clean

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    @property
    def saturated(self) -> bool:
        """Jobs wait that neither the store nor the spool can take: refuse new frames."""
        return bool(self._held)

    @property
    def spooling(self) -> bool:
        return self._spooling

    # ---- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._next_item()
            if item is _STOP:
                self._finish()
                return
            if item is _FLUSH:
                self._flush_now = True
            elif item is not None:
                self._take(*item)
            self._tick()

    def _next_item(self):
        now = time.monotonic()
        waits = []
        if self._dirty:
            waits.append(self._last_flush + self.flush_interval_s - now)
        if (self._spooling or self._held) and self._deadline is None:
            waits.append(self._retry_at - now)
        try:
            if waits and min(waits) <= 0:
                return self._queue.get_nowait()
            return self._queue.get(timeout=min(waits) if waits else None)
        except queue.Empty:
            return None

    def _take(self, job_id: int, job: Job) -> None:
        self._taken = job_id
        t0 = time.thread_time()
        if isinstance(job, WriteStep):
            job.reduce()
            self._steps += 1
        t1 = time.thread_time()
        self.stage_s["reduce"] += t1 - t0
        try:
            self._notify(job)
        except jobs.NotDurable as exc:  # a tier job the coordinator never took: never acked
            log.error("%s not stored, never acknowledged: %s", type(job).__name__, exc)
            self._counters.add("store_errors")
            self._failed.add(job_id)
            self._release(job.nbytes)
            return
        finally:
            self.stage_s["detect"] += time.thread_time() - t1
        if self._deadline is not None and not self._spooling and time.monotonic() > self._deadline:
            self._shutdown_to_spool()
        self._route(job_id, job)
        self._route_followups()

    def _route_followups(self) -> None:
        """The events and saved state the observer wrote meanwhile, stored next."""
        if self.events is not None:
            followups, self.events.jobs = self.events.jobs, []
            for extra in followups:
                self._route(None, extra)

    def _after_durable(self) -> None:
        """The observer's work put off until what came before is durable (detect.py: a
        finished run's saved state; the finish was acked without waiting for it)."""
        on_durable = getattr(self.observer, "on_durable", None)
        if on_durable is None:
            return
        t0 = time.thread_time()
        try:
            on_durable()
        except Exception:  # detection never fails a write
            self._counters.add("observer_errors")
            log.exception("observer failed after a flush")
        finally:
            self.stage_s["detect"] += time.thread_time() - t0
        self._route_followups()

    def _route(self, job_id: int | None, job: Job) -> None:
        if self._spooling or self._held:
            self._to_spool(job_id, job)
            return
        try:
            self._apply(job, self.handle.get())
        except PERMANENT:
            self._counters.add("store_errors")
            log.exception(
                "store refused %s for good; its frames are never acked", type(job).__name__
            )
            if job_id is not None:
                self._failed.add(job_id)
            self._release(job.nbytes)
            return
        except Exception as exc:  # noqa: BLE001 - any other store failure: the store is away
            self._fail_over(exc)
            self._to_spool(job_id, job)
            return
        self._unflushed.append((job_id, job))
        self._dirty = True

    def _apply(self, job: Job, store: Store) -> None:
        t0 = time.thread_time()
        n = job.apply(store)
        stage = "write" if job.kind in (jobs.ROWS, jobs.RAW) else "dictionary"
        self.stage_s[stage] += time.thread_time() - t0
        self._counters.add("values_written", n)

    def _to_spool(self, job_id: int | None, job: Job) -> None:
        """Append to the spool, or hold (in order, after anything held) when it cannot."""
        if job.kind == 0:
            return  # writes nothing (Forget, and the tier's coordinator-only jobs)
        if not self._held and self._append(job):
            return
        if not self._held:
            self._retry_at = time.monotonic() + self._jitter(self._backoff)
            log.error(
                "%s: holding store writes in memory (unacknowledged) and refusing new frames "
                "until the store takes them",
                "the store is away and there is no spool" if self.spool is None else "spool full",
            )
        self._held.append((job_id, job))

    def _append(self, job: Job) -> bool:
        """The job as a spool record; False if there is no spool or it has no room."""
        if self.spool is None:
            return False
        t0 = time.thread_time()
        try:
            self.spool.append(job.kind, job.encode())
        except SpoolFull as exc:
            self._counters.add("spool_full")
            log.debug("%s", exc)
            return False
        self.stage_s["spool"] += time.thread_time() - t0
        self._counters.add("spool_records")
        self._release(job.nbytes)
        self._dirty = True
        return True

    def _fail_over(self, exc: BaseException) -> None:
        """The store failed: what it has not flushed goes to the spool, and so does every job
        after it until the store is back and the spool drained."""
        self._counters.add("store_errors")
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self._counters.add("store_outages")
            where = f"spooling to {self.spool.dir}" if self.spool else "no spool: holding"
            log.warning("store unavailable (%s: %s); %s", type(exc).__name__, exc, where)
        self._discard_store_buffer()
        self._spooling = True
        self._backoff = self.retry_initial_s
        self._retry_at = time.monotonic() + self._jitter(self._backoff)
        unflushed, self._unflushed = self._unflushed, []
        for job_id, job in unflushed:
            self._to_spool(job_id, job)

    def _discard_store_buffer(self) -> None:
        store = self.handle.store
        discard = getattr(store, "discard", None)
        if discard is not None:
            try:
                discard()
            except Exception:
                log.warning("could not discard the store's unflushed writes", exc_info=True)

    @staticmethod
    def _jitter(s: float) -> float:
        return s * random.uniform(0.5, 1.0)  # full jitter's upper half: never a storm, never 0

    def _shutdown_to_spool(self) -> None:
        """Half the close timeout is gone: flush what the store has, spool the rest."""
        if self.spool is None:
            return
        self._flush()
        self._spooling = True
        self._retry_at = float("inf")  # no drain on the way out; the next collector drains

    def _notify(self, job: Job) -> None:
        notify = getattr(job, "notify", None)
        if self.observer is None or notify is None:
            return
        try:
            notify(self.observer)
        except jobs.NotDurable:
            raise
        except Exception:  # detection never fails a write
            self._counters.add("observer_errors")
            log.exception("observer failed on %s", type(job).__name__)

    # ---- flush, fsync, drain ------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        if self._dirty and (
            self._flush_now
            or now - self._last_flush >= self.flush_interval_s
            or self._steps >= self.flush_every_steps
        ):
            self._flush()
            self._after_durable()
        self._flush_now = False
        if (self._spooling or self._held) and now >= self._retry_at and self._deadline is None:
            self._recover()

    def _flush(self) -> None:
        """Direct: flush the store. Spooling: fsync the spool. Then report what is durable."""
        self._last_flush = time.monotonic()
        if not self._dirty:
            return
        t0 = time.thread_time()
        if self._unflushed:
            try:
                self.handle.get().flush()
            except Exception as exc:  # noqa: BLE001 - the store is away: spool what it had
                self._fail_over(exc)
            else:
                self._counters.add("flushes")
                for _, job in self._unflushed:
                    self._release(job.nbytes)
                self._unflushed = []
        self.stage_s["flush"] += time.thread_time() - t0
        if self.spool is not None and self._spooling:
            t0 = time.thread_time()
            self.spool.sync()
            self.stage_s["spool"] += time.thread_time() - t0
        self._dirty, self._steps = False, 0
        self._report()

    def _report(self) -> None:
        held = next((job_id for job_id, _ in self._held if job_id is not None), None)
        through = self._taken if held is None else min(self._taken, held - 1)
        failed, self._failed = self._failed, set()
        try:
            self._on_flushed(through, failed)
        except Exception:
            log.exception("ack callback failed")

    def _recover(self) -> None:
        """Retry the store: drain the spool into it, move held jobs into the room that made,
        and once the spool is empty write the rest straight to the store; direct again when
        nothing is left. Any failure backs off (exponential, jittered)."""
        try:
            store = self.handle.get()
            if self.spool is not None:
                self._drain(store)
                self._spool_held()
                if self.spool.pending:
                    self._retry_at = 0.0  # more to drain: come back after the queued jobs
                    return
            self._store_held(store)
        except Exception as exc:  # noqa: BLE001 - still away
            self._discard_store_buffer()
            if self.spool is not None:
                self.spool.rewind()
            self._backoff = min(self._backoff * 2, self.retry_max_s)
            self._retry_at = time.monotonic() + self._jitter(self._backoff)
            log.debug("store still unavailable (%s); next try in <= %.1f s", exc, self._backoff)
            return
        outage = time.monotonic() - (self._outage_since or time.monotonic())
        log.warning("store back after %.1f s; spool drained, writing directly again", outage)
        self._spooling, self._outage_since = False, None
        self._backoff = self.retry_initial_s

    def _drain(self, store: Store) -> None:
        assert self.spool is not None
        records = self.spool.read(DRAIN_BYTES)
        if not records:
            return
        t0 = time.thread_time()
        for rec in records:
            try:
                job = jobs.decode(rec.kind, rec.payload)
            except (ValueError, KeyError, TypeError) as exc:
                self._counters.add("spool_rejected")
                self.spool.reject(rec, f"undecodable: {exc}")
                continue
            try:
                self._apply(job, store)
            except PERMANENT as exc:
                self._counters.add("spool_rejected")
                self.spool.reject(rec, f"{type(exc).__name__}: {exc}")
        store.flush()
        self.spool.consumed()
        self.stage_s["spool"] += time.thread_time() - t0
        self._counters.add("spool_drained", len(records))
        self._counters.add("flushes")

    def _spool_held(self) -> None:
        """Held jobs into the spool, in order, as far as it has room."""
        while self._held and self._append(self._held[0][1]):
            self._held.popleft()

    def _store_held(self, store: Store) -> None:
        """The spool is empty (or absent): held jobs straight to the store, in order."""
        if not self._held:
            return
        for _, job in self._held:
            self._apply(job, store)
        store.flush()
        for _, job in self._held:
            self._release(job.nbytes)
        self._held.clear()
        self._dirty = True  # reported at the next flush

    def _finish(self) -> None:
        """STOP: everything before it was taken. One last flush or fsync, then report."""
        self._spool_held()
        self._dirty = self._dirty or bool(self._unflushed)
        self._flush()
        self._after_durable()  # what it writes gets the same last flush
        self._dirty = self._dirty or bool(self._unflushed)
        self._flush()
        self.clean = not self._held and not self._unflushed
        if not self.clean:
            log.error(
                "writer stopped with %d job(s) neither in the store nor in the spool; "
                "they were never acknowledged",
                len(self._held) + len(self._unflushed),
            )
        if self.spool is not None:
            if self.spool.pending:
                log.warning(
                    "spool %s keeps %d bytes for the next collector to drain",
                    self.spool.dir,
                    self.spool.size,
                )
            self.spool.close()
