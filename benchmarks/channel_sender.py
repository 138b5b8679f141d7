"""`ChannelSender`: the hooks sender's protocol driven by asyncio, for the load generator.

A `ChannelSender` takes a grpc.aio.Channel created on its event loop and starts no thread: its
worker and reader are two tasks on that loop and the stream is written with `call.write`, so
thousands of senders share one channel and one thread (benchmarks/loadgen.py plays thousands of
ranks in one process this way). The protocol (seq, buffer, resend, acks, backoff, staleness) is
hooks/sender/core.py, the same code as the threaded `hooks.sender.Sender` a training process
runs; only the waiting differs. On the loop, `await wait_space()` before `submit()` (a full
buffer under the "block" policy would block the loop that delivers the acks) and `await
aclose()` instead of `close()`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from hooks import frames
from hooks.config import MonitorConfig
from hooks.layout import MetricSpec
from hooks.sender.core import Conn, SenderCore
from proto.v1 import telemetry_pb2 as pb
from proto.v1 import telemetry_pb2_grpc as pbg

log = logging.getLogger("stepwatch.hooks")


class ChannelSender(SenderCore[Conn]):
    def __init__(
        self,
        target: str,
        ident: frames.Identity,
        schemas: Sequence[tuple[int, Sequence[MetricSpec]]],
        config: MonitorConfig,
        token: str | None = None,
        run_config: dict | None = None,
        on_clip: Callable[[pb.ClipUpdate], None] | None = None,
        *,
        channel: grpc.aio.Channel,
    ) -> None:
        if not isinstance(channel, grpc.aio.Channel):
            raise TypeError(f"ChannelSender takes a grpc.aio.Channel, got {type(channel).__name__}")
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "a ChannelSender must be created on the event loop that runs the channel"
            ) from None
        super().__init__(target, ident, schemas, config, token, run_config, on_clip)
        self._loop_thread = threading.get_ident()
        self._work = asyncio.Event()  # the worker: a step to send, a dead stream, stop
        self._progress = asyncio.Event()  # the others: Welcome, acks, closing, a dead stream
        self._stub = pbg.TelemetryStub(channel)
        self._task = self._loop.create_task(
            self._run_async(), name=f"stepwatch-sender-r{ident.rank}"
        )

    def close(self, timeout: float) -> bool:
        raise RuntimeError("a ChannelSender closes with `await aclose(timeout)`")

    # ------------------------------------------------------------------ waiting on the loop
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
        limit = self.buffer.capacity if below is None else below
        return (
            await self._until(
                self._progress,
                lambda: self.buffer.buffered() < limit or self.buffer.closing,
                timeout,
            )
            and not self.buffer.closing
        )

    async def aclose(self, timeout: float) -> bool:
        """Flush, half-close, stop, as the threaded sender's `close()`. The channel stays open."""
        deadline = self._loop.time() + timeout
        with self._cond:
            self.buffer.closing = True
        self._wake_all()
        flushed = await self._until(
            self._progress, lambda: self.buffer.drained() or self._task.done(), timeout
        )
        conn = self._conn
        self._goodbye = flushed and conn is not None and not conn.dead
        if self._goodbye and conn is not None:  # the run finishes once every rank said goodbye
            try:
                await conn.call.done_writing()
            except Exception:  # noqa: BLE001 - the stream ended meanwhile: nothing to close
                pass
            if not await self._until(
                self._progress, lambda: conn.dead, max(0.05, deadline - self._loop.time())
            ):
                self.buffer.count("goodbye_timeouts")
        lost, last = self._stop_now()
        self._wake_all()
        if last is not None and last.call is not None:
            last.call.cancel()
        try:
            await asyncio.wait_for(
                asyncio.shield(self._task), max(0.1, deadline - self._loop.time()) + 1.0
            )
        except TimeoutError:
            self._task.cancel()
        return self._closed(flushed, lost)

    # ------------------------------------------------------------------ worker
    async def _run_async(self) -> None:
        try:
            while not (self._stop or self._goodbye):
                conn = await self._connect_async()
                if conn is not None:
                    try:
                        await self._serve_async(conn)
                    except Exception:
                        self.buffer.count("worker_errors")
                        log.exception("stepwatch: sender error")
                    self._drop_conn_async(conn)
                self._release_waiting()
                wait = self._next_wait(conn)  # core.Backoff: jittered, never cut short
                await self._until(self._work, lambda: self._stop or self._goodbye, wait)
        finally:
            self._progress.set()  # aclose() waits for this task too

    async def _connect_async(self) -> Conn | None:
        conn = Conn()
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

    def _drop_conn_async(self, conn: Conn) -> None:
        """The threaded driver's `_drop_conn`, but the shared channel stays open."""
        self._mark_dead(conn)
        self._wake_all()

    async def _serve_async(self, conn: Conn) -> None:
        for message in self._messages(conn, self._resume(conn)):
            await conn.call.write(message)
        ready = lambda: (
            self.buffer.has_pending() or self._has_holes(conn) or conn.dead or self._stop
        )
        while True:
            timeout = None  # no polling: wake on submit, or once the ack is overdue
            if self.buffer.has_unacked():
                timeout = (
                    max(0.0, self.config.net_timeout_s - (time.monotonic() - conn.last_progress))
                    + 0.01
                )
            await self._until(self._work, ready, timeout)
            pace = self._pace_s(conn)
            if pace:  # Welcome.send_interval_ms: wait it out (close cuts it short)
                await self._until(
                    self._work, lambda: conn.dead or self._stop or self.buffer.closing, pace
                )
            with self._cond:
                if conn.dead or self._stop or self._stale(conn):
                    return
                holes = self._holes(conn)
                item = self.buffer.pop()
            out = holes + ([] if item is None else self._burst(conn, item))
            for message in self._messages(conn, out):
                await conn.call.write(message)

    # ------------------------------------------------------------------ reader
    async def _read_async(self, conn: Conn) -> None:
        try:
            async for resp in conn.call:
                self._receive(conn, resp)
                self._progress.set()
        except grpc.RpcError as exc:
            self._stream_error(exc, conn)
        except asyncio.CancelledError:
            if not (conn.dead or self._stop):  # not our own cancel of the call
                raise
        except Exception:  # noqa: BLE001 - the stream is reopened
            self._reader_error()
        finally:
            self._reader_ended(conn)
            self._wake_all()
