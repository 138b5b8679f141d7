"""The background sender: a bounded buffer of steps and one gRPC bidi stream per rank.

Threads
  training thread  `submit()` / `submit_clip_ack()` only append to the buffer (under the
                   "block" policy they may wait up to block_timeout_s for space, never longer);
  worker           owns the connection: connects, waits for Welcome, (re)sends schemas and the
                   unacknowledged frames, then turns buffered steps into frames, assigning seq
                   at first transmission (so a step dropped before it was sent leaves no gap);
  reader           one per connection: Welcome, Ack (frees buffer space), ClipUpdate (handed to
                   `on_clip`), Error; its end marks the connection dead;
  gRPC's own thread consumes the request iterator fed from the worker's queue.

Sequence numbers start at Welcome.acked_seq + 1 on the client's first connection (1 for a new
run; a restarted trainer continues after what the collector already holds). Schemas keep the seq
they first had and are re-sent on every connection. Capacity counts steps waiting plus steps
sent but not acknowledged; when full, "drop_oldest" drops the oldest waiting step (or, if all are
in flight, the oldest unacknowledged one) and "block" waits, then drops the new step. Every
drop is counted. Nothing here raises into the caller.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from hooks import frames
from hooks.config import MonitorConfig
from hooks.layout import MetricSpec
from proto.v1 import telemetry_pb2 as pb
from proto.v1 import telemetry_pb2_grpc as pbg

log = logging.getLogger("stepwatch.hooks")


@dataclass
class StepItem:
    step: int
    vector: Any                       # has materialize() -> np.ndarray (hooks.stats.HostVector)
    schemas: Sequence[tuple[int, int]]
    wall_time: float
    patch_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    patch_vals: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _values: np.ndarray | None = None

    def values(self) -> np.ndarray:
        """The packed vector: the device copy with the host-side values (lr, step time...)
        written into their slots. Waits for the copy; sender thread only."""
        if self._values is None:
            values = self.vector.materialize()
            values[self.patch_idx] = self.patch_vals
            self._values = values
        return self._values


@dataclass
class AckItem:
    step: int
    version: int


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
        self._schemas = list(schemas)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._hello = frames.hello(ident, run_config or {})
        self._on_clip, self._credentials = on_clip, credentials
        self._cond = threading.Condition()
        self._pending: collections.deque = collections.deque()   # StepItem | AckItem
        self._pending_steps = 0
        self._unacked: collections.deque = collections.deque()   # (seq, frame)
        self._unacked_steps = 0
        self._schema_frames: list[pb.ClientFrame] | None = None
        self._next_seq = 0                       # set from the first Welcome
        self._conn: _Conn | None = None
        self._closing = self._stop = False
        self.counters: collections.Counter = collections.Counter()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"stepwatch-sender-{ident.run}-r{ident.rank}")
        self._thread.start()

    # ------------------------------------------------------------------ training thread
    def submit(self, item: StepItem) -> bool:
        """Buffer one step. Returns False when it was dropped (counted)."""
        with self._cond:
            if self._closing:
                self.counters["dropped_steps"] += 1
                return False
            if self._buffered() >= self.config.buffer_steps:
                if self.config.full_policy == "drop_oldest":
                    self._drop_oldest()
                else:
                    self.counters["blocked_submits"] += 1
                    if not self._cond.wait_for(
                            lambda: self._buffered() < self.config.buffer_steps or self._closing,
                            timeout=self.config.block_timeout_s) or self._closing:
                        self.counters["dropped_steps"] += 1
                        self.counters["dropped_block_timeout"] += 1
                        return False
            self._pending.append(item)
            self._pending_steps += 1
            self.counters["steps_enqueued"] += 1
            self._cond.notify_all()
            return True

    def submit_clip_ack(self, step: int, version: int) -> None:
        """Control frames are tiny and never dropped by the full policy."""
        with self._cond:
            self._pending.append(AckItem(step, version))
            self._cond.notify_all()

    def _buffered(self) -> int:
        return self._pending_steps + self._unacked_steps

    def _drop_oldest(self) -> None:
        self.counters["dropped_steps"] += 1
        for i, item in enumerate(self._pending):
            if isinstance(item, StepItem):
                del self._pending[i]
                self._pending_steps -= 1
                return
        # every buffered step is in flight: give up the oldest unacknowledged one
        kept, found = [], False
        while self._unacked and not found:
            seq, frame = self._unacked.popleft()
            kind = frame.WhichOneof("kind")
            found = kind == "end_of_step"
            if kind == "clip_ack":
                kept.append((seq, frame))
        self._unacked.extendleft(reversed(kept))
        self._unacked_steps -= 1
        self.counters["dropped_unacked"] += 1

    # ------------------------------------------------------------------ status / close
    def stats(self) -> dict:
        with self._cond:
            out = dict(self.counters)
            out.update(buffered_steps=self._buffered(), unacked_frames=len(self._unacked),
                       connected=bool(self._conn and self._conn.welcomed and not self._conn.dead))
            return out

    def close(self, timeout: float) -> bool:
        """Flush: wait up to `timeout` for every buffered step to be acknowledged, then stop.
        Returns True when nothing was left behind."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            flushed = self._cond.wait_for(
                lambda: not self._pending and not self._unacked or not self._thread.is_alive(),
                timeout=timeout)
            self._stop = True
            lost = self._buffered()
            self.counters["lost_at_close"] += lost
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
        while True:
            with self._cond:
                if self._stop:
                    return
            conn = self._connect()
            if conn is not None:
                backoff = self.config.backoff_initial_s
                try:
                    self._serve(conn)
                except Exception:  # noqa: BLE001 - the worker must survive anything
                    self._count("worker_errors")
                    log.exception("stepwatch: sender error")
                self._drop_conn(conn)
            try:
                self._materialize_pending()
            except Exception:  # noqa: BLE001
                self._count("worker_errors")
                log.exception("stepwatch: could not copy a step to the host")
            with self._cond:
                if self._stop:
                    return
                self._cond.wait(timeout=backoff)
            backoff = min(backoff * 2, self.config.backoff_max_s)

    def _connect(self) -> _Conn | None:
        options = [("grpc.max_send_message_length", 8 << 20)]
        channel = (grpc.secure_channel(self.target, self._credentials, options=options)
                   if self._credentials else grpc.insecure_channel(self.target, options=options))
        conn = _Conn(channel, queue.Queue())
        conn.out_q.put(self._hello)
        self._count("connect_attempts")
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
                self.counters["connects"] += 1
                return conn
        self._count("connect_failures")
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

    def _read(self, conn: _Conn) -> None:
        try:
            for resp in conn.call:
                kind = resp.WhichOneof("kind")
                if kind == "clip":
                    self._count("clip_updates")
                    self._deliver_clip(resp.clip)
                    continue
                with self._cond:
                    if kind == "welcome":
                        conn.acked, conn.welcomed = resp.welcome.acked_seq, True
                    elif kind == "ack":
                        self._on_ack(resp.ack.seq)
                        conn.last_progress = time.monotonic()
                    elif kind == "error":
                        self.counters["server_errors"] += 1
                        log.warning("stepwatch: collector error %s: %s", resp.error.code,
                                    resp.error.message)
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            if not self._stop and exc.code() != grpc.StatusCode.CANCELLED:
                key = f"status_{exc.code().name}"
                self._count("stream_errors")
                self._count(key)
                first = self.counters[key] == 1            # warn once per status, then quietly
                log.log(logging.WARNING if first else logging.DEBUG,
                        "stepwatch: stream to %s ended: %s %s (reconnecting with backoff)",
                        self.target, exc.code().name, exc.details() or "")
        except Exception:  # noqa: BLE001 - the stream is reopened
            self._count("reader_errors")
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
            self._count("clip_errors")
            log.exception("stepwatch: could not stage clip update %d", update.version)

    def _count(self, key: str, n: int = 1) -> None:
        with self._cond:                      # counters are bumped from three threads
            self.counters[key] += n

    def _materialize_pending(self) -> None:
        """While disconnected, pull finished device copies into numpy so pinned staging
        buffers go back to their pool instead of piling up with the backlog."""
        with self._cond:
            items = [i for i in self._pending if isinstance(i, StepItem)]
        for item in items:
            item.values()

    def _on_ack(self, seq: int) -> None:
        """Cumulative ack (lock held): everything <= seq is durable."""
        while self._unacked and self._unacked[0][0] <= seq:
            _, frame = self._unacked.popleft()
            if frame.WhichOneof("kind") == "end_of_step":
                self._unacked_steps -= 1
        self.counters["acked_seq"] = max(self.counters["acked_seq"], seq)

    def _alloc_seq(self) -> int:
        self._next_seq += 1
        return self._next_seq

    def _serve(self, conn: _Conn) -> None:
        with self._cond:
            if self._schema_frames is None:       # first connection of this client
                self._next_seq = conn.acked
                self._schema_frames = [frames.schema(self.ident, self._alloc_seq(), sid, specs)
                                       for sid, specs in self._schemas]
            self._on_ack(conn.acked)
            resend = [f for _, f in self._unacked]
            conn.last_progress = time.monotonic()
        for frame in self._schema_frames + resend:
            conn.out_q.put(frame)
        self._count("frames_resent", len(resend))
        timeout = self.config.net_timeout_s
        while True:
            with self._cond:
                def ready() -> bool:
                    return bool(self._pending) or conn.dead or self._stop
                self._cond.wait_for(ready, timeout=min(0.5, timeout))
                if conn.dead or self._stop:
                    return
                if self._unacked and time.monotonic() - conn.last_progress > timeout:
                    self.counters["stale_streams"] += 1
                    log.warning("stepwatch: no ack from %s for %.1f s; reconnecting",
                                self.target, timeout)
                    return
                item = self._pending.popleft() if self._pending else None
                if isinstance(item, StepItem):
                    self._pending_steps -= 1
            if item is not None:
                self._transmit(conn, item)

    def _transmit(self, conn: _Conn, item: StepItem | AckItem) -> None:
        """Encode outside the lock (only this thread allocates seqs), then record and queue."""
        if isinstance(item, AckItem):
            out = [frames.clip_ack(self.ident, item.step, item.version, self._alloc_seq())]
        else:
            payload = frames.StepPayload(item.step, item.values(), item.schemas, item.wall_time)
            out = frames.step_frames(self.ident, payload, self.config.chunk_values,
                                     self._alloc_seq)
        with self._cond:
            self.counters["steps_sent" if isinstance(item, StepItem) else "clip_acks_sent"] += 1
            self.counters["frames_sent"] += len(out)
            if not self._unacked:
                conn.last_progress = time.monotonic()   # the ack clock starts now
            for frame in out:
                seq = getattr(frame, frame.WhichOneof("kind")).header.seq
                self._unacked.append((seq, frame))
            if isinstance(item, StepItem):
                self._unacked_steps += 1
        for frame in out:
            conn.out_q.put(frame)
