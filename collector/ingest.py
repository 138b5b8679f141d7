"""Ingest: each rank's stream as the collector sees it. Event-loop thread only, so no locks.

    Hello       -> the run it joins (run.py; world size fixed per live run), Welcome(acked_seq),
                   the run's clip table
    Schema, StepChunk, EndOfStep -> steps.py: the registry, the barrier, the writer (a chunk
                   may also end its step: the Welcome says this collector takes that)
    ClipAck     -> the run's clip board (clipboard.py), and `on_clip_ack` (control.py), which
                   stores the acknowledged step
    StepsDropped -> holes.py: the client's dropped steps, stored as events
    FrameBatch  -> each of its frames in order, as if sent one by one (a client's backlog
                   in one message; the Welcome says this collector takes that)

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

Which runs exist, the identity rule at Hello, and when a run is opened in the store, finished,
abandoned and evicted: runs.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from collector.barrier import ByteBudget
from collector.clipboard import ClipBoard
from collector.config import CollectorConfig
from collector.conn import Conn
from collector.errors import InvalidArgument, Unavailable
from collector.holes import steps_dropped
from collector.operator import OPERATOR_CLIENT
from collector.run import Run
from collector.runs import Runs
from collector.stats import Counters, RateLimitedLog
from collector.steps import Steps
from collector.trust import check_seq, check_step
from collector.writer import Writer
from proto.v1 import telemetry_pb2 as pb

log = logging.getLogger(__name__)
# receive()'s CPU is read on one call in this many and scaled: time.thread_time is a syscall
# (~0.7 us on this VM, and a point where a loaded machine deschedules the thread that holds the
# GIL); reading it twice per message showed as ~13% of the event loop's GIL-holding samples at
# 4,096 streams
RECEIVE_SAMPLE = 8
MUX_ONLY = ("goodbye",)  # ClientFrame kinds of multiplexed streams only (mux.py)


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
        self._durable_job = 0  # every writer job <= this has been flushed
        self.stopping = False  # shutdown: frames are refused, UNAVAILABLE
        self.steps = Steps(config, writer, budget, counters, clock)  # what data frames do
        self.table = Runs(config, writer, self.steps, budget, self.dict_budget, counters, clock)
        self.runs = self.table.runs  # name -> Run, the one dict (runs.py owns its lifecycle)
        self.busy_s = 0.0  # event-loop thread CPU seconds in receive() less schemas (sampled)
        self._receives = 0
        self._log = RateLimitedLog(log, config.reject_log_interval_s)
        self._next_idle_check = 0.0

    # ---- frames ---------------------------------------------------------------------------
    def receive(self, conn: Conn, frame: pb.ClientFrame) -> None:
        """Apply one frame; raises a CollectorError (translated to a status by the caller).
        Its CPU time less schema registration's (steps.schema_s) is estimated in busy_s from
        one call in RECEIVE_SAMPLE, scaled (logged at shutdown as per-step receive time beside
        the once-per-run schema time; benchmarks read both)."""
        self._receives += 1
        if self._receives % RECEIVE_SAMPLE:
            return self._receive(conn, frame)
        t0, schema0 = time.thread_time(), self.steps.schema_s
        try:
            return self._receive(conn, frame)
        finally:
            spent = time.thread_time() - t0 - (self.steps.schema_s - schema0)
            self.busy_s += RECEIVE_SAMPLE * spent

    def _receive(self, conn: Conn, frame: pb.ClientFrame) -> None:
        kind = frame.WhichOneof("kind")
        if kind == "batch" and conn.run is not None:  # the Welcome said takes_batches
            self.counters.add("batches")
            for inner in frame.batch.frames:
                if inner.WhichOneof("kind") in ("batch", "hello"):
                    raise InvalidArgument(
                        f"a FrameBatch holds data frames only, not {inner.WhichOneof('kind')}"
                    )
                self._receive(conn, inner)
            return None
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
        if kind in MUX_ONLY:
            raise InvalidArgument(f"{kind} is for a node agent's multiplexed stream only")
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
        self.table.open(run)  # its first data: now the run exists in the store
        resend = acks.is_resend(h.seq)
        if kind == "schema":
            self.steps.schema(run, conn.rank, msg, acks)
        elif kind == "chunk" and msg.ends_step:
            self.steps.chunk_ending_step(run, conn.rank, msg, acks, resend)
        elif kind == "chunk":
            self.steps.chunk(run, conn.rank, msg, acks, resend)
        elif kind == "end_of_step":
            self.steps.end_of_step(run, conn.rank, msg, acks)
        elif kind == "dropped":  # a hole the client reports: stored as events (holes.py)
            steps_dropped(run.name, conn.rank, msg, acks, self.writer, self.counters)
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
        if acks.advance():  # a frame that needed no write (a known schema, a clip ack)
            self._ack(run, conn.rank, self._interval_s(run), self.clock())

    def _hello(self, conn: Conn, hello: pb.Hello) -> None:
        welcome = self.table.join(conn, hello)  # runs.py: the run, the identity rule
        run = self.runs.get(conn.run or "")
        streams = self._paced_streams(hello)
        if run is not None:
            run.paced_streams = streams
        conn.welcome(welcome, self.config.send_interval_ms(streams))
        latest = self.clips.latest(conn.run or "")
        if latest is not None:
            conn.send_clip(latest)

    # ---- steps out of the barrier, idle runs ------------------------------------------------
    def tick(self) -> None:
        """Straggler timeouts, and (once a second) idle runs: called periodically."""
        now = self.clock()
        for run in self.runs.values():
            self.steps.poll(run)
            if run.acks_due:
                self._send_due_acks(run, now)
        if now >= self._next_idle_check:
            self._next_idle_check = now + min(1.0, self.config.run_idle_s / 4)
            self.table.evict_idle(now)

    # ---- acks and control down ------------------------------------------------------------
    def on_flushed(self, through_job: int, failed: set[int]) -> None:
        """The writer made jobs <= through_job durable (except `failed`)."""
        self._durable_job = through_job
        for run in self.runs.values():
            interval, now = self._interval_s(run), self.clock()
            for rank, acks in run.acks.items():
                if acks.flushed(through_job, failed):
                    self._ack(run, rank, interval, now)
                self._settle(run, rank)

    def _paced_streams(self, hello: pb.Hello) -> int:
        """The streams a run's pacing is for: its world, or on a collector in tier mode its
        share of it, world_size / the collectors the client's target list names (ranks
        spread over them by rank % N). Without the share each of N tiers would pace for the
        whole world: N times longer than its own streams need."""
        world = hello.world_size
        if self.config.coordinator and hello.collectors > 1:
            return -(-world // hello.collectors)
        return world

    def _interval_s(self, run: Run) -> float:
        """The run's pacing interval in seconds (its ranks' Welcome.send_interval_ms; 0: none)."""
        return self.config.send_interval_ms(run.paced_streams or run.world_size) / 1000

    def _ack(self, run: Run, rank: int, interval: float, now: float) -> None:
        """The rank's ack moved: send it, or (paced, within `interval` of the last one, the
        rank not closing) hold it for tick() to send once the interval is over."""
        if interval and now - run.acks[rank].sent_at < interval and rank not in run.said_goodbye:
            run.acks_due.add(rank)
        else:
            self._send_ack(run, rank)

    def _send_ack(self, run: Run, rank: int) -> None:
        acks = run.acks[rank]
        acks.sent_at = self.clock()
        run.acks_due.discard(rank)
        for conn in run.conns.get(rank, ()):
            conn.send_ack(acks.acked, acks.durable_step)
            self.counters.add("acks_sent")

    def _send_due_acks(self, run: Run, now: float) -> None:
        """Ack pacing: a flush acks a rank at most once per its send interval (the Welcome's
        send_interval_ms), so that at thousands of ranks each flush is not thousands of
        stream writes; an ack held back goes here once the interval has passed (a rank that
        says goodbye gets its held ack in half_close, and none is held after it)."""
        interval = self._interval_s(run)
        for rank in [r for r in run.acks_due if now - run.acks[r].sent_at >= interval]:
            self._send_ack(run, rank)

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
        silence a client sees stays under 2 x keepalive_s. A paced run's ranks (Welcome's
        send_interval_ms, at most 5 s) get it once per interval instead, so that pacing holds
        for the repeats too: under 5 s + keepalive_s of silence, within a client's 10 s
        net_timeout_s."""
        now = self.clock()
        for run in self.runs.values():
            every = max(self.config.keepalive_s, self._interval_s(run))
            for rank, acks in run.acks.items():
                if acks.max_seq > acks.acked and rank in run.conns and now - acks.sent_at >= every:
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
        if conn.rank in run.acks_due:  # nothing is held back from a rank that is closing
            self._send_ack(run, conn.rank)
        if run.barrier.all_in(run.said_goodbye):
            self._finish_run(run)
        # nothing more comes from this rank: what it sent is made durable (and acked) now,
        # not at the next flush tick (its Welcome said flushes_at_goodbye: it may half-close
        # before its last acks)
        self.writer.flush_soon()
        self._settle(run, conn.rank)

    def detach(self, conn: Conn) -> None:
        self.table.detach(conn, forget_empty=not self.stopping)

    def _finish_run(self, run: Run) -> None:
        self.table.finish(run)

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
            self.busy_s,
            self.steps.schema_s,
        )
        for run in self.runs.values():
            self._finish_run(run)
