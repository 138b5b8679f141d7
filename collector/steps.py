"""What a run's data frames do: schemas to the registry, step vectors to the barrier, ready
steps and late values to the writer. Event-loop thread only (called by ingest.py, which has
checked the frame's header and seq), so no locks.

    Schema      -> metric ids (registry.py); new dictionary rows go to the writer
    StepChunk   -> the run's barrier (barrier.py), or raw rows if the step is already reduced
    EndOfStep   -> barrier; ready steps go to the writer, which reduces, stores and flushes
    StepChunk with ends_step -> the chunk, then its EndOfStep, under the chunk's one seq
                   (both checked before either applies)

Every frame's seq goes to the rank's RankAcks (acks.py) with what it waits for: the step in
the barrier, a writer job, or nothing. Every check runs before any state changes, so a
rejected frame leaves nothing half-applied for the other clients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from collector.acks import RankAcks
from collector.barrier import ByteBudget, ReadyStep
from collector.config import CollectorConfig
from collector.errors import InvalidArgument
from collector.jobs import WriteMetrics, WriteRaw, WriteStep
from collector.run import Run
from collector.stats import Counters
from collector.writer import Writer
from proto.v1 import telemetry_pb2 as pb
from store.base import ValueBatch

RAW_ROW_BYTES = 20  # step i64 + metric_id i32 + rank i32 + value f32


class Steps:
    """Applies the data frames of every run (Ingest owns one and hands it each frame)."""

    def __init__(
        self,
        config: CollectorConfig,
        writer: Writer,
        budget: ByteBudget,
        counters: Counters,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.writer = writer
        self.budget = budget
        self.counters = counters
        self.clock = clock
        self.schema_s = 0.0  # event-loop thread CPU seconds registering schemas (once per run)

    # ---- frames ---------------------------------------------------------------------------
    def schema(self, run: Run, rank: int, s: pb.Schema, acks: RankAcks) -> None:
        """Register a rank's schema; new dictionary rows go to the writer (time in schema_s)."""
        t0 = time.thread_time()
        try:
            self._register(run, rank, s, acks)
        finally:
            self.schema_s += time.thread_time() - t0

    def _register(self, run: Run, rank: int, s: pb.Schema, acks: RankAcks) -> None:
        known = run.metrics.has_schema(rank, s.schema_id)
        new_rows = run.metrics.register_schema(rank, s)
        if not known:
            ids = run.metrics.schema(rank, s.schema_id)
            run.id_maps[(rank, s.schema_id)] = run.layouts.setdefault(ids.tobytes(), ids)
        self.counters.add("schemas_registered", int(not known))
        if new_rows is None:
            acks.received(s.header.seq)
            return
        self.counters.add("metrics_registered", len(new_rows.metric_id))
        acks.in_job(s.header.seq, self.writer.submit(WriteMetrics(run.name, new_rows)))

    def chunk(self, run: Run, rank: int, c: pb.StepChunk, acks: RankAcks, resend: bool) -> None:
        """A chunk into the step's barrier, or stored raw when the step is already reduced."""
        ids, values = self._check_chunk(run, rank, c)
        self._apply_chunk(run, rank, c, ids, values, acks, resend)

    def _check_chunk(self, run: Run, rank: int, c: pb.StepChunk) -> tuple[np.ndarray, np.ndarray]:
        """Every check of a chunk against its schema; changes nothing. (id map, values)"""
        step = c.header.step
        if step < 0:
            raise InvalidArgument(f"StepChunk step must be >= 0, got {step}")
        ids = run.metrics.schema(rank, c.schema_id)
        buf = c.values  # each read of a bytes field is a copy of it: read once
        nb = len(buf)
        if nb % 4:
            raise InvalidArgument(
                f"StepChunk values hold {nb} bytes, not a multiple of 4 (little-endian float32)"
            )
        if nb > self.config.max_chunk_bytes:
            raise InvalidArgument(
                f"StepChunk values hold {nb} bytes; at most {self.config.max_chunk_bytes} per chunk"
            )
        n = nb // 4
        if c.total != ids.size:
            raise InvalidArgument(
                f"StepChunk total {c.total} differs from the {ids.size} "
                f"metrics of schema {c.schema_id}"
            )
        if c.offset + n > ids.size:
            raise InvalidArgument(
                f"StepChunk [{c.offset}, {c.offset + n}) lies outside schema "
                f"{c.schema_id} of {ids.size} metrics"
            )
        return ids, np.frombuffer(buf, dtype="<f4")

    def _apply_chunk(
        self,
        run: Run,
        rank: int,
        c: pb.StepChunk,
        ids: np.ndarray,
        values: np.ndarray,
        acks: RankAcks,
        resend: bool,
    ) -> None:
        step, seq, n = c.header.step, c.header.seq, values.size
        self.counters.add("bytes", values.nbytes)
        if run.barrier.add_chunk(rank, step, c.schema_id, c.offset, ids.size, values):
            acks.in_step(seq, step)
        elif resend:  # the first copy is already on its way to the store
            acks.received(seq)
        else:  # a late rank: recorded raw, the reduction stands
            nbytes = n * RAW_ROW_BYTES
            self.budget.reserve(nbytes, f"late values of rank {rank} step {step}")
            batch = ValueBatch(
                step=np.full(n, step, np.int64),
                metric_id=ids[c.offset : c.offset + n].copy(),
                value=values.astype(np.float32),
                rank=np.full(n, rank, np.int32),
            )
            acks.in_job(seq, self.writer.submit(WriteRaw(run.name, batch, nbytes)), step)
            self.counters.add("late_values", n)

    def chunk_ending_step(
        self, run: Run, rank: int, c: pb.StepChunk, acks: RankAcks, resend: bool
    ) -> None:
        """The chunk, then EndOfStep{step_values, wall_time}, under the chunk's one seq. The
        end is checked against the barrier as it will be after the chunk, before either
        applies, so a rejected frame changes nothing; a late step takes the chunk's late
        path and its end changes nothing, as a late EndOfStep would."""
        ids, values = self._check_chunk(run, rank, c)
        step = c.header.step
        if not run.barrier.is_late(step):
            if not math.isfinite(c.wall_time):
                raise InvalidArgument(
                    f"StepChunk ending step {step} has wall_time {c.wall_time}; it must be finite"
                )
            got = run.barrier.values_with(rank, step, c.schema_id, c.offset, values.size)
            if c.step_values != got:
                raise InvalidArgument(
                    f"StepChunk ending step {step} of rank {rank} counts "
                    f"{c.step_values} values but {got} arrived for that step, "
                    f"this chunk included"
                )
        self._apply_chunk(run, rank, c, ids, values, acks, resend)
        if run.barrier.end_of_step(rank, step, c.step_values, c.wall_time, self.clock()):
            self.poll(run)  # the chunk's in_step already holds its seq

    def end_of_step(self, run: Run, rank: int, e: pb.EndOfStep, acks: RankAcks) -> None:
        """The rank is done with the step; ready steps go to the writer."""
        step = e.header.step
        if step < 0:
            raise InvalidArgument(f"EndOfStep step must be >= 0, got {step}")
        if run.barrier.end_of_step(rank, step, e.n_values, e.wall_time, self.clock()):
            acks.in_step(e.header.seq, step)
            self.poll(run)
        else:
            acks.received(e.header.seq)

    # ---- steps out of the barrier --------------------------------------------------------
    def poll(self, run: Run) -> None:
        """The steps the barrier has ready at this clock reading (barrier.py) to the writer."""
        for ready in run.barrier.poll(self.clock()):
            self._submit(run, ready)

    def _submit(self, run: Run, ready: ReadyStep) -> None:
        id_maps = [run.id_maps[rank, sid] for rank, sid, _, _ in ready.parts]
        job = self.writer.submit(
            WriteStep(run.name, ready, id_maps, run.metrics.ops, ready_at=self.clock())
        )
        for acks in run.acks.values():
            acks.step_submitted(ready.step, job)
        missing = len(ready.status.missing_ranks)
        self.counters.add("steps_reduced")
        if missing:
            self.counters.add("steps_incomplete")
            self.counters.add("stragglers", missing)

    def drain(self, run: Run) -> None:
        """Everything still pending to the writer, incomplete (the run is finishing)."""
        for ready in run.barrier.drain():
            self._submit(run, ready)
