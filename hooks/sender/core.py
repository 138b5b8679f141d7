"""The sender's protocol, shared by every driver: seq, buffer, resend, acks, staleness, Welcome.

A driver (hooks/sender/threaded.py for a training process; the load generator's asyncio one in
benchmarks/channel_sender.py) owns the waiting: it connects, runs the stream, and calls into
this core at each protocol step. Everything the collector sees is decided here, so both drivers
send the same frames with the same seqs.

Sequence numbers start at Welcome.acked_seq + 1 on the client's first connection (1 for a new
run; a restarted trainer continues after what the collector already holds). Schemas keep the seq
they first had and are re-sent on every connection. A step's seq is assigned at its first
transmission, so a step dropped before it was sent leaves no gap. A step's last chunk also ends
the step (one frame less) on a connection whose Welcome says the collector takes that form; a
frame is built once, for the connection it is first sent on, and resent as built, except that a
reconnect to a collector without the capability splits such chunks back into chunk + EndOfStep
(frames.split_ends_step, renumbering what is unacknowledged). Where the Welcome says
takes_batches, the frames waiting to go out when the stream can take more (a backlog: the
collector or the network is slower than the steps) leave as FrameBatch messages, one per
~1 MiB; each frame keeps its seq and is acked and resent on its own, so a batch is a matter of
transport only and costs no latency: an idle stream sends each frame as it comes. Where the
Welcome also gives send_interval_ms (a collector pacing thousands of streams), a stream sends
at most one message per interval: frames that come sooner wait for it to end and leave as one
FrameBatch; close never waits for it. A stream that leaves frames
unacknowledged for net_timeout_s is declared dead and reopened. At close, where the Welcome says
flushes_at_goodbye, the stream is half-closed as soon as everything is sent (the collector then
flushes at once and acks); elsewhere only once everything is acknowledged. Nothing here raises
into the caller.

Failures: a stream that ends with a transient status (UNAVAILABLE, a dead stream, a collector
shutting down) is reopened after an exponential backoff with jitter (`Backoff`), which resets
only once a connection has made progress (an Ack), so a collector that accepts and then drops
every stream is retried less and less often too. A permanent one (`is_permanent`: a bad token,
missing operator rights, an invalid frame, a bound that a resend cannot get under) stops the
sender for good: one error in the log, `stats()['fatal_error']`, every later step counted as
dropped. Steps the buffer dropped are reported to the collector as holes (StepsDropped) once a
connection whose Welcome takes them is up; the report takes a seq and is resent until acked.

Locking: one re-entrant condition (the buffer's, hooks/buffer.py) guards the buffer, the
counters and the connection state; every thread or task of a driver takes it.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc

from hooks import frames
from hooks.buffer import AckItem, SchemaItem, StepBuffer, StepItem
from hooks.config import MonitorConfig
from hooks.layout import MetricSpec
from hooks.schemas import in_form, part_layouts, schema_form, wire_layout, wire_schemas
from hooks.schemas import schema as schema_frame
from proto import auth
from proto.v1 import telemetry_pb2 as pb

log = logging.getLogger("stepwatch.hooks")

# Statuses no resend can cure. RESOURCE_EXHAUSTED is transient (a rank too far ahead, a full
# collector) unless the collector's Error says permanent or gRPC refused the message's size.
PERMANENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
TOO_LARGE = "larger than max"  # gRPC's own message-size refusal, either end


def is_permanent(code: grpc.StatusCode, details: str, server_says: bool = False) -> bool:
    """Whether a stream that ended with `code` must not be reopened."""
    return server_says or code in PERMANENT_CODES or TOO_LARGE in (details or "")


class Backoff:
    """Reconnect waits: nominal initial * 2^n up to max, each drawn from [1/2, 1] of it."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self._nominal = initial_s
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The wait before the next attempt; the one after it doubles."""
        wait = self._nominal * self._rng.uniform(0.5, 1.0)
        self._nominal = min(self._nominal * 2, self.max_s)
        return wait

    def reset(self) -> None:
        """A connection made progress: the next outage starts from the initial wait."""
        self._nominal = self.initial_s


@dataclass(eq=False)
class Conn:
    """One stream's state (a driver may add its transport to it)."""

    call: Any = None  # the gRPC call: a driver's stream object
    welcomed: bool = False
    acked: int = 0
    chunk_ends_step: bool = False  # Welcome: the last chunk may end the step
    takes_dropped: bool = False  # Welcome: hole reports (StepsDropped) are understood
    takes_packed_schema: bool = False  # Welcome: Schema.packed (PackedMetrics) is understood
    takes_mean_nonzero: bool = False  # Welcome: ReduceOp REDUCE_MEAN_NONZERO is understood
    takes_batches: bool = False  # Welcome: FrameBatch (several frames in one message) is understood
    flushes_at_goodbye: bool = False  # Welcome: a half-close may come before the last acks
    send_interval_s: float = 0.0  # Welcome.send_interval_ms (with takes_batches): pacing
    next_send_at: float = 0.0  # monotonic: the earliest next message under pacing
    half_closed: bool = False  # this client half-closed the stream (its goodbye)
    progressed: bool = False  # an Ack arrived on it: the backoff starts over
    refused: tuple[str, str, bool] | None = None  # the collector's Error: code, message, permanent
    dead: bool = False
    last_progress: float = field(default_factory=time.monotonic)


ConnT = TypeVar("ConnT", bound=Conn)


class SenderCore(Generic[ConnT]):
    """The protocol state of one rank's sender; a driver subclass starts and runs it."""

    def __init__(
        self,
        target: str,
        ident: frames.Identity,
        schemas: Sequence[tuple[int, Sequence[MetricSpec]]],
        config: MonitorConfig,
        token: str | None = None,
        run_config: dict | None = None,
        on_clip: Callable[[pb.ClipUpdate], None] | None = None,
    ) -> None:
        self.ident, self.config = ident, config
        # A tier's collectors: this rank prefers entry rank % len and moves to the next one
        # after each connection that failed or ended (README "Scale-out").
        self.targets = target.split(",")
        self._target_i = ident.rank % len(self.targets)
        self._schemas = wire_schemas(schemas)  # cut where a Schema would be too big
        self._parts = part_layouts(self._schemas)
        self._metadata = auth.bearer(token)
        self.session = uuid.uuid4().hex  # the same on every reconnect of this client
        self._hello = frames.hello(ident, run_config or {}, self.session, len(self.targets))
        self._on_clip = on_clip
        self.buffer = StepBuffer(
            config.buffer_steps,
            config.full_policy,
            config.block_timeout_s,
            capacity_bytes=config.buffer_bytes,
            log_interval_s=config.drop_log_interval_s,
            label=f"run {ident.run!r} rank {ident.rank}",
        )
        self._cond = self.buffer.cond
        self.backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
        self.fatal_error: str | None = None  # set once by a permanent error
        self._schema_frames: list[pb.ClientFrame] | None = None
        self._next_seq = 0  # set from the first Welcome
        self._conn: ConnT | None = None
        self._stop = False
        self._goodbye = False  # close half-closed the stream: never reconnect after it

    # ------------------------------------------------------------------ training thread
    def submit(self, item: StepItem) -> bool:
        """Buffer one step; False when the full policy dropped it (counted)."""
        ok = self.buffer.submit(item)
        self._wake()
        return ok

    def submit_clip_ack(self, step: int, version: int) -> None:
        self.buffer.submit_control(AckItem(step, version))
        self._wake()

    def add_schema(self, schema_id: int, specs: Sequence[MetricSpec]) -> None:
        """Register one more schema mid-run (before submitting a step that uses it): it is
        sent in order with the steps, and again first on every reconnect."""
        wire = wire_schemas([(schema_id, specs)])
        with self._cond:
            self._parts.update(part_layouts(wire))  # how its steps' values are cut
        for sid, part in wire:
            self.buffer.submit_control(SchemaItem(sid, part))
        self._wake()

    def _wake(self) -> None:
        """Tell the driver's worker there is something to send (a thread waiting on the
        buffer's condition is woken by the buffer itself)."""

    def stats(self) -> dict:
        with self._cond:
            out = dict(self.buffer.counters)
            conn = self._conn
            out.update(
                buffered_steps=self.buffer.buffered(),
                buffered_bytes=self.buffer.buffered_bytes(),
                unacked_frames=len(self.buffer.unacked_frames()),
                connected=bool(conn and conn.welcomed and not conn.dead),
                holes_unreported=sum(b - a + 1 for a, b in self.buffer.drops.ranges),
            )
            if self.fatal_error is not None:
                out["fatal_error"] = self.fatal_error
            return out

    @property
    def stopped(self) -> bool:
        """A permanent error ended this sender (see fatal_error)."""
        return self.fatal_error is not None

    # ------------------------------------------------------------------ closing
    def _stop_now(self) -> tuple[int, ConnT | None]:
        """The end of a close: stop the worker; what is still buffered is lost (counted).
        Returns (lost steps, the connection whose call the driver cancels)."""
        with self._cond:
            self._stop = True
            lost = self.buffer.buffered()
            self.buffer.counters["lost_at_close"] += lost
            conn = self._conn
            self._cond.notify_all()
        return lost, conn

    def _closed(self, flushed: bool, lost: int) -> bool:
        self.buffer.log_drops()  # the counts of drops not logged yet
        if lost:
            log.warning(
                "stepwatch: closed with %d step(s) not acknowledged by %s", lost, self.target
            )
        return flushed and lost == 0 and self.fatal_error is None

    # ------------------------------------------------------------------ worker
    def _release_waiting(self) -> None:
        """While away, let finished device copies go back to their pinned pool."""
        try:
            for item in self.buffer.waiting_steps():
                item.values()
        except Exception:
            self.buffer.count("worker_errors")
            log.exception("stepwatch: could not copy a step to the host")

    def _settle_connect(self, conn: ConnT) -> bool:
        """After a connect attempt: True if it is live and welcomed; counted."""
        with self._cond:
            if conn.welcomed and not conn.dead:
                self.buffer.counters["connects"] += 1
                reconnect = self.buffer.counters["connects"] > 1
            else:
                self.buffer.counters["connect_failures"] += 1
                return False
        if reconnect:
            log.info("stepwatch: reconnected to %s", self.target)
        self.buffer.log_drops()  # what the outage cost, before it is reported
        return True

    @property
    def target(self) -> str:
        """The collector this rank connects to now."""
        return self.targets[self._target_i]

    def _next_wait(self, conn: ConnT | None) -> float:
        """The backoff before the next attempt, after `conn` (None: it never opened); the
        next attempt goes to the next collector of the list, if there are several."""
        if len(self.targets) > 1:
            self._target_i = (self._target_i + 1) % len(self.targets)
            log.info("stepwatch: rank %d fails over to %s", self.ident.rank, self.target)
        if conn is not None and conn.progressed:
            self.backoff.reset()
        return self.backoff.next()

    def _fail(self, code: str, message: str) -> None:
        """A permanent error: stop for good, with one error in the log (once per sender)."""
        with self._cond:
            if self.fatal_error is not None:
                return
            self.fatal_error = f"{code}: {message}"
            self._stop = True
            lost = self.buffer.stop()
            self._cond.notify_all()
        log.error(
            "stepwatch: the collector at %s refused run %r rank %d for good (%s: %s); "
            "telemetry is off for the rest of this run, %d buffered step(s) dropped; "
            "training continues",
            self.target,
            self.ident.run,
            self.ident.rank,
            code,
            message,
            lost,
        )

    def _mark_dead(self, conn: ConnT) -> None:
        with self._cond:
            conn.dead = True
            if self._conn is conn:
                self._conn = None
        if conn.call is not None:
            conn.call.cancel()

    def _resume(self, conn: ConnT) -> list[pb.ClientFrame]:
        """After Welcome: the schemas and every unacknowledged frame, to send first."""
        with self._cond:
            form = conn.takes_packed_schema, conn.takes_mean_nonzero
            if self._schema_frames is None:  # first connection of this client
                self._next_seq = conn.acked
                self._schema_frames = [
                    schema_frame(self.ident, self._alloc_seq(), sid, specs, *form)
                    for sid, specs in self._schemas
                ]
            elif not all(in_form(f, *form) for f in self._schema_frames):
                # a collector that takes another form now: the same schemas, same seqs
                self._schema_frames = [schema_form(f, *form) for f in self._schema_frames]
                self.buffer.counters["schemas_reencoded"] += 1
            self.buffer.ack(conn.acked)  # durable already: never resent
            resend = self.buffer.unacked_frames()
            if any(f.WhichOneof("kind") == "schema" for f in resend):
                resend = [
                    schema_form(f, *form) if f.WhichOneof("kind") == "schema" else f for f in resend
                ]
                self.buffer.replace_unacked(resend)
            if not conn.chunk_ends_step and any(map(frames.folds_end, resend)):
                resend = frames.split_ends_step(resend)  # an older collector now
                self.buffer.replace_unacked(resend)
                self._next_seq = max(self._next_seq, frames.seq_of(resend[-1]))
                self.buffer.counters["resends_split"] += 1
            conn.last_progress = time.monotonic()
        self.buffer.count("frames_resent", len(resend))
        return self._schema_frames + resend

    def _stale(self, conn: ConnT) -> bool:
        """Frames unacknowledged for net_timeout_s: the stream is declared dead (caller holds
        the lock)."""
        timeout = self.config.net_timeout_s
        if self.buffer.has_unacked() and time.monotonic() - conn.last_progress > timeout:
            self.buffer.counters["stale_streams"] += 1
            log.warning("stepwatch: no ack from %s for %.1f s; reconnecting", self.target, timeout)
            return True
        return False

    def _alloc_seq(self) -> int:
        self._next_seq += 1
        return self._next_seq

    def _holes(self, conn: ConnT) -> list[pb.ClientFrame]:
        """The hole report for drops not yet reported, recorded as sent (worker only); none
        towards a collector that does not take them (they stay counted)."""
        with self._cond:
            if not conn.takes_dropped or not self.buffer.drops.ranges:
                return []
            ranges = self.buffer.drops.take()
            frame = frames.steps_dropped(
                self.ident, self._alloc_seq(), ranges, self.buffer.drops.total, "buffer_full"
            )
            self.buffer.record_sent([frame], False)
            self.buffer.counters["holes_reported"] += sum(b - a + 1 for a, b in ranges)
            self.buffer.counters["frames_sent"] += 1
        return [frame]

    def _has_holes(self, conn: ConnT) -> bool:
        return conn.takes_dropped and bool(self.buffer.drops.ranges)

    def _goodbye_due(self, conn: ConnT) -> bool:
        """Closing, and everything is sent on a connection whose collector takes an early
        goodbye (Welcome.flushes_at_goodbye): half-close now, so the collector makes the last
        frames durable at once rather than at its next flush tick (caller holds the lock)."""
        return (
            self.buffer.closing
            and conn.flushes_at_goodbye
            and not conn.half_closed
            and self.buffer.all_sent()
            and not self._has_holes(conn)
        )

    def _settle_goodbye(self, conn: ConnT) -> None:
        """A stream this client half-closed has ended: with everything acknowledged that was
        the goodbye (never reconnect); otherwise it broke first and the worker reconnects and
        resends, half-closing again once all is sent."""
        with self._cond:
            if conn.half_closed and self.buffer.drained():
                self._goodbye = True
                self._cond.notify_all()

    def _encode(self, conn: ConnT, item: StepItem | AckItem | SchemaItem) -> list[pb.ClientFrame]:
        """Encode outside the lock (only the worker allocates seqs), then record as sent.
        Until then the popped item still counts as buffered (close waits for it)."""
        try:
            return self._encode_item(conn, item)
        finally:
            self.buffer.release()

    def _encode_item(
        self, conn: ConnT, item: StepItem | AckItem | SchemaItem
    ) -> list[pb.ClientFrame]:
        is_step = isinstance(item, StepItem)
        if isinstance(item, SchemaItem):
            frame = schema_frame(
                self.ident,
                self._alloc_seq(),
                item.schema_id,
                item.specs,
                conn.takes_packed_schema,
                conn.takes_mean_nonzero,
            )
            with self._cond:
                assert self._schema_frames is not None  # set by _resume before any item
                self._schema_frames.append(frame)  # resent first after a reconnect
                self.buffer.record_sent([frame], False)
                self.buffer.counters["schemas_added"] += 1
            return [frame]
        if isinstance(item, StepItem):
            layout = wire_layout(item.schemas, self._parts)
            payload = frames.StepPayload(item.step, item.values(), layout, item.wall_time)
            out = frames.step_frames(  # looked up on the module: the load generator times it
                self.ident,
                payload,
                self.config.chunk_values,
                self._alloc_seq,
                chunk_ends_step=conn.chunk_ends_step,
            )
        else:
            out = [frames.clip_ack(self.ident, item.step, item.version, self._alloc_seq())]
        with self._cond:
            if not self.buffer.has_unacked():
                conn.last_progress = time.monotonic()  # the ack clock starts now
            self.buffer.record_sent(out, is_step)
            self.buffer.counters["steps_sent" if is_step else "clip_acks_sent"] += 1
            self.buffer.counters["frames_sent"] += len(out)
        return out

    def _pace_s(self, conn: ConnT) -> float:
        """Seconds this stream's next message must still wait (Welcome.send_interval_ms): 0
        when it is not paced, its interval is over, or the sender is closing (close flushes
        at once)."""
        if not conn.send_interval_s or self.buffer.closing:
            return 0.0
        return max(0.0, conn.next_send_at - time.monotonic())

    def _burst(self, conn: ConnT, item: StepItem | AckItem | SchemaItem) -> list[pb.ClientFrame]:
        """`item`'s frames and, where the collector takes batches, those of every item
        waiting behind it up to one FrameBatch's bytes (a backlog, or what pacing held back),
        encoded and recorded as sent; starts the stream's next pacing interval."""
        out: list[pb.ClientFrame] = []
        size = 0
        next_item: StepItem | AckItem | SchemaItem | None = item
        while next_item is not None:
            encoded = self._encode(conn, next_item)
            out += encoded
            size += sum(map(frames.wire_size, encoded))
            if not conn.takes_batches or size >= frames.BATCH_BYTES:
                break
            with self._cond:
                next_item = self.buffer.pop()
        conn.next_send_at = time.monotonic() + conn.send_interval_s
        return out

    def _messages(self, conn: ConnT, sent: list[pb.ClientFrame]) -> list[pb.ClientFrame]:
        """What goes on the wire for `sent`: FrameBatch messages where the collector takes
        them (frames.batched), else the frames one by one."""
        if not conn.takes_batches or len(sent) < 2:
            return sent
        out = frames.batched(sent)
        self.buffer.count("batches_sent", sum(m.WhichOneof("kind") == "batch" for m in out))
        return out

    # ------------------------------------------------------------------ reader
    def _reader_error(self) -> None:
        self.buffer.count("reader_errors")
        log.exception("stepwatch: reader error")

    def _reader_ended(self, conn: ConnT) -> None:
        """The stream's reader is gone: the connection is dead; wake waiters."""
        with self._cond:
            conn.dead = True
            self._cond.notify_all()

    def _receive(self, conn: ConnT, resp: pb.ServerFrame) -> None:
        kind = resp.WhichOneof("kind")
        if kind == "clip":
            self.buffer.count("clip_updates")
            self._deliver_clip(resp.clip)
            return
        with self._cond:
            if kind == "welcome":
                conn.acked, conn.welcomed = resp.welcome.acked_seq, True
                conn.chunk_ends_step = resp.welcome.chunk_ends_step
                conn.takes_dropped = resp.welcome.takes_dropped
                conn.takes_packed_schema = resp.welcome.takes_packed_schema
                conn.takes_mean_nonzero = resp.welcome.takes_mean_nonzero
                conn.takes_batches = resp.welcome.takes_batches
                conn.flushes_at_goodbye = resp.welcome.flushes_at_goodbye
                if conn.takes_batches:  # what waits goes as one FrameBatch: pace only then
                    conn.send_interval_s = resp.welcome.send_interval_ms / 1000
            elif kind == "ack":
                self.buffer.ack(resp.ack.seq)
                conn.last_progress = time.monotonic()
                conn.progressed = True
            elif kind == "error":  # the status follows: _stream_error decides what to do
                self.buffer.counters["server_errors"] += 1
                e = resp.error
                conn.refused = (e.code, e.message, e.permanent)
            self._cond.notify_all()

    def _stream_error(self, exc: grpc.RpcError, conn: ConnT | None = None) -> None:
        if self._stop or exc.code() == grpc.StatusCode.CANCELLED:
            return
        code, details = exc.code(), exc.details() or ""
        refused = conn.refused if conn is not None else None
        if refused is not None and refused[0] == code.name:
            details = refused[1] or details
        if is_permanent(code, details, bool(refused and refused[2])):
            self.buffer.count(f"status_{code.name}")
            self._fail(code.name, details)
            return
        key = f"status_{code.name}"
        with self._cond:
            self.buffer.counters["stream_errors"] += 1
            self.buffer.counters[key] += 1
            first = self.buffer.counters[key] == 1  # warn once per status, then quietly
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "stepwatch: stream to %s ended: %s %s (reconnecting with backoff)",
            self.target,
            code.name,
            details,
        )

    def _deliver_clip(self, update: pb.ClipUpdate) -> None:
        if self._on_clip is None:
            return
        try:
            self._on_clip(update)
        except Exception:
            self.buffer.count("clip_errors")
            log.exception("stepwatch: could not stage clip update %d", update.version)
