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

Sequence numbers start at Welcome.acked_seq + 1 on the client's first connection (1 for a new
run; a restarted trainer continues after what the collector already holds). Schemas keep the seq
they first had and are re-sent on every connection. A stream that leaves frames unacknowledged
for net_timeout_s is declared dead and reopened. Nothing here raises into the caller.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

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
    channel: grpc.Channel
    out_q: queue.Queue
    call: Any = None
    welcomed: bool = False
    acked: int = 0
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
    def __init__(self, target: str, ident: frames.Identity,
                 schemas: Sequence[tuple[int, Sequence[MetricSpec]]], config: MonitorConfig,
                 token: str | None = None, run_config: dict | None = None,
                 on_clip: Callable[[pb.ClipUpdate], None] | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.target, self.ident, self.config = target, ident, config
        self._schemas = frames.wire_schemas(schemas)   # split where a Schema would be too big
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._hello = frames.hello(ident, run_config or {})
        self._on_clip, self._credentials = on_clip, credentials
        self.buffer = StepBuffer(config.buffer_steps, config.full_policy, config.block_timeout_s)
        self._cond = self.buffer.cond
        self._schema_frames: list[pb.ClientFrame] | None = None
        self._next_seq = 0                       # set from the first Welcome
        self._conn: _Conn | None = None
        self._stop = False
        self._goodbye = False     # close() half-closed the stream: never reconnect after it
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"stepwatch-sender-{ident.run}-r{ident.rank}")
        self._thread.start()

    # ------------------------------------------------------------------ training thread
    def submit(self, item: StepItem) -> bool:
        """Buffer one step; False when the full policy dropped it (counted)."""
        return self.buffer.submit(item)

    def submit_clip_ack(self, step: int, version: int) -> None:
        self.buffer.submit_control(AckItem(step, version))

    def stats(self) -> dict:
        with self._cond:
            out = dict(self.buffer.counters)
            conn = self._conn
            out.update(buffered_steps=self.buffer.buffered(),
                       unacked_frames=len(self.buffer.unacked_frames()),
                       connected=bool(conn and conn.welcomed and not conn.dead))
            return out

    def close(self, timeout: float) -> bool:
        """Flush: wait up to `timeout` for every buffered step to be acknowledged, then stop.
        Returns True when nothing was left behind."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self.buffer.closing = True
            self._cond.notify_all()
            flushed = self._cond.wait_for(
                lambda: self.buffer.drained() or not self._thread.is_alive(), timeout=timeout)
            conn = self._conn
            self._goodbye = flushed and conn is not None and not conn.dead
        if self._goodbye:
            # Half-close the stream: the collector answers OK once everything of this rank is
            # durable, and finishes the run when every rank has said goodbye. A cancel (below)
            # would leave the run "live" until the collector stops.
            conn.out_q.put(None)
            with self._cond:
                if not self._cond.wait_for(lambda: conn.dead,
                                           timeout=max(0.05, deadline - time.monotonic())):
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
            log.warning("stepwatch: closed with %d step(s) not acknowledged by %s",
                        lost, self.target)
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
                except Exception:  # noqa: BLE001 - the worker must survive anything
                    self.buffer.count("worker_errors")
                    log.exception("stepwatch: sender error")
                self._drop_conn(conn)
            try:   # while away, let finished device copies go back to their pinned pool
                for item in self.buffer.waiting_steps():
                    item.values()
            except Exception:  # noqa: BLE001
                self.buffer.count("worker_errors")
                log.exception("stepwatch: could not copy a step to the host")
            with self._cond:
                if not (self._stop or self._goodbye):
                    self._cond.wait(timeout=backoff)
            backoff = min(backoff * 2, self.config.backoff_max_s)

    def _connect(self) -> _Conn | None:
        options = [("grpc.max_send_message_length", 8 << 20)]
        channel = (grpc.secure_channel(self.target, self._credentials, options=options)
                   if self._credentials else grpc.insecure_channel(self.target, options=options))
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
        threading.Thread(target=self._read, args=(conn,), daemon=True,
                         name="stepwatch-reader").start()
        with self._cond:
            self._cond.wait_for(lambda: conn.welcomed or conn.dead or self._stop,
                                timeout=self.config.net_timeout_s)
            if conn.welcomed and not conn.dead:
                self.buffer.counters["connects"] += 1
                return conn
        self.buffer.count("connect_failures")
        self._drop_conn(conn)
        return None

    def _drop_conn(self, conn: _Conn) -> None:
        with self._cond:
            conn.dead = True
            if self._conn is conn:
                self._conn = None
        if conn.call is not None:
            conn.call.cancel()
        conn.out_q.put(None)
        conn.channel.close()

    def _serve(self, conn: _Conn) -> None:
        with self._cond:
            if self._schema_frames is None:       # first connection of this client
                self._next_seq = conn.acked
                self._schema_frames = [frames.schema(self.ident, self._alloc_seq(), sid, specs)
                                       for sid, specs in self._schemas]
            self.buffer.ack(conn.acked)            # durable already: never resent
            resend = self.buffer.unacked_frames()
            conn.last_progress = time.monotonic()
        for frame in self._schema_frames + resend:
            conn.out_q.put(frame)
        self.buffer.count("frames_resent", len(resend))
        timeout = self.config.net_timeout_s
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self.buffer.has_pending() or conn.dead or self._stop,
                                    timeout=min(0.5, timeout))
                if conn.dead or self._stop:
                    return
                if self.buffer.has_unacked() and time.monotonic() - conn.last_progress > timeout:
                    self.buffer.counters["stale_streams"] += 1
                    log.warning("stepwatch: no ack from %s for %.1f s; reconnecting",
                                self.target, timeout)
                    return
                item = self.buffer.pop()
            if item is not None:
                self._transmit(conn, item)

    def _alloc_seq(self) -> int:
        self._next_seq += 1
        return self._next_seq

    def _transmit(self, conn: _Conn, item: StepItem | AckItem) -> None:
        """Encode outside the lock (only this thread allocates seqs), then record and queue."""
        is_step = isinstance(item, StepItem)
        if is_step:
            payload = frames.StepPayload(item.step, item.values(), item.schemas, item.wall_time)
            out = frames.step_frames(self.ident, payload, self.config.chunk_values,
                                     self._alloc_seq)
        else:
            out = [frames.clip_ack(self.ident, item.step, item.version, self._alloc_seq())]
        with self._cond:
            if not self.buffer.has_unacked():
                conn.last_progress = time.monotonic()   # the ack clock starts now
            self.buffer.record_sent(out, is_step)
            self.buffer.counters["steps_sent" if is_step else "clip_acks_sent"] += 1
            self.buffer.counters["frames_sent"] += len(out)
        for frame in out:
            conn.out_q.put(frame)

    # ------------------------------------------------------------------ reader
    def _read(self, conn: _Conn) -> None:
        try:
            for resp in conn.call:
                kind = resp.WhichOneof("kind")
                if kind == "clip":
                    self.buffer.count("clip_updates")
                    self._deliver_clip(resp.clip)
                    continue
                with self._cond:
                    if kind == "welcome":
                        conn.acked, conn.welcomed = resp.welcome.acked_seq, True
                    elif kind == "ack":
                        self.buffer.ack(resp.ack.seq)
                        conn.last_progress = time.monotonic()
                    elif kind == "error":
                        self.buffer.counters["server_errors"] += 1
                        log.warning("stepwatch: collector error %s: %s", resp.error.code,
                                    resp.error.message)
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            if not self._stop and exc.code() != grpc.StatusCode.CANCELLED:
                key = f"status_{exc.code().name}"
                with self._cond:
                    self.buffer.counters["stream_errors"] += 1
                    self.buffer.counters[key] += 1
                    first = self.buffer.counters[key] == 1   # warn once per status, then quietly
                log.log(logging.WARNING if first else logging.DEBUG,
                        "stepwatch: stream to %s ended: %s %s (reconnecting with backoff)",
                        self.target, exc.code().name, exc.details() or "")
        except Exception:  # noqa: BLE001 - the stream is reopened
            self.buffer.count("reader_errors")
            log.exception("stepwatch: reader error")
        finally:
            with self._cond:
                conn.dead = True
                self._cond.notify_all()

    def _deliver_clip(self, update: pb.ClipUpdate) -> None:
        if self._on_clip is None:
            return
        try:
            self._on_clip(update)
        except Exception:  # noqa: BLE001 - a bad update must not end the stream
            self.buffer.count("clip_errors")
            log.exception("stepwatch: could not stage clip update %d", update.version)
