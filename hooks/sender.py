"""The background sender: one gRPC bidirectional stream per rank, fed from the StepBuffer.

Threads
  training thread  `submit()` / `submit_clip_ack()` only append to the buffer (hooks/buffer.py;
                   under the "block" policy they wait at most block_timeout_s, never longer);
  worker           owns the connection: connects, waits for Welcome, (re)sends the schemas and
                   the unacknowledged frames, then turns buffered steps into frames, assigning
                   seq at first transmission (so a step dropped before it was sent leaves no
                   gap); reconnects with exponential backoff after any stream error;
  reader           one per connection: Welcome, Ack (frees buffer space), ClipUpdate (handed to
                   `on_clip`), Error; its end marks the connection dead;
  gRPC's own thread consumes the request iterator fed from the worker's queue.

Channel mode (`channel=` a grpc.aio.Channel, created on its event loop): no thread at all. The
worker and reader are two tasks on that loop and the stream is written with `call.write`, so
thousands of senders share one channel and one thread (the ingest benchmark's load generator).
The protocol (seq, buffer, resend, acks, backoff, staleness) is the same code as the threaded
driver's; only the waiting differs. On the loop, `await wait_space()` before `submit()` (a full
buffer under the "block" policy would block the loop that delivers the acks) and `await
aclose()` instead of `close()`.

Sequence numbers start at Welcome.acked_seq + 1 on the client's first connection (1 for a new
run; a restarted trainer continues after what the collector already holds). Schemas keep the seq
they first had and are re-sent on every connection. A step's last chunk also ends the step
(one frame less) on a connection whose Welcome says the collector takes that form; a frame is
built once, for the connection it is first sent on, and resent as built, except that a
reconnect to a collector without the capability splits such chunks back into chunk +
EndOfStep (frames.split_ends_step, renumbering what is unacknowledged). A stream that leaves
frames unacknowledged for net_timeout_s is declared dead and reopened. Nothing here raises into
the caller.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from hooks import frames
from hooks.buffer import AckItem, StepBuffer, StepItem
from hooks.config import MonitorConfig
from hooks.layout import MetricSpec
from proto.v1 import telemetry_pb2 as pb
from proto.v1 import telemetry_pb2_grpc as pbg

log = logging.getLogger("stepwatch.hooks")
__all__ = ["Sender", "StepItem", "AckItem"]


@dataclass(eq=False)
class _Conn:
    channel: grpc.Channel | grpc.aio.Channel
    out_q: queue.Queue | None = None  # threaded driver only
    call: Any = None
    welcomed: bool = False
    acked: int = 0
    chunk_ends_step: bool = False  # Welcome: the last chunk may end the step
    dead: bool = False
    last_progress: float = field(default_factory=time.monotonic)


def _requests(conn: _Conn):
    """The request iterator gRPC consumes: whatever the worker queued, until the sentinel."""
    while True:
        try:
            frame = conn.out_q.get(timeout=0.5)
        except queue.Empty:
            if conn.dead:
                return
            continue
        if frame is None:
            return
        yield frame


class Sender:
    def __init__(
        self,
        target: str,
        ident: frames.Identity,
        schemas: Sequence[tuple[int, Sequence[MetricSpec]]],
        config: MonitorConfig,
        token: str | None = None,
        run_config: dict | None = None,
        on_clip: Callable[[pb.ClipUpdate], None] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.target, self.ident, self.config = target, ident, config
        self._schemas = frames.wire_schemas(schemas)  # split where a Schema would be too big
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._hello = frames.hello(ident, run_config or {})
        self._on_clip, self._credentials = on_clip, credentials
        self.buffer = StepBuffer(config.buffer_steps, config.full_policy, config.block_timeout_s)
        self._cond = self.buffer.cond
        self._schema_frames: list[pb.ClientFrame] | None = None
        self._next_seq = 0  # set from the first Welcome
        self._conn: _Conn | None = None
        self._stop = False
        self._goodbye = False  # close() half-closed the stream: never reconnect after it
        self._channel = channel
        if channel is None:
            self._thread = threading.Thread(
                target=self._run, daemon=True, name=f"stepwatch-sender-{ident.run}-r{ident.rank}"
            )
            self._thread.start()
            return
        if not isinstance(channel, grpc.aio.Channel):
            raise TypeError(
                f"Sender(channel=...) takes a grpc.aio.Channel, got {type(channel).__name__}"
            )
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "Sender(channel=...) must be created on the event loop that runs the channel"
            ) from None
        self._loop_thread = threading.get_ident()
        self._work = asyncio.Event()  # the worker: a step to send, a dead stream, stop
        self._progress = asyncio.Event()  # the others: Welcome, acks, closing, a dead stream
        self._stub = pbg.TelemetryStub(channel)
        self._task = self._loop.create_task(
            self._run_async(), name=f"stepwatch-sender-r{ident.rank}"
        )

    # ------------------------------------------------------------------ training thread
    def submit(self, item: StepItem) -> bool:
        """Buffer one step; False when the full policy dropped it (counted)."""
        ok = self.buffer.submit(item)
        if self._channel is not None:
            self._wake()
        return ok

    def submit_clip_ack(self, step: int, version: int) -> None:
        self.buffer.submit_control(AckItem(step, version))
        if self._channel is not None:
            self._wake()

    def stats(self) -> dict:
        with self._cond:
            out = dict(self.buffer.counters)
            conn = self._conn
            out.update(
                buffered_steps=self.buffer.buffered(),
                unacked_frames=len(self.buffer.unacked_frames()),
                connected=bool(conn and conn.welcomed and not conn.dead),
            )
            return out

    def close(self, timeout: float) -> bool:
        """Flush: wait up to `timeout` for every buffered step to be acknowledged, then stop.
        Returns True when nothing was left behind."""
        if self._channel is not None:
            raise RuntimeError("a Sender in channel mode closes with `await aclose(timeout)`")
        deadline = time.monotonic() + timeout
        with self._cond:
            self.buffer.closing = True
            self._cond.notify_all()
            flushed = self._cond.wait_for(
                lambda: self.buffer.drained() or not self._thread.is_alive(), timeout=timeout
            )
            conn = self._conn
            self._goodbye = flushed and conn is not None and not conn.dead
        if self._goodbye:
            # Half-close the stream: the collector answers OK once everything of this rank is
            # durable, and finishes the run when every rank has said goodbye. A cancel (below)
            # would leave the run "live" until the collector stops.
            conn.out_q.put(None)
            with self._cond:
                if not self._cond.wait_for(
                    lambda: conn.dead, timeout=max(0.05, deadline - time.monotonic())
                ):
                    self.buffer.counters["goodbye_timeouts"] += 1
        with self._cond:
            self._stop = True
            lost = self.buffer.buffered()
            self.buffer.counters["lost_at_close"] += lost
            conn = self._conn
            self._cond.notify_all()
        if conn is not None and conn.call is not None:
            conn.call.cancel()
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()) + 1.0)
        if lost:
            log.warning(
                "stepwatch: closed with %d step(s) not acknowledged by %s", lost, self.target
            )
        return flushed and lost == 0

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        backoff = self.config.backoff_initial_s
        while not (self._stop or self._goodbye):
            conn = self._connect()
            if conn is not None:
                backoff = self.config.backoff_initial_s
                try:
                    self._serve(conn)
                except Exception:
                    self.buffer.count("worker_errors")
                    log.exception("stepwatch: sender error")
                self._drop_conn(conn)
            self._release_waiting()
            with self._cond:
                if not (self._stop or self._goodbye):
                    self._cond.wait(timeout=backoff)
            backoff = min(backoff * 2, self.config.backoff_max_s)

    def _release_waiting(self) -> None:
        """While away, let finished device copies go back to their pinned pool."""
        try:
            for item in self.buffer.waiting_steps():
                item.values()
        except Exception:
            self.buffer.count("worker_errors")
            log.exception("stepwatch: could not copy a step to the host")

    def _connect(self) -> _Conn | None:
        options = [("grpc.max_send_message_length", 8 << 20)]
        channel = (
            grpc.secure_channel(self.target, self._credentials, options=options)
            if self._credentials
            else grpc.insecure_channel(self.target, options=options)
        )
        conn = _Conn(channel, queue.Queue())
        conn.out_q.put(self._hello)
        self.buffer.count("connect_attempts")
        try:
            conn.call = pbg.TelemetryStub(channel).Stream(_requests(conn), metadata=self._metadata)
        except Exception:  # noqa: BLE001
            self._drop_conn(conn)
            return None
        with self._cond:
            self._conn = conn
        threading.Thread(
            target=self._read, args=(conn,), daemon=True, name="stepwatch-reader"
        ).start()
        with self._cond:
            self._cond.wait_for(
                lambda: conn.welcomed or conn.dead or self._stop, timeout=self.config.net_timeout_s
            )
        if self._settle_connect(conn):
            return conn
        self._drop_conn(conn)
        return None

    def _settle_connect(self, conn: _Conn) -> bool:
        """After a connect attempt (either driver): True if it is live and welcomed; counted."""
        with self._cond:
            if conn.welcomed and not conn.dead:
                self.buffer.counters["connects"] += 1
                return True
        self.buffer.count("connect_failures")
        return False

    def _mark_dead(self, conn: _Conn) -> None:
        with self._cond:
            conn.dead = True
            if self._conn is conn:
                self._conn = None
        if conn.call is not None:
            conn.call.cancel()

    def _drop_conn(self, conn: _Conn) -> None:
        self._mark_dead(conn)
        conn.out_q.put(None)
        conn.channel.close()

    def _resume(self, conn: _Conn) -> list[pb.ClientFrame]:
        """After Welcome: the schemas and every unacknowledged frame, to send first."""
        with self._cond:
            if self._schema_frames is None:  # first connection of this client
                self._next_seq = conn.acked
                self._schema_frames = [
                    frames.schema(self.ident, self._alloc_seq(), sid, specs)
                    for sid, specs in self._schemas
                ]
            self.buffer.ack(conn.acked)  # durable already: never resent
            resend = self.buffer.unacked_frames()
            if not conn.chunk_ends_step and any(map(frames.folds_end, resend)):
                resend = frames.split_ends_step(resend)  # an older collector now
                self.buffer.replace_unacked(resend)
                self._next_seq = max(self._next_seq, frames.seq_of(resend[-1]))
                self.buffer.counters["resends_split"] += 1
            conn.last_progress = time.monotonic()
        self.buffer.count("frames_resent", len(resend))
        return self._schema_frames + resend

    def _stale(self, conn: _Conn) -> bool:
        """Frames unacknowledged for net_timeout_s: the stream is declared dead (caller holds
        the lock)."""
        timeout = self.config.net_timeout_s
        if self.buffer.has_unacked() and time.monotonic() - conn.last_progress > timeout:
            self.buffer.counters["stale_streams"] += 1
            log.warning("stepwatch: no ack from %s for %.1f s; reconnecting", self.target, timeout)
            return True
        return False

    def _serve(self, conn: _Conn) -> None:
        for frame in self._resume(conn):
            conn.out_q.put(frame)
        timeout = self.config.net_timeout_s
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self.buffer.has_pending() or conn.dead or self._stop,
                    timeout=min(0.5, timeout),
                )
                if conn.dead or self._stop or self._stale(conn):
                    return
                item = self.buffer.pop()
            if item is not None:
                self._transmit(conn, item)

    def _alloc_seq(self) -> int:
        self._next_seq += 1
        return self._next_seq

    def _transmit(self, conn: _Conn, item: StepItem | AckItem) -> None:
        for frame in self._encode(conn, item):
            conn.out_q.put(frame)

    def _encode(self, conn: _Conn, item: StepItem | AckItem) -> list[pb.ClientFrame]:
        """Encode outside the lock (only the worker allocates seqs), then record as sent."""
        is_step = isinstance(item, StepItem)
        if is_step:
            payload = frames.StepPayload(item.step, item.values(), item.schemas, item.wall_time)
            out = frames.step_frames(
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

    # ------------------------------------------------------------------ reader
    def _read(self, conn: _Conn) -> None:
        try:
            for resp in conn.call:
                self._receive(conn, resp)
        except grpc.RpcError as exc:
            self._stream_error(exc)
        except Exception:  # noqa: BLE001 - the stream is reopened
            self._reader_error()
        finally:
            self._reader_ended(conn)

    def _reader_error(self) -> None:
        self.buffer.count("reader_errors")
        log.exception("stepwatch: reader error")

    def _reader_ended(self, conn: _Conn) -> None:
        """The stream's reader is gone (either driver): the connection is dead; wake waiters."""
        with self._cond:
            conn.dead = True
            self._cond.notify_all()

    def _receive(self, conn: _Conn, resp: pb.ServerFrame) -> None:
        kind = resp.WhichOneof("kind")
        if kind == "clip":
            self.buffer.count("clip_updates")
            self._deliver_clip(resp.clip)
            return
        with self._cond:
            if kind == "welcome":
                conn.acked, conn.welcomed = resp.welcome.acked_seq, True
                conn.chunk_ends_step = resp.welcome.chunk_ends_step
            elif kind == "ack":
                self.buffer.ack(resp.ack.seq)
                conn.last_progress = time.monotonic()
            elif kind == "error":
                self.buffer.counters["server_errors"] += 1
                log.warning(
                    "stepwatch: collector error %s: %s", resp.error.code, resp.error.message
                )
            self._cond.notify_all()

    def _stream_error(self, exc: grpc.RpcError) -> None:
        if not self._stop and exc.code() != grpc.StatusCode.CANCELLED:
            key = f"status_{exc.code().name}"
            with self._cond:
                self.buffer.counters["stream_errors"] += 1
                self.buffer.counters[key] += 1
                first = self.buffer.counters[key] == 1  # warn once per status, then quietly
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "stepwatch: stream to %s ended: %s %s (reconnecting with backoff)",
                self.target,
                exc.code().name,
                exc.details() or "",
            )

    def _deliver_clip(self, update: pb.ClipUpdate) -> None:
        if self._on_clip is None:
            return
        try:
            self._on_clip(update)
        except Exception:
            self.buffer.count("clip_errors")
            log.exception("stepwatch: could not stage clip update %d", update.version)

    # ------------------------------------------------------------------ channel mode (asyncio)
    def _wake(self) -> None:
        """Wake the worker after a submit, from the loop's thread or any other."""
        if threading.get_ident() == self._loop_thread:
            self._work.set()
        else:
            self._loop.call_soon_threadsafe(self._work.set)

    def _wake_all(self) -> None:
        self._work.set()
        self._progress.set()

    async def _until(
        self, event: asyncio.Event, predicate: Callable[[], bool], timeout: float | None = None
    ) -> bool:
        """The loop's wait_for on one of the two events: True once `predicate()` holds, False
        after `timeout` seconds. The deadline is a timer that sets the event (cheaper than
        asyncio.wait_for's task per wait; other waiters on it just re-check)."""
        if predicate():
            return True
        deadline = None if timeout is None else self._loop.time() + timeout
        timer = None if deadline is None else self._loop.call_at(deadline, event.set)
        try:
            while not predicate():
                if deadline is not None and self._loop.time() >= deadline:
                    return False
                event.clear()
                await event.wait()
            return True
        finally:
            if timer is not None:
                timer.cancel()

    async def wait_space(self, below: int | None = None, timeout: float | None = None) -> bool:
        """Wait until fewer than `below` (default: the capacity) steps are buffered, so that a
        `submit` on the loop never waits; False after `timeout` seconds or once closing."""
        below = self.buffer.capacity if below is None else below
        return (
            await self._until(
                self._progress,
                lambda: self.buffer.buffered() < below or self.buffer.closing,
                timeout,
            )
            and not self.buffer.closing
        )

    async def aclose(self, timeout: float) -> bool:
        """`close()` for channel mode: flush, half-close, stop. The channel stays open."""
        deadline = self._loop.time() + timeout
        with self._cond:
            self.buffer.closing = True
        self._wake_all()
        flushed = await self._until(
            self._progress, lambda: self.buffer.drained() or self._task.done(), timeout
        )
        conn = self._conn
        self._goodbye = flushed and conn is not None and not conn.dead
        if self._goodbye:  # the collector finishes the run once every rank said goodbye
            try:
                await conn.call.done_writing()
            except Exception:  # noqa: BLE001 - the stream ended meanwhile: nothing to close
                pass
            if not await self._until(
                self._progress, lambda: conn.dead, max(0.05, deadline - self._loop.time())
            ):
                self.buffer.count("goodbye_timeouts")
        with self._cond:
            self._stop = True
            lost = self.buffer.buffered()
            self.buffer.counters["lost_at_close"] += lost
            conn = self._conn
        self._wake_all()
        if conn is not None and conn.call is not None:
            conn.call.cancel()
        try:
            await asyncio.wait_for(
                asyncio.shield(self._task), max(0.1, deadline - self._loop.time()) + 1.0
            )
        except TimeoutError:
            self._task.cancel()
        if lost:
            log.warning(
                "stepwatch: closed with %d step(s) not acknowledged by %s", lost, self.target
            )
        return flushed and lost == 0

    async def _run_async(self) -> None:
        backoff = self.config.backoff_initial_s
        try:
            while not (self._stop or self._goodbye):
                conn = await self._connect_async()
                if conn is not None:
                    backoff = self.config.backoff_initial_s
                    try:
                        await self._serve_async(conn)
                    except Exception:
                        self.buffer.count("worker_errors")
                        log.exception("stepwatch: sender error")
                    self._drop_conn_async(conn)
                self._release_waiting()
                await self._until(self._work, lambda: self._stop or self._goodbye, backoff)
                backoff = min(backoff * 2, self.config.backoff_max_s)
        finally:
            self._progress.set()  # aclose() waits for this task too

    async def _connect_async(self) -> _Conn | None:
        conn = _Conn(self._channel)
        self.buffer.count("connect_attempts")
        try:
            conn.call = self._stub.Stream(metadata=self._metadata)
            with self._cond:
                self._conn = conn
            self._loop.create_task(self._read_async(conn), name="stepwatch-reader")
            await conn.call.write(self._hello)
            await self._until(
                self._progress,
                lambda: conn.welcomed or conn.dead or self._stop,
                self.config.net_timeout_s,
            )
        except Exception:
            log.debug("stepwatch: connect to %s failed", self.target, exc_info=True)
        if self._settle_connect(conn):
            return conn
        self._drop_conn_async(conn)
        return None

    def _drop_conn_async(self, conn: _Conn) -> None:
        """As `_drop_conn`, but the shared channel stays open."""
        self._mark_dead(conn)
        self._wake_all()

    async def _serve_async(self, conn: _Conn) -> None:
        for frame in self._resume(conn):
            await conn.call.write(frame)
        ready = lambda: self.buffer.has_pending() or conn.dead or self._stop
        while True:
            timeout = None  # no polling: wake on submit, or once the ack is overdue
            if self.buffer.has_unacked():
                timeout = (
                    max(0.0, self.config.net_timeout_s - (time.monotonic() - conn.last_progress))
                    + 0.01
                )
            await self._until(self._work, ready, timeout)
            with self._cond:
                if conn.dead or self._stop or self._stale(conn):
                    return
                item = self.buffer.pop()
            if item is not None:
                for frame in self._encode(conn, item):
                    await conn.call.write(frame)

    async def _read_async(self, conn: _Conn) -> None:
        try:
            async for resp in conn.call:
                self._receive(conn, resp)
                self._progress.set()
        except grpc.RpcError as exc:
            self._stream_error(exc)
        except asyncio.CancelledError:
            if not (conn.dead or self._stop):  # not our own cancel of the call
                raise
        except Exception:  # noqa: BLE001 - the stream is reopened
            self._reader_error()
        finally:
            self._reader_ended(conn)
            self._wake_all()
