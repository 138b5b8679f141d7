"""A collector in tier mode (`serve --coordinator HOST:PORT`): its ranks' raw vectors to its
store, per-step partials to the coordinator (coordinator.py), the coordinator's clip table to
its ranks.

The ingest side is the ordinary collector's (ingest.py, steps.py): Hellos, seq rules, the
barrier, acks. Two things differ:

  - its barrier waits for ITS ranks, the ranks that said Hello to it for the run
    (StepBarrier.members), and a run finishes here once those said goodbye;
  - its writer is a TierWriter, which turns the jobs the loop submits into tier jobs:

      OpenRun      -> the run's info is remembered (for Register); opened in this store too
      WriteMetrics -> TierMetrics: Register at the coordinator gives the GLOBAL ids of the
                      new names; the dictionary rows are stored here with those ids
      WriteStep    -> TierStep: reduced into a Partial over the ranks that ended the step,
                      in global ids; sent to the coordinator, whose answer comes once the
                      run-wide step is reduced and stored there; its clip table is then
                      handed to the ranks (before the acks below); then the raw vectors are
                      stored here (RawBlocks, global ids) and nothing else: reduced rows and
                      the step status are the coordinator's
      FinishRun    -> TierFinish: the ranks that said goodbye, to the coordinator (this
                      collector stopping says nothing: its ranks move on to the next address)
      ClipAck rows -> TierClipAcks: forwarded to the coordinator, which stores them

Every tier job talks to the coordinator in `notify`, which the writer calls in job order for
every job, before the job goes to the store or the spool. So a rank's frames are acked only
once (1) the coordinator stored the reduced step its values are in and (2) its raw vector is
durable here (store, or spool while the store is away): nothing acked can be lost by either
process dying. A coordinator that does not answer is retried with backoff for as long as this
collector runs (its writer waits, its budget fills, ingest then refuses frames UNAVAILABLE:
bounded); a collector that stops first gives up (jobs.NotDurable: those frames are never
acked, the ranks resend them to the next collector, and the coordinator takes the resent
partial as a resend).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from collector import jobs
from collector.jobs import NotDurable
from collector.partials import Partial, partial_of
from collector.reduction import StepRows
from collector.tierwire import CoordinatorLink
from collector.writer import Writer
from proto.v1 import telemetry_pb2 as pb
from store.base import MetricDict, RawBlock, RunInfo, Store, ValueBatch

log = logging.getLogger("collector.tier")


# ---- tier jobs ---------------------------------------------------------------------------------
@dataclass
class TierOpen:
    info: RunInfo
    nbytes = 0
    kind: ClassVar[int] = jobs.OPEN_RUN

    def notify(self, link: CoordinatorLink) -> None:
        link.info[self.info.run] = self.info
        link.open(self.info.run)  # the coordinator opens the run in its store first

    def apply(self, store: Store) -> int:
        """A store the coordinator shares (one ClickHouse) has the run already: its row is
        the coordinator's, never rewritten from here; a store of our own gets it opened."""
        leave = getattr(store, "leave_run_row", None)
        if leave is not None and self.info.run in store.runs()["run"].to_list():
            leave(self.info.run)
            return 0
        return jobs.OpenRun(self.info).apply(store)

    def encode(self) -> list[bytes | memoryview]:
        return jobs.OpenRun(self.info).encode()


@dataclass
class TierMetrics:
    run: str
    metrics: MetricDict  # local ids until notify, global after
    nbytes = 0
    kind: ClassVar[int] = jobs.METRICS

    def notify(self, link: CoordinatorLink) -> None:
        gids = link.register(self.run, self.metrics)
        m = self.metrics
        self.metrics = MetricDict(gids, m.name, m.layer, m.expert, m.head, m.stat, m.unit, m.reduce)

    def apply(self, store: Store) -> int:
        return jobs.WriteMetrics(self.run, self.metrics).apply(store)

    def encode(self) -> list[bytes | memoryview]:
        return jobs.WriteMetrics(self.run, self.metrics).encode()


def _global(g: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Local metric ids -> the coordinator's; NotDurable for one it never gave an id (its
    Register failed: the step is not stored, its frames never acked)."""
    if local.size and (int(local.max()) >= g.size or int(g[local].min()) < 0):
        raise NotDurable("a metric of the step has no global id (its Register failed)")
    return g[local]


@dataclass
class TierStep:
    step_job: jobs.WriteStep
    raw: jobs.WriteRows | None = None  # the raw vectors in global ids, once notified
    # (how to build the partial, the ranks the coordinator took it with): to confirm
    confirm: tuple[Callable[[frozenset[int]], Partial], frozenset[int]] | None = None
    kind: ClassVar[int] = jobs.ROWS

    @property
    def run(self) -> str:
        return self.step_job.run

    @property
    def nbytes(self) -> int:
        return self.step_job.nbytes

    def notify(self, link: CoordinatorLink) -> None:
        ready = self.step_job.ready
        included = frozenset(ready.included)
        rows = self.step_job.reduce()
        g = link.global_of.get(self.run, np.empty(0, np.int32))
        blocks = [RawBlock(b.step, b.rank, _global(g, b.metric_id), b.value) for b in rows.blocks]
        r = rows.rest
        rest = ValueBatch(r.step, _global(g, r.metric_id), r.value, rank=r.rank)
        wall = rows.status.wall_time

        def make(ranks: frozenset[int]) -> Partial:
            return partial_of(self.run, ready.step, blocks, rest, ranks, wall)

        if included:
            self.confirm = (make, link.partial(make, included, wait=False))
        none = np.empty(0, np.int32)
        reduced = ValueBatch(np.empty(0, np.int64), none, np.empty(0, np.float32), n_ranks=none)
        raw = StepRows(blocks, rest, reduced, rows.status, raw_only=True)
        self.raw = jobs.WriteRows(self.run, raw)

    def _rows(self) -> jobs.WriteRows:
        if self.raw is None:
            raise NotDurable(f"step {self.step_job.ready.step} was never sent to the coordinator")
        return self.raw

    def apply(self, store: Store) -> int:
        return self._rows().apply(store)

    def encode(self) -> list[bytes | memoryview]:
        return self._rows().encode()


@dataclass
class TierFinish:
    run: str
    ranks: list[int]  # ranks that said goodbye (a stopping collector sends none)
    status: str
    nbytes = 0
    kind: ClassVar[int] = 0  # writes nothing here: the run's end is the coordinator's

    def notify(self, link: CoordinatorLink) -> None:
        if self.ranks:  # an abandoned run ends at the coordinator when it idles there too
            link.finish(self.run, self.ranks, self.status)

    def apply(self, store: Store) -> int:
        return 0

    def encode(self) -> list[bytes | memoryview]:
        raise TypeError("TierFinish writes nothing and is never spooled")


@dataclass
class TierClipAcks:
    run: str
    acks: list[tuple[int, int, int]]  # (rank, version, step)
    nbytes = 0
    kind: ClassVar[int] = 0

    def notify(self, link: CoordinatorLink) -> None:
        link.clip_acks(self.run, self.acks)

    def apply(self, store: Store) -> int:
        return 0

    def encode(self) -> list[bytes | memoryview]:
        raise TypeError("TierClipAcks writes nothing and is never spooled")


class TierWriter(Writer):
    """A Writer whose jobs are tier jobs (module docstring), with a confirmer thread.
    `goodbyes(run)`: the ranks of a run that said goodbye to this collector (ingest's view,
    read when FinishRun is submitted, on the event loop).

    The writer thread only has the coordinator TAKE each partial (a quick call), so it never
    waits for other collectors' ranks: a rank failing over to this collector mid-step sends
    its part of the step through this same writer. The confirmer thread then sends each
    partial again with `wait`, in job order; "durable through job J" reaches ingest (acks)
    only for jobs whose steps the coordinator confirmed reduced and stored, and after their
    clip table went to the ranks."""

    def __init__(
        self, *args, link: CoordinatorLink, goodbyes: Callable[[str], list[int]], **kw
    ) -> None:
        kw.pop("observer", None)  # the link is the observer: it gets every job's notify
        self._to_ingest = kw.pop("on_flushed")
        super().__init__(*args, observer=link, on_flushed=self._gate, **kw)
        self.link, self.goodbyes = link, goodbyes
        self._gate_lock = threading.Lock()
        self._unconfirmed: dict[int, TierStep] = {}  # job id -> step waiting to be confirmed
        self._flushed_through, self._failed_jobs = 0, set[int]()
        self._confirm_q: queue.Queue = queue.Queue()
        self._confirmer = threading.Thread(
            target=self._confirm_loop, name="collector-tier-confirm", daemon=True
        )

    def start(self) -> None:
        super().start()
        self._confirmer.start()

    def submit(self, job: Any) -> int:
        if isinstance(job, jobs.OpenRun):
            job = TierOpen(job.info)
        elif isinstance(job, jobs.WriteMetrics):
            job = TierMetrics(job.run, job.metrics)
        elif isinstance(job, jobs.WriteStep):
            job.accumulate = False  # the partial is built from the raw rows, once
            job = TierStep(job)
        elif isinstance(job, jobs.FinishRun):
            ranks = self.goodbyes(job.run) if job.status == "finished" else []
            job = TierFinish(job.run, ranks, job.status)
        return super().submit(job)

    def _take(self, job_id: int, job: Any) -> None:
        super()._take(job_id, job)
        if isinstance(job, TierStep) and job.confirm is not None:
            with self._gate_lock:  # before any flush can report this job
                self._unconfirmed[job_id] = job
            self._confirm_q.put(job_id)

    # ---- the gate on "durable through" -----------------------------------------------------
    def _gate(self, through_job: int, failed: set[int]) -> None:
        """The writer's report (writer thread), held back to the oldest unconfirmed job."""
        with self._gate_lock:
            self._flushed_through = max(self._flushed_through, through_job)
            self._failed_jobs |= failed
        self._pass()

    def _pass(self) -> None:
        with self._gate_lock:
            through = self._flushed_through
            if self._unconfirmed:
                through = min(through, min(self._unconfirmed) - 1)
            failed = {j for j in self._failed_jobs if j <= through}
            self._failed_jobs -= failed
        self._to_ingest(through, failed)

    def _confirm_loop(self) -> None:
        while True:
            job_id = self._confirm_q.get()
            if job_id is None:
                return
            job = self._unconfirmed[job_id]
            assert job.confirm is not None
            make, ranks = job.confirm
            try:
                self.link.partial(make, ranks, wait=True)
            except NotDurable as exc:  # stopping: never acked, the ranks resend elsewhere
                log.error(
                    "step %d not confirmed, never acknowledged: %s", job.step_job.ready.step, exc
                )
                continue
            except Exception:
                log.exception("confirming step %d failed", job.step_job.ready.step)
                continue
            with self._gate_lock:
                del self._unconfirmed[job_id]
            self._pass()

    def close(self, timeout: float | None = None) -> bool:
        if timeout is not None:  # half of it for the coordinator, then give up
            timer = threading.Timer(timeout / 2, self.link.stop)
            timer.daemon = True
            timer.start()
        else:
            self.link.stop()
        try:
            clean = super().close(timeout)
            self._confirm_q.put(None)
            self._confirmer.join(None if timeout is None else timeout / 2)
            with self._gate_lock:
                unconfirmed = len(self._unconfirmed)
            if unconfirmed:
                log.error(
                    "%d step(s) not confirmed by the coordinator: never acknowledged", unconfirmed
                )
            return clean and not unconfirmed
        finally:
            self.link.stop()
            self.link.close()


def clip_acks_of(board, run: str, version: int) -> list[tuple[int, int, int]]:
    """(rank, version, step) of every rank's ack of `version` on this collector's board."""
    return [(a.rank, a.version, a.step) for a in board.acks(run) if a.version == version]


# ---- operator commands -------------------------------------------------------------------------
OPERATE_TIMEOUT_S = 8.0  # under the clip CLI's 10 s deadline, so the operator reads our reason
OPERATE_THREADS = 4  # commands in flight at once; more wait their turn (never the loop)


class OperatorForward:
    """A tier collector's answer to an operator stream (`collector clip --target` this
    collector): the command goes to the coordinator, which holds the tier's clip table, in a
    thread of its own, and only that operator's stream awaits it. The event loop goes on
    taking the ranks' frames and sending their acks meanwhile, however slow or unreachable
    the coordinator is; after OPERATE_TIMEOUT_S the operator is told so (UNAVAILABLE, the
    command may or may not have been applied)."""

    def __init__(self, link: CoordinatorLink, timeout_s: float = OPERATE_TIMEOUT_S) -> None:
        self.link = link
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(OPERATE_THREADS, thread_name_prefix="operator-forward")

    async def __call__(self, hello: pb.Hello) -> pb.ClipUpdate:
        loop = asyncio.get_running_loop()
        run, command = hello.header.run, hello.config_json
        return await loop.run_in_executor(
            self._pool, self.link.operate, run, command, self.timeout_s
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
