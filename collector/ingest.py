"""Ingest: what happens to each frame a rank sends. Event-loop thread only, so no locks.

    Hello       -> run registry (world size fixed per live run), Welcome(acked_seq), clip table
    Schema      -> metric ids (registry.py); new dictionary rows go to the writer
    StepChunk   -> the run's barrier (barrier.py), or raw rows if the step is already reduced
    EndOfStep   -> barrier; ready steps go to the writer, which reduces, stores and flushes
    StepChunk with ends_step -> the chunk, then its EndOfStep, under the chunk's one seq
                   (the Welcome says this collector takes it; both checked before either applies)
    ClipAck     -> the run's clip board (clipboard.py), and `on_clip_ack` (control.py), which
                   stores the acknowledged step

A stream whose Hello carries client_version OPERATOR_CLIENT is an operator's: its
config_json is one clip command (operator.py), answered (`operator`, control.py) with the
run's clip table and the end of the stream; it never joins the run.

Per-(run, rank) seq bookkeeping lives in acks.py: a frame with seq <= acked is ignored and
acked again; acks go out only after the writer reports a flush. Every check runs before any
state changes, so a rejected frame leaves nothing half-applied for the other clients.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from collector.acks import RankAcks
from collector.barrier import ByteBudget, ReadyStep, StepBarrier
from collector.clipboard import ClipBoard
from collector.config import CollectorConfig
from collector.conn import Conn
from collector.errors import InvalidArgument, ResourceExhausted, Unavailable
from collector.operator import OPERATOR_CLIENT
from collector.registry import RunMetrics, check_hello
from collector.stats import Counters
from collector.writer import FinishRun, OpenRun, WriteMetrics, Writer, WriteRaw, WriteStep
from proto.v1 import telemetry_pb2 as pb
from store.base import RunInfo, ValueBatch

log = logging.getLogger(__name__)
RAW_ROW_BYTES = 20  # step i64 + metric_id i32 + rank i32 + value f32


@dataclass
class Run:
    name: str
    world_size: int
    info: RunInfo
    metrics: RunMetrics
    barrier: StepBarrier
    acks: dict[int, RankAcks] = field(default_factory=dict)
    conns: dict[int, set[Conn]] = field(default_factory=dict)
    said_goodbye: set[int] = field(default_factory=set)  # ranks that half-closed
    # (rank, schema_id) -> its id map, one array object per distinct content (a "layout":
    # the ranks of one EP group share it), so the reduction can group parts by identity
    id_maps: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    layouts: dict[bytes, np.ndarray] = field(default_factory=dict)
    finished: bool = False
    finish_job: int | None = None  # writer job that marks the run finished


class Ingest:
    def __init__(
        self,
        config: CollectorConfig,
        writer: Writer,
        budget: ByteBudget,
        clips: ClipBoard,
        counters: Counters,
        clock: Callable[[], float] = time.monotonic,
        on_clip_ack: Callable[[str, int], int | None] | None = None,
        operator: Callable[[pb.Hello], pb.ClipUpdate] | None = None,
    ) -> None:
        self.config = config
        self.writer = writer
        self.budget = budget
        self.clips = clips
        self.counters = counters
        self.clock = clock
        self.on_clip_ack = on_clip_ack  # (run, version) -> writer job storing it, or None
        self.operator = operator  # answers an operator stream's command
        self.runs: dict[str, Run] = {}
        self._durable_job = 0  # every writer job <= this has been flushed
        self.stopping = False  # shutdown: frames are refused, UNAVAILABLE
        self.busy_s = 0.0  # event-loop thread CPU seconds in receive()
        self.schema_s = 0.0  # ... of which registering schemas (once per run)

    # ---- frames ---------------------------------------------------------------------------
    def receive(self, conn: Conn, frame: pb.ClientFrame) -> None:
        """Apply one frame; raises a CollectorError (translated to a status by the caller).
        Its time is summed in busy_s, schema registration also in schema_s (logged at
        shutdown as per-step receive time and once-per-run schema time; benchmarks read it)."""
        t0 = time.thread_time()
        try:
            return self._receive(conn, frame)
        finally:
            self.busy_s += time.thread_time() - t0

    def _receive(self, conn: Conn, frame: pb.ClientFrame) -> None:
        kind = frame.WhichOneof("kind")
        self.counters.add("frames")
        if self.stopping:
            raise Unavailable("collector shutting down; reconnect and resend what is not acked")
        if conn.run is None:
            if kind != "hello":
                raise InvalidArgument(
                    f"the first frame of a stream must be Hello, got {kind or 'an empty frame'}"
                )
            if frame.hello.client_version == OPERATOR_CLIENT and self.operator is not None:
                conn.reply(self.operator(frame.hello))  # the answer, then goodbye
                conn.finish()
                return None
            return self._hello(conn, frame.hello)
        if kind is None or kind == "hello":
            raise InvalidArgument("Hello only opens a stream" if kind else "empty ClientFrame")
        msg = getattr(frame, kind)
        h = msg.header
        if h.run != conn.run or h.rank != conn.rank:
            raise InvalidArgument(
                f"{kind} header names run {h.run!r} rank {h.rank}, but this "
                f"stream said Hello as run {conn.run!r} rank {conn.rank}"
            )
        if h.seq == 0:
            raise InvalidArgument(f"{kind} has seq 0; seq counts frames from 1")
        run = self.runs[conn.run]
        acks = run.acks[conn.rank]
        if acks.is_duplicate(h.seq):
            self.counters.add("frames_duplicate")
            conn.send_ack(acks.acked, acks.durable_step)
            return
        resend = acks.is_resend(h.seq)
        if kind == "schema":
            self._schema(run, conn.rank, msg, acks)
        elif kind == "chunk" and msg.ends_step:
            self._chunk_ending_step(run, conn.rank, msg, acks, resend)
        elif kind == "chunk":
            self._chunk(run, conn.rank, msg, acks, resend)
        elif kind == "end_of_step":
            self._end_of_step(run, conn.rank, msg, acks)
        else:
            self.clips.record_ack(run.name, conn.rank, msg.version, h.step)
            self.counters.add("clip_acks")
            job = self.on_clip_ack(run.name, msg.version) if self.on_clip_ack else None
            if job is None:
                acks.received(h.seq)
            else:  # durable once its acked step is stored
                acks.in_job(h.seq, job)
        if acks.advance():
            self._send_ack(run, conn.rank)

    def _hello(self, conn: Conn, hello: pb.Hello) -> None:
        name, rank, world = check_hello(hello, self.config.max_world_size)
        run = self.runs.get(name)
        if run is None:
            run = self._new_run(name, world, hello.config_json)
        elif run.world_size != world:
            raise InvalidArgument(
                f"run {name!r} is live with world_size {run.world_size}; a "
                f"Hello with world_size {world} cannot join it"
            )
        elif run.finished:  # a rank came back: live again
            run.finished, run.finish_job = False, None
            self.writer.submit(OpenRun(run.info))
        conn.run, conn.rank = name, rank
        run.conns.setdefault(rank, set()).add(conn)
        run.said_goodbye.discard(rank)
        acks = run.acks.setdefault(rank, RankAcks())
        conn.welcome(acks.acked)
        latest = self.clips.latest(name)
        if latest is not None:
            conn.send_clip(latest)

    def _new_run(self, name: str, world: int, config_json: str) -> Run:
        if len(self.runs) >= self.config.max_runs:
            idle = [r for r in self.runs.values() if r.finished and not r.conns]
            if not idle:
                raise ResourceExhausted(
                    f"the collector already tracks {len(self.runs)} live "
                    f"runs (max_runs={self.config.max_runs})"
                )
            del self.runs[min(idle, key=lambda r: r.info.started_at).name]
        cfg = self.config
        info = RunInfo(run=name, world_size=world, config_json=config_json, started_at=time.time())
        run = self.runs[name] = Run(
            name=name,
            world_size=world,
            info=info,
            metrics=RunMetrics(
                name,
                max_metrics=cfg.max_metrics_per_run,
                max_schemas_per_rank=cfg.max_schemas_per_rank,
            ),
            barrier=StepBarrier(
                world,
                straggler_timeout_s=cfg.straggler_timeout_s,
                max_pending_steps=cfg.max_pending_steps,
                budget=self.budget,
            ),
        )
        self.writer.submit(OpenRun(info))
        return run

    def _schema(self, run: Run, rank: int, s: pb.Schema, acks: RankAcks) -> None:
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
        self.counters.add("metrics_registered", len(new_rows.name))
        acks.in_job(s.header.seq, self.writer.submit(WriteMetrics(run.name, new_rows)))

    def _chunk(self, run: Run, rank: int, c: pb.StepChunk, acks: RankAcks, resend: bool) -> None:
        ids, values = self._check_chunk(run, rank, c)
        self._apply_chunk(run, rank, c, ids, values, acks, resend)

    def _check_chunk(self, run: Run, rank: int, c: pb.StepChunk) -> tuple[np.ndarray, np.ndarray]:
        """Every check of a chunk against its schema; changes nothing. (id map, values)"""
        step = c.header.step
        if step < 0:
            raise InvalidArgument(f"StepChunk step must be >= 0, got {step}")
        ids = run.metrics.schema(rank, c.schema_id)
        nb = len(c.values)
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
        return ids, np.frombuffer(c.values, dtype="<f4")

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

    def _chunk_ending_step(
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
            self._poll(run)  # the chunk's in_step already holds its seq

    def _end_of_step(self, run: Run, rank: int, e: pb.EndOfStep, acks: RankAcks) -> None:
        step = e.header.step
        if step < 0:
            raise InvalidArgument(f"EndOfStep step must be >= 0, got {step}")
        if run.barrier.end_of_step(rank, step, e.n_values, e.wall_time, self.clock()):
            acks.in_step(e.header.seq, step)
            self._poll(run)
        else:
            acks.received(e.header.seq)

    # ---- steps out of the barrier --------------------------------------------------------
    def tick(self) -> None:
        """Straggler timeouts: called periodically by the server."""
        for run in self.runs.values():
            self._poll(run)

    def _poll(self, run: Run) -> None:
        for ready in run.barrier.poll(self.clock()):
            self._submit_step(run, ready)

    def _submit_step(self, run: Run, ready: ReadyStep) -> None:
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

    # ---- acks and control down ------------------------------------------------------------
    def on_flushed(self, through_job: int, failed: set[int]) -> None:
        """The writer made jobs <= through_job durable (except `failed`)."""
        self._durable_job = through_job
        for run in self.runs.values():
            for rank, acks in run.acks.items():
                if acks.flushed(through_job, failed):
                    self._send_ack(run, rank)
                self._settle(run, rank)

    def _send_ack(self, run: Run, rank: int) -> None:
        acks = run.acks[rank]
        acks.sent_at = self.clock()
        for conn in run.conns.get(rank, ()):
            conn.send_ack(acks.acked, acks.durable_step)
            self.counters.add("acks_sent")

    def _settle(self, run: Run, rank: int) -> None:
        """End the half-closed streams of a rank once all it sent is acked and, if the run
        is finishing, its finished status is durable too: a client whose close() returned OK
        can read everything back."""
        if not run.acks[rank].settled:
            return
        if run.finish_job is not None and run.finish_job > self._durable_job:
            return
        for conn in run.conns.get(rank, ()):
            if conn.half_closed:
                conn.finish()

    def keepalive(self) -> None:
        """Repeat the current Ack to ranks whose frames wait (for a slow rank, a flush): the
        seq does not move, but the client sees the collector alive and holding its data.
        A rank that got an Ack within keepalive_s (after a flush) is skipped: at thousands of
        ranks a repeat to each would cost as many stream writes as the flushes' acks, and the
        silence a client sees stays under 2 x keepalive_s."""
        now = self.clock()
        for run in self.runs.values():
            for rank, acks in run.acks.items():
                if (
                    acks.max_seq > acks.acked
                    and rank in run.conns
                    and now - acks.sent_at >= self.config.keepalive_s
                ):
                    self._send_ack(run, rank)

    def broadcast_clip(self, run: str, update: pb.ClipUpdate) -> None:
        r = self.runs.get(run)
        for conns in r.conns.values() if r else ():
            for conn in conns:
                conn.send_clip(update)

    # ---- stream lifecycle -----------------------------------------------------------------
    def half_close(self, conn: Conn) -> None:
        """The client sent its last frame. The stream stays open until all of it is acked;
        once every rank of the run said goodbye, pending steps are reduced and it finishes."""
        conn.half_closed = True
        run = self.runs.get(conn.run) if conn.run else None
        if run is None:
            conn.finish()
            return
        run.said_goodbye.add(conn.rank)
        if len(run.said_goodbye) == run.world_size:
            self._finish_run(run)
        self._settle(run, conn.rank)

    def detach(self, conn: Conn) -> None:
        run = self.runs.get(conn.run) if conn.run else None
        if run is not None:
            conns = run.conns.get(conn.rank)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del run.conns[conn.rank]

    def _finish_run(self, run: Run) -> None:
        if run.finished:
            return
        for ready in run.barrier.drain():
            self._submit_step(run, ready)
        run.finish_job = self.writer.submit(FinishRun(run.name))
        run.finished = True

    def end_streams(self, exc: BaseException) -> None:
        """Shutdown: every open stream ends with `exc`'s status after its pending acks."""
        for run in self.runs.values():
            for conns in run.conns.values():
                for conn in conns:
                    conn.fail(exc)

    def finish_all(self) -> None:
        """Shutdown: reduce whatever is pending (incomplete) and mark every run finished."""
        log.info(
            "ingest seconds: receive=%.3f schemas=%.3f", self.busy_s - self.schema_s, self.schema_s
        )
        for run in self.runs.values():
            self._finish_run(run)
