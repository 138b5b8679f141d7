"""Ingest: each rank's stream as the collector sees it. Event-loop thread only, so no locks.

    Hello       -> the run it joins (run.py; world size fixed per live run), Welcome(acked_seq),
                   the run's clip table
    Schema, StepChunk, EndOfStep -> steps.py: the registry, the barrier, the writer (a chunk
                   may also end its step: the Welcome says this collector takes that)
    ClipAck     -> the run's clip board (clipboard.py), and `on_clip_ack` (control.py), which
                   stores the acknowledged step

A stream whose Hello carries client_version OPERATOR_CLIENT is an operator's: its
config_json is one clip command (operator.py), answered (`operator`, control.py) with the
run's clip table and the end of the stream; it never joins the run.

Before a frame is applied, its header must name the stream's run and rank, and its seq and
step must pass trust.py's rules (gaps and rewinds refused, a resume point allowed, steps within
the run's window); a frame with seq <= acked is ignored and acked again. While the writer can
make nothing durable (the store away and the spool full) data frames are refused UNAVAILABLE.
Acks go out only after the writer reports what is durable (`on_flushed`) and are repeated to
ranks whose frames wait (`keepalive`); a half-closed stream ends once all it sent is acked,
and once every rank of a run said goodbye the run's pending steps are reduced and it finishes.

Runs: a run is created in memory by its first Hello but in the store only by its first data
frame (OpenRun), so a Hello alone leaves nothing behind; a run with no open stream is
evicted after run_idle_s (abandoned first if it had not finished), or at once if it never
sent data, or early when max_runs is reached (`evict_idle`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from collector.acks import RankAcks
from collector.barrier import ByteBudget, StepBarrier
from collector.clipboard import ClipBoard
from collector.config import CollectorConfig
from collector.conn import Conn
from collector.errors import (
    Aborted,
    AlreadyExists,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from collector.jobs import FinishRun, Forget, OpenRun
from collector.operator import OPERATOR_CLIENT
from collector.registry import RunMetrics, check_hello
from collector.run import Run
from collector.stats import Counters, RateLimitedLog
from collector.steps import Steps
from collector.trust import check_seq, check_step
from collector.writer import Writer
from proto.v1 import telemetry_pb2 as pb
from store.base import RunInfo

log = logging.getLogger(__name__)


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
        dict_budget: ByteBudget | None = None,
    ) -> None:
        self.config = config
        self.writer = writer
        self.budget = budget
        self.clips = clips
        self.counters = counters
        self.clock = clock
        self.on_clip_ack = on_clip_ack  # (run, version) -> writer job storing it, or None
        self.operator = operator  # answers an operator stream's command
        self.dict_budget = dict_budget or ByteBudget(
            config.max_dictionary_bytes,
            "max_dictionary_bytes",
            "the metric dictionaries of the runs this collector holds",
        )
        self.runs: dict[str, Run] = {}
        self._durable_job = 0  # every writer job <= this has been flushed
        self.stopping = False  # shutdown: frames are refused, UNAVAILABLE
        self.steps = Steps(config, writer, budget, counters, clock)  # what data frames do
        self.busy_s = 0.0  # event-loop thread CPU seconds in receive() (steps.schema_s of it)
        self._log = RateLimitedLog(log, config.reject_log_interval_s)
        self._next_idle_check = 0.0

    # ---- frames ---------------------------------------------------------------------------
    def receive(self, conn: Conn, frame: pb.ClientFrame) -> None:
        """Apply one frame; raises a CollectorError (translated to a status by the caller).
        Its time is summed in busy_s, schema registration also in steps.schema_s (logged at
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
        if conn.error is not None:  # superseded: its last frames in flight change nothing
            return None
        run = self.runs[conn.run]
        acks = run.acks[conn.rank]
        skipped = check_seq(conn, acks, kind, h.seq)
        if acks.is_duplicate(h.seq):
            self.counters.add("frames_duplicate")
            conn.last_seq = h.seq if kind != "schema" else conn.last_seq
            conn.send_ack(acks.acked, acks.durable_step)
            return
        if self.writer.saturated:
            self.counters.add("frames_unavailable")
            raise Unavailable(
                "the store is unavailable and the spool is full (or absent): nothing more can "
                "be made durable; this frame is not acknowledged: reconnect with backoff and "
                "resend what is not acked"
            )
        if kind in ("chunk", "end_of_step"):
            check_step(run.latest_step, h.step, self.config.max_step_ahead, kind)
        if skipped:  # once this frame is received, the frontier passes the skipped seqs
            self.counters.add("frames_skipped", skipped)
            self._log(
                logging.INFO,
                "rank %d of run %s resumes at seq %d: seqs %d..%d are not resent "
                "(acknowledged by an earlier collector, or dropped by the client)",
                conn.rank,
                run.name,
                h.seq,
                h.seq - skipped,
                h.seq - 1,
            )
        if not run.opened:  # its first data: now the run exists in the store
            run.opened = True
            self.writer.submit(OpenRun(run.info))
        resend = acks.is_resend(h.seq)
        if kind == "schema":
            self.steps.schema(run, conn.rank, msg, acks)
        elif kind == "chunk" and msg.ends_step:
            self.steps.chunk_ending_step(run, conn.rank, msg, acks, resend)
        elif kind == "chunk":
            self.steps.chunk(run, conn.rank, msg, acks, resend)
        elif kind == "end_of_step":
            self.steps.end_of_step(run, conn.rank, msg, acks)
        else:
            self.clips.record_ack(run.name, conn.rank, msg.version, h.step)
            self.counters.add("clip_acks")
            job = self.on_clip_ack(run.name, msg.version) if self.on_clip_ack else None
            if job is None:
                acks.received(h.seq)
            else:  # durable once its acked step is stored
                acks.in_job(h.seq, job)
        if kind != "schema":  # applied: the stream's seqs move on (a rejected frame moves nothing)
            conn.last_seq = h.seq
        if kind in ("chunk", "end_of_step"):
            run.latest_step = max(run.latest_step, h.step)
        if acks.advance():
            self._send_ack(run, conn.rank)

    def _hello(self, conn: Conn, hello: pb.Hello) -> None:
        name, rank, world = check_hello(hello, self.config.max_world_size)
        session = hello.session
        run = self.runs.get(name)
        try:
            if run is None:
                run = self._new_run(name, world, hello.config_json)
            elif run.world_size != world:
                raise InvalidArgument(
                    f"run {name!r} is live with world_size {run.world_size}; a "
                    f"Hello with world_size {world} cannot join it"
                )
            self._claim_identity(run, rank, session)
        except (AlreadyExists, ResourceExhausted):
            self.counters.add("hellos_refused")
            raise
        if run.finished:  # a rank came back: live again (OpenRun with its first data)
            run.finished, run.finish_job, run.opened = False, None, False
        conn.run, conn.rank, conn.session = name, rank, session
        run.conns.setdefault(rank, set()).add(conn)
        run.idle_since = None
        run.said_goodbye.discard(rank)
        acks = run.acks.setdefault(rank, RankAcks())
        known = run.sessions.get(rank)
        run.sessions[rank] = session
        # A new client of this rank numbers its frames above every seq the rank has used, so
        # they can never be taken for resends of the previous client's (trust.py).
        fresh = bool(session) and known is not None and known != session
        conn.welcome(acks.max_seq if fresh else acks.acked)
        latest = self.clips.latest(name)
        if latest is not None:
            conn.send_clip(latest)

    def _claim_identity(self, run: Run, rank: int, session: str) -> None:
        """trust.py's identity rule: the same session takes over its own open streams;
        another client of an identity that is streaming is refused."""
        live = [c for c in run.conns.get(rank, ()) if c.error is None and not c.done]
        if not live:
            return
        if session and all(c.session == session for c in live):
            for c in live:
                c.fail(Aborted("superseded by a newer stream of the same client"))
                run.conns[rank].discard(c)
                self.counters.add("streams_superseded")
            return
        other = live[0]
        raise AlreadyExists(
            f"rank {rank} of run {run.name!r} is already streaming (from {other.peer}, for "
            f"{self.clock() - other.opened_at:.0f} s, client session "
            f"{other.session[:8] or 'unnamed'}): a second job cannot join a run with an "
            "identity that is in use. Give it another run name, or stop the first job (a "
            "restarted job may rejoin once the first one's streams have ended)"
        )

    def _new_run(self, name: str, world: int, config_json: str) -> Run:
        if len(self.runs) >= self.config.max_runs:
            idle = [r for r in self.runs.values() if not r.conns]
            if not idle:
                raise ResourceExhausted(
                    f"the collector already tracks {len(self.runs)} runs with open streams "
                    f"(max_runs={self.config.max_runs})"
                )
            self._evict(min(idle, key=lambda r: r.idle_since or 0.0), "max_runs reached")
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
                budget=self.dict_budget,
            ),
            barrier=StepBarrier(
                world,
                straggler_timeout_s=cfg.straggler_timeout_s,
                max_pending_steps=cfg.max_pending_steps,
                budget=self.budget,
            ),
        )
        return run

    # ---- steps out of the barrier, idle runs ------------------------------------------------
    def tick(self) -> None:
        """Straggler timeouts, and (once a second) idle runs: called periodically."""
        for run in self.runs.values():
            self.steps.poll(run)
        now = self.clock()
        if now >= self._next_idle_check:
            self._next_idle_check = now + min(1.0, self.config.run_idle_s / 4)
            self.evict_idle(now)

    def evict_idle(self, now: float) -> None:
        """Evict every run none of whose ranks has had a stream for run_idle_s."""
        for run in list(self.runs.values()):
            if not run.conns and run.idle_since is not None:
                if now - run.idle_since >= self.config.run_idle_s:
                    self._evict(run, f"no stream for {self.config.run_idle_s:.0f} s")

    def _evict(self, run: Run, why: str) -> None:
        """Forget a run with no open stream. Unfinished, it is abandoned first: its pending
        steps are reduced as incomplete and its status stored as "abandoned". Its data stays
        in the store; a rank that comes back later starts it afresh (trust.py's resume)."""
        if run.opened and not run.finished:
            self.steps.drain(run)
            self.writer.submit(FinishRun(run.name, "abandoned"))
            self.counters.add("runs_abandoned")
            log.warning("run %s abandoned (%s): evicted, its data stays readable", run.name, why)
        elif run.opened:
            log.info("run %s evicted (%s)", run.name, why)
        self.writer.submit(Forget(run.name))
        run.metrics.release()
        del self.runs[run.name]
        self.counters.add("runs_evicted")

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
        if run is None:
            return
        conns = run.conns.get(conn.rank)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del run.conns[conn.rank]
        if not run.conns:
            run.idle_since = self.clock()
            if not run.opened and not self.stopping:  # a Hello and nothing else: forget it
                self._evict(run, "it sent no data")

    def _finish_run(self, run: Run) -> None:
        if run.finished:
            return
        self.steps.drain(run)
        if run.opened:
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
            "ingest seconds: receive=%.3f schemas=%.3f",
            self.busy_s - self.steps.schema_s,
            self.steps.schema_s,
        )
        for run in self.runs.values():
            self._finish_run(run)
