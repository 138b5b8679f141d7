"""The threaded driver: the sender a training process runs, one gRPC stream per rank.

Threads
  training thread  `submit()` / `submit_clip_ack()` only append to the buffer (hooks/buffer.py;
                   under the "block" policy they wait at most block_timeout_s, never longer);
  worker           owns the connection: connects, waits for Welcome, (re)sends the schemas and
                   the unacknowledged frames, then turns buffered steps into frames (the
                   protocol in hooks/sender/core.py); reconnects after a transient stream
                   error with exponential backoff and jitter (core.Backoff), a wait that new
                   steps never cut short; stops for good after a permanent one;
  reader           one per connection: Welcome, Ack (frees buffer space), ClipUpdate (handed to
                   `on_clip`), Error; its end marks the connection dead;
  gRPC's own thread consumes the request iterator fed from the worker's queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from hooks import frames
from hooks.buffer import AckItem, SchemaItem, StepItem
from hooks.config import MonitorConfig
from hooks.layout import MetricSpec
from hooks.sender.core import Conn, SenderCore
from proto.v1 import telemetry_pb2 as pb
from proto.v1 import telemetry_pb2_grpc as pbg

log = logging.getLogger("stepwatch.hooks")


@dataclass(eq=False)
class _Conn(Conn):
    channel: grpc.Channel = field(kw_only=True)  # one channel per connection
    out_q: queue.Queue = field(kw_only=True)  # frames for gRPC's request iterator


def _requests(conn: _Conn, count: Callable[[str, int], None]) -> Iterator[pb.ClientFrame]:
    """The request iterator gRPC consumes: whatever the worker queued, until the sentinel.
    gRPC asks for the next message once the last one is written, so what queued meanwhile (a
    backlog) goes as FrameBatch messages where the Welcome said takes_batches."""
    q = conn.out_q
    while True:
        try:
            frame = q.get(timeout=0.5)
        except queue.Empty:
            if conn.dead:
                return
            continue
        if frame is None:
            return
        group, end = list(_frames(frame)), False  # a list: one burst of the worker
        while conn.takes_batches and len(group) < frames.BATCH_FRAMES:
            try:
                nxt = q.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                end = True
                break
            group += _frames(nxt)
        if not conn.takes_batches:
            yield from group
        else:
            messages = frames.batched(group)
            count("batches_sent", sum(m.WhichOneof("kind") == "batch" for m in messages))
            yield from messages
        if end:
            return


def _frames(queued: pb.ClientFrame | list[pb.ClientFrame]) -> list[pb.ClientFrame]:
    return queued if isinstance(queued, list) else [queued]


class Sender(SenderCore[_Conn]):
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
    ) -> None:
        super().__init__(target, ident, schemas, config, token, run_config, on_clip)
        self._credentials = credentials
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"stepwatch-sender-{ident.run}-r{ident.rank}"
        )
        self._thread.start()

    def close(self, timeout: float) -> bool:
        """Flush: wait up to `timeout` for every buffered step to be acknowledged, then stop.
        Returns True when nothing was left behind."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self.buffer.closing = True
            self._cond.notify_all()
            flushed = self._cond.wait_for(
                lambda: self.buffer.drained() or not self._thread.is_alive(), timeout=timeout
            )
            conn = self._conn
            early = conn is not None and conn.half_closed  # the worker said goodbye already
            self._goodbye = self._goodbye or (flushed and conn is not None and not conn.dead)
        if self._goodbye and conn is not None:
            # Half-close the stream: the collector answers OK once everything of this rank is
            # durable, and finishes the run when every rank has said goodbye. A cancel (below)
            # would leave the run "live" until the collector stops.
            if not early:
                conn.out_q.put(None)
            with self._cond:
                if not self._cond.wait_for(
                    lambda: conn.dead, timeout=max(0.05, deadline - time.monotonic())
                ):
                    self.buffer.counters["goodbye_timeouts"] += 1
        lost, last = self._stop_now()
        if last is not None and last.call is not None:
            last.call.cancel()
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()) + 1.0)
        return self._closed(flushed, lost)

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        closing_retried = False  # close() gets one prompt attempt, not a storm
        while not (self._stop or self._goodbye):
            conn = self._connect()
            if conn is not None:
                try:
                    self._serve(conn)
                except Exception:
                    self.buffer.count("worker_errors")
                    log.exception("stepwatch: sender error")
                self._drop_conn(conn)
                self._settle_goodbye(conn)
            self._release_waiting()
            wait = self._next_wait(conn)
            with self._cond:
                # submits notify this condition: only stop, goodbye or a first close end it
                self._cond.wait_for(self._backoff_over(closing_retried), timeout=wait)
                closing_retried = closing_retried or self.buffer.closing

    def _backoff_over(self, closing_retried: bool) -> Callable[[], bool]:
        return lambda: self._stop or self._goodbye or (self.buffer.closing and not closing_retried)

    def _connect(self) -> _Conn | None:
        options = [("grpc.max_send_message_length", 8 << 20)]
        channel = (
            grpc.secure_channel(self.target, self._credentials, options=options)
            if self._credentials
            else grpc.insecure_channel(self.target, options=options)
        )
        conn = _Conn(channel=channel, out_q=queue.Queue())
        conn.out_q.put(self._hello)
        self.buffer.count("connect_attempts")
        try:
            conn.call = pbg.TelemetryStub(channel).Stream(
                _requests(conn, self.buffer.count), metadata=self._metadata
            )
        except Exception:  # noqa: BLE001 - a stream that cannot open is retried with backoff
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

    def _drop_conn(self, conn: _Conn) -> None:
        """Abandon a stream: cancel the call before the sentinel ends the request iterator,
        or gRPC would half-close it, and a half-close is a goodbye to the collector."""
        self._mark_dead(conn)
        if conn.call is not None:
            conn.call.cancel()
        conn.out_q.put(None)
        conn.channel.close()

    def _serve(self, conn: _Conn) -> None:
        for frame in self._resume(conn):
            conn.out_q.put(frame)
        timeout = self.config.net_timeout_s
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self.buffer.has_pending()
                        or self._has_holes(conn)
                        or conn.dead
                        or self._stop
                        or self._goodbye_due(conn)
                    ),
                    timeout=min(0.5, timeout),
                )
                if conn.dead or self._stop or self._stale(conn):
                    return
                if self._goodbye_due(conn):  # after this thread's last frames: in order
                    conn.half_closed = True
                    conn.out_q.put(None)
                    self.buffer.counters["early_goodbyes"] += 1
                    continue
                pace = self._pace_s(conn)
                if pace:  # Welcome.send_interval_ms: wait it out (close cuts it short)
                    self._cond.wait_for(
                        lambda: conn.dead or self._stop or self.buffer.closing, timeout=pace
                    )
                    continue  # and check again: dead, stale, goodbye
                holes = self._holes(conn)
                item = self.buffer.pop()
            for frame in holes:
                conn.out_q.put(frame)
            if item is not None:
                self._transmit(conn, item)

    def _transmit(self, conn: _Conn, item: StepItem | AckItem | SchemaItem) -> None:
        """`item` and what waits behind it (core._burst) as one queue entry: gRPC's thread
        sends it as one message (frames.batched), never a part of it alone."""
        conn.out_q.put(self._burst(conn, item))

    # ------------------------------------------------------------------ reader
    def _read(self, conn: _Conn) -> None:
        try:
            for resp in conn.call:
                self._receive(conn, resp)
        except grpc.RpcError as exc:
            self._stream_error(exc, conn)
        except Exception:  # noqa: BLE001 - the stream is reopened
            self._reader_error()
        finally:
            self._reader_ended(conn)
