"""The gRPC server: helpers, the Telemetry servicer, the Collector that runs it, serve().

grpc.aio on one event-loop thread: each rank's stream is two coroutines (read frames up, send
acks and clip updates down), so hundreds of streams cost no threads and cannot deadlock on a
pool. All ingest state is touched only on that loop; the store only on the writer thread,
where the online detectors (detect.py) also run; `push_clip`, `clip_acks`, `events` and
`stats` are safe from any thread. The clip control plane (push_clip, clip acks, operator
commands, the closed loop's latency) is control.py's; the Collector delegates to it.

Authentication (`_Auth`): every RPC carries a bearer token; the token grants the ingest scope
(stream telemetry), the operator token both ingest and operator (clip commands). A collector
without a token only starts with an explicit `insecure` and only on a loopback address.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import grpc
from grpc import aio

from collector.barrier import ByteBudget
from collector.clipboard import ClipAckRecord
from collector.config import CollectorConfig
from collector.conn import Conn
from collector.control import ClipControl
from collector.detect import Detect
from collector.errors import (
    REJECTED,
    CollectorError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    is_permanent,
    status_of,
)
from collector.ingest import Ingest
from collector.jobs import EventSink
from collector.mux import MuxStream, first_frame, is_multiplexed
from collector.operator import OPERATOR_CLIENT
from collector.spool import Spool
from collector.stats import Counters, RateLimitedLog
from collector.writer import StoreHandle, Writer
from proto import auth
from proto.v1 import telemetry_pb2 as pb
from proto.v1 import telemetry_pb2_grpc as pbg
from store.base import InvalidInput, Store, StoreError

if TYPE_CHECKING:
    from collector.tier import OperatorForward

log = logging.getLogger("collector")
GOODBYE_CONFIRM_S = 0.1
KEEPALIVE_S, KEEPALIVE_TIMEOUT_S = 20, 10  # server pings on idle streams


# ---- helpers ---------------------------------------------------------------------------------
def _deny_like(handler: grpc.RpcMethodHandler, exc: CollectorError) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind that only fails with `exc`'s status."""
    code, message = status_of(exc)

    async def deny(request, context):
        await context.abort(code, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    return kinds[(handler.request_streaming, handler.response_streaming)](deny)


def is_loopback(host: str) -> bool:
    """Whether `host` (a listen address) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


INGEST, OPERATOR = "ingest", "operator"


class _Auth(aio.ServerInterceptor):
    """Every RPC (the stream included) must carry `authorization: Bearer <token>`: the token
    (scope ingest) or the operator token (ingest and operator). Without a token (an insecure
    collector) every RPC has the ingest scope, and the operator scope too unless an operator
    token is set. An RPC with no scope is UNAUTHENTICATED before it starts."""

    def __init__(self, token: str | None, operator_token: str | None, counters: Counters) -> None:
        self._token = f"Bearer {token}".encode() if token else None
        self._operator = f"Bearer {operator_token}".encode() if operator_token else None
        self._counters = counters

    def scopes(self, metadata) -> frozenset[str]:
        got = dict(metadata or ()).get("authorization", "")
        got = got.encode() if isinstance(got, str) else got
        if self._operator is not None and hmac.compare_digest(got, self._operator):
            return frozenset({INGEST, OPERATOR})
        if self._token is None:  # insecure: open, but the operator token guards clip commands
            return frozenset({INGEST} if self._operator else {INGEST, OPERATOR})
        return frozenset({INGEST}) if hmac.compare_digest(got, self._token) else frozenset()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or self.scopes(details.invocation_metadata):
            return handler
        self._counters.add("auth_failures")
        return _deny_like(
            handler,
            Unauthenticated(
                "missing or wrong token: send metadata 'authorization: Bearer <token>' "
                "(hooks.Monitor and the CLIs read $STEPWATCH_TOKEN or $STEPWATCH_TOKEN_FILE)"
            ),
        )


# ---- the servicer ----------------------------------------------------------------------------
class TelemetryServicer(pbg.TelemetryServicer):
    def __init__(
        self,
        ingest: Ingest,
        counters: Counters,
        on_clip_sent: Callable[[str, int], None] | None = None,
        auth: _Auth | None = None,
        reject_log_interval_s: float = 10.0,
        forward_operator: Callable[[pb.Hello], Awaitable[pb.ClipUpdate]] | None = None,
    ) -> None:
        """forward_operator: a tier collector's (tier.OperatorForward): an operator stream's
        command is awaited here, off the loop, instead of answered by ingest."""
        self.ingest = ingest
        self.counters = counters
        self.on_clip_sent = on_clip_sent
        self.forward_operator = forward_operator
        self.auth = auth or _Auth(None, None, counters)
        self._log = RateLimitedLog(log, reject_log_interval_s)  # a client sets the rate

    async def Stream(self, request_iterator, context):
        stopping = lambda: self.ingest.stopping
        first, request_iterator = await first_frame(request_iterator, context, stopping)
        if first is not None and is_multiplexed(first):  # a node agent's stream (mux.py)
            mux = MuxStream(self.ingest, self.counters, context.peer())
            async for frame in mux.serve(request_iterator, context, self.on_clip_sent):
                yield frame
            return
        conn = Conn(context.peer())
        self.counters.add("streams_opened")
        scopes = self.auth.scopes(context.invocation_metadata())
        reader = asyncio.create_task(self._read(request_iterator, conn, context, scopes))
        try:
            while True:
                for frame in conn.take():
                    yield frame
                    if self.on_clip_sent is not None and conn.run and frame.HasField("clip"):
                        self.on_clip_sent(conn.run, frame.clip.version)
                if conn.error is not None:
                    code, message = status_of(conn.error)
                    permanent = is_permanent(conn.error)
                    yield pb.ServerFrame(
                        error=pb.Error(code=code.name, message=message, permanent=permanent)
                    )
                    await context.abort(code, message)
                if conn.done:
                    return
                await conn.wake.wait()
                conn.wake.clear()
        finally:
            reader.cancel()
            self.ingest.detach(conn)
            self.counters.add("streams_closed")

    async def _read(self, request_iterator, conn: Conn, context, scopes: frozenset[str]) -> None:
        try:
            async for frame in request_iterator:
                if conn.run is None and OPERATOR not in scopes:
                    _check_not_operator(frame)
                if conn.run is None and self.forward_operator is not None and _is_operator(frame):
                    if self.ingest.stopping:
                        raise Unavailable("collector shutting down; send the command again")
                    self.counters.add("operator_commands")  # forwarded; the loop goes on
                    conn.reply(await self.forward_operator(frame.hello))
                    conn.finish()
                    return
                self.ingest.receive(conn, frame)
        except asyncio.CancelledError:
            raise
        except REJECTED as exc:
            self.counters.add("frames_rejected")
            self._log(
                logging.INFO,
                "rejected a frame from %s (run=%s rank=%s): %s",
                conn.peer,
                conn.run,
                conn.rank,
                exc,
            )
            conn.fail(exc)
            return
        except Exception as exc:  # a bug or a broken transport: this stream only
            if context.done() or context.cancelled():
                return
            self.counters.add("frames_rejected")
            log.exception("stream from %s failed", conn.peer)
            conn.fail(exc)
            return
        # grpc.aio reports a client's cancellation as end-of-stream too; the cancellation
        # itself lands a moment later and cancels this task. Only a stream that is still alive
        # after GOODBYE_CONFIRM_S said goodbye (which may finish the run). What it sent is
        # flushed at once either way (a flush is harmless after a cancel too): an early goodbye
        # (Welcome.flushes_at_goodbye) waits for these acks, not for the flush tick.
        if conn.run is not None:
            self.ingest.writer.flush_soon()
        await asyncio.sleep(GOODBYE_CONFIRM_S)
        if not (context.done() or context.cancelled()):
            self.ingest.half_close(conn)


def _is_operator(frame: pb.ClientFrame) -> bool:
    return frame.WhichOneof("kind") == "hello" and frame.hello.client_version == OPERATOR_CLIENT


def _check_not_operator(frame: pb.ClientFrame) -> None:
    """An operator stream (a clip command) without the operator scope is refused."""
    if _is_operator(frame):
        raise PermissionDenied(
            "clip commands need the operator token (the collector's --operator-token-file; "
            "the client's $STEPWATCH_TOKEN or --token-file)"
        )


# ---- the collector ---------------------------------------------------------------------------
class Collector:
    """Runs the server on its own event-loop thread. `start()` returns the bound port.

    `store` is a Store, or a StoreHandle that opens it on first use (a collector may start
    while its store is down). With config.spool_dir the spool is opened (and locked: a second
    collector on the same directory waits config.lock_timeout_s, then SpoolLocked)."""

    def __init__(self, store: Store | StoreHandle, config: CollectorConfig | None = None) -> None:
        self.handle = store if isinstance(store, StoreHandle) else StoreHandle(store)
        self.config = config or CollectorConfig()
        cfg = self.config
        self.counters = Counters()
        self.budget = ByteBudget(cfg.max_pending_bytes)
        self.control = ClipControl(self.counters, observe_only=cfg.observe_only)
        self.event_sink = EventSink()  # the detectors' events go through the writer, in order
        self.detect = (
            Detect(
                self.event_sink,  # type: ignore[arg-type]  # Detect only writes events, state
                self.control.push,
                self.counters,
                observe_only=cfg.observe_only,
                load_state=self._load_detect_state,
                read_store=self.handle.get,
            )
            if cfg.detect and not cfg.coordinator  # a tier's detectors run at its coordinator
            else None
        )
        self.spool = (
            Spool(
                cfg.spool_dir,
                max_bytes=cfg.spool_max_bytes,
                segment_bytes=cfg.spool_segment_bytes,
                lock_timeout_s=cfg.lock_timeout_s,
            )
            if cfg.spool_dir
            else None
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: aio.Server | None = None
        self._tasks: list[asyncio.Task] = []
        writer_cls: Callable[..., Writer] = Writer
        self._operator_forward: OperatorForward | None = None
        if cfg.coordinator:  # tier mode: partials to the coordinator (tier.py)
            from collector.tier import CoordinatorLink, OperatorForward, TierWriter

            link = CoordinatorLink(
                cfg.coordinator, cfg.token, on_clip=self._tier_clip, tls_ca=cfg.coordinator_tls_ca
            )
            self._operator_forward = OperatorForward(link)
            writer_cls = lambda *a, **kw: TierWriter(*a, link=link, goodbyes=self._goodbyes, **kw)
        self.writer = writer_cls(
            self.handle,
            flush_interval_s=cfg.flush_interval_s,
            flush_every_steps=cfg.flush_every_steps,
            on_flushed=self._flushed,
            release=self.budget.release,
            counters=self.counters,
            observer=self.detect,
            spool=self.spool,
            events=self.event_sink,
            retry_max_s=cfg.store_retry_max_s,
        )
        self.ingest = Ingest(
            self.config,
            self.writer,
            self.budget,
            self.control.clips,
            self.counters,
            on_clip_ack=self._tier_clip_ack if cfg.coordinator else self.control.acked,
            operator=None if cfg.coordinator else self.control.operator,  # tier: the servicer's
        )
        self.control.connect(self.writer, self.ingest, self.detect, call_soon=self._call_soon)
        self.port = 0

    def _load_detect_state(self, run: str) -> tuple[int, bytes] | None:
        """Writer thread, a run this process meets for the first time (detect.py): its saved
        detector state, and its stored clip table, so the restored policy's next version is
        newer than the one the ranks hold (they ignore one that is not)."""
        store = self.handle.get()
        if self.control.clips.adopt_stored(run, store.clips(run)):
            latest = self.control.clips.latest(run)
            log.info(
                "run %s: clip table reloaded (version %d)", run, latest.version if latest else 0
            )
        return store.detector_state(run)

    # tier mode (tier.py): the coordinator's clip table in, ranks' goodbyes and clip acks out
    def _tier_clip(self, run: str, update: pb.ClipUpdate) -> None:
        """Writer thread: the coordinator's newer clip table, to every rank of the run here
        (queued on the loop before the acks of the step whose answer carried it)."""
        if self.control.clips.adopt(run, update):
            self.counters.add("clip_updates")
            self._call_soon(self.ingest.broadcast_clip, run, update)

    def _goodbyes(self, run: str) -> list[int]:
        r = self.ingest.runs.get(run)
        return sorted(r.said_goodbye) if r is not None else []

    def _tier_clip_ack(self, run: str, version: int) -> int:
        from collector.tier import TierClipAcks, clip_acks_of

        acks = TierClipAcks(run, clip_acks_of(self.control.clips, run, version))
        return self.writer.submit(acks)  # type: ignore[arg-type]  # a TierWriter's job

    @property
    def store(self) -> Store | None:
        """The store, once opened (None while it has never answered)."""
        return self.handle.store

    # lifecycle
    def start(
        self, host: str = "127.0.0.1", port: int = 0, tls: tuple[bytes, bytes] | None = None
    ) -> int:
        """Listen on host:port (0 = any free port); tls = (cert_pem, key_pem). Without a
        token the config must say insecure, and host must be a loopback address."""
        if self._loop is not None:
            raise RuntimeError("collector already started")
        if self.config.token is None and not self.config.insecure:
            raise ValueError(
                "the collector needs a token (--token-file FILE or $STEPWATCH_TOKEN; "
                "ranks send the same) or an explicit --insecure, which listens on loopback only"
            )
        if self.config.insecure and not is_loopback(host):
            raise ValueError(
                f"--insecure listens on loopback only, not on {host!r}: give the collector a "
                "token (--token-file or $STEPWATCH_TOKEN) to listen there"
            )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="collector-loop", daemon=True
        )
        self._thread.start()
        self.writer.start()
        fut = asyncio.run_coroutine_threadsafe(self._serve(host, port, tls), self._loop)
        try:
            self.port = fut.result(timeout=30)
        except BaseException:
            self.stop()
            raise
        log.info("collector listening on %s:%d", host, self.port)
        return self.port

    async def _serve(self, host: str, port: int, tls: tuple[bytes, bytes] | None) -> int:
        cfg = self.config
        auth = _Auth(cfg.token, cfg.operator_token, self.counters)
        interceptors = [auth] if cfg.token or cfg.operator_token else []
        limit = self.config.max_message_bytes
        self._server = aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=self.config.max_streams,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),  # a taken port is an error, not shared
                # A client that vanished without closing (host down, partition) is found by
                # pings within ~KEEPALIVE_S + KEEPALIVE_TIMEOUT_S, which frees its identity.
                ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
            ],
        )
        pbg.add_TelemetryServicer_to_server(
            TelemetryServicer(
                self.ingest,
                self.counters,
                on_clip_sent=self.control.sent,
                auth=auth,
                reject_log_interval_s=self.config.reject_log_interval_s,
                forward_operator=self._operator_forward,
            ),
            self._server,
        )
        address = f"{host}:{port}"
        try:
            if tls:
                creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
                bound = self._server.add_secure_port(address, creds)
            else:
                bound = self._server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc's "Failed to bind"
            raise OSError(f"could not listen on {address} (port taken?): {exc}") from None
        await self._server.start()
        self._tasks = [
            asyncio.create_task(self._every(self.config.tick_s, self.ingest.tick)),
            asyncio.create_task(self._every(self.config.keepalive_s, self.ingest.keepalive)),
            asyncio.create_task(self._every(self.config.stats_log_interval_s, self._log_stats)),
        ]
        return bound

    @staticmethod
    async def _every(period: float, fn: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                fn()
            except Exception:  # never let a periodic job die silently
                log.exception("periodic %s failed", getattr(fn, "__name__", fn))

    def stop(self) -> bool:
        """Stop accepting streams, reduce what is pending (incomplete), make it durable (the
        store, or the spool once half of stop_timeout_s is gone), mark runs finished, send the
        last acks, then end open streams with UNAVAILABLE so their clients reconnect (to the
        next collector). Returns within about stop_timeout_s; True if everything received
        became durable (what did not was never acked). The store stays open (its owner
        closes it)."""
        loop = self._loop
        if loop is None or not self._thread:
            return True
        deadline = time.monotonic() + self.config.stop_timeout_s
        left = lambda: max(0.5, deadline - time.monotonic())
        self._on_loop(self._begin_shutdown, left())
        clean = False
        try:
            clean = self.writer.close(timeout=left() - 1.0)  # acks queue on the loop
        except Exception:
            log.exception("collector stop: the writer failed to close")
        self._on_loop(self._end_shutdown, min(left(), self.config.stop_grace_s + 1.0))
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=min(left(), 10))
        if not self._thread.is_alive():
            loop.close()
        self._loop = None
        if self._operator_forward is not None:
            self._operator_forward.close()
        self._log_stats()
        return clean

    def _on_loop(self, coro_fn, timeout: float) -> None:
        """Run a shutdown phase on the loop; log (never raise) so the flush still happens."""
        try:
            if self._loop is not None and self._loop.is_running():
                asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout)
        except Exception:
            log.exception("collector stop: %s failed", coro_fn.__name__)

    async def _begin_shutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._server is not None:  # refuses new RPCs at once; waits for open ones
            self._tasks = [asyncio.create_task(self._server.stop(self.config.stop_grace_s))]
        self.ingest.stopping = True
        self.ingest.finish_all()

    async def _end_shutdown(self) -> None:
        self.ingest.end_streams(
            Unavailable("collector shutting down; reconnect and resend what is not acked")
        )
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _flushed(self, through_job: int, failed: set[int]) -> None:
        """Writer thread -> event loop: acks are computed and sent on the loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing during shutdown
                loop.call_soon_threadsafe(self.ingest.on_flushed, through_job, failed)

    def _call_soon(self, fn: Callable[..., None], *args: object) -> None:
        """Any thread -> event loop: fn(*args) is called there, if the loop runs."""
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(fn, *args)

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # control plane (control.py) and introspection (any thread)
    def push_clip(
        self, run: str, settings: Iterable[tuple[int, str, float]], reason: str = "operator"
    ) -> int:
        """ClipControl.push_clip: a new version of the run's clip table, stored and sent to
        every rank of the run. Returns the version."""
        return self.control.push_clip(run, settings, reason)

    def clip_acks(self, run: str) -> list[ClipAckRecord]:
        return self.control.acks(run)

    def clip_latency_ms(self, run: str) -> dict[int, float]:
        """ClipControl.latency_ms: version -> ms from its step's last frame to the wire."""
        return self.control.latency_ms(run)

    def events(self, run: str) -> list:
        """The online detectors' events of a run (analytics.events.Event), oldest first."""
        return self.detect.events(run) if self.detect else []

    def stats(self) -> dict[str, int]:
        out = self.counters.snapshot()
        out["pending_bytes"] = self.budget.used
        out["dictionary_bytes"] = self.ingest.dict_budget.used
        out["writer_backlog"] = self.writer.backlog
        out["runs"] = len(self.ingest.runs)
        out["spooling"] = int(self.writer.spooling)
        out["spool_bytes"] = self.spool.size if self.spool is not None else 0
        return out

    def _log_stats(self) -> None:
        log.info("stats %s", " ".join(f"{k}={v}" for k, v in self.stats().items() if v))


# ---- serve -----------------------------------------------------------------------------------
def serve(
    store_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    config: CollectorConfig | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; prints `collector listening on HOST:PORT store=URL` (flushed)
    once ready. Returns the exit status: 0 after a clean stop with everything received made
    durable (store or spool), 1 if something was not (it was never acked: clients resend it).

    A store that does not answer at start is opened later, like any store write retried,
    when there is a spool to hold the writes meanwhile. A Parquet store directory and the
    spool directory are each locked for this process: a collector still holding them (one
    draining after SIGTERM) is waited for up to config.lock_timeout_s, then we refuse."""
    import signal

    from collector import gcpolicy
    from store import open_store

    config = config or CollectorConfig()
    tls = auth.server_tls(tls_cert, tls_key)
    try:
        handle = StoreHandle(open_store(store_url))
    except InvalidInput:
        raise
    except StoreError as exc:
        if not config.spool_dir:
            raise
        log.warning("store unavailable at start (%s); spooling until it answers", exc)
        handle = StoreHandle(opener=lambda: open_store(store_url))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    clean = False
    try:
        if handle.store is not None:
            handle.store.lock_writer(config.lock_timeout_s)
        collector = Collector(handle, config)  # takes the spool's lock
        try:
            bound = collector.start(host, port, tls)
            gcpolicy.tune()
            print(f"collector listening on {host}:{bound} store={store_url}", flush=True)
            while not stop.wait(0.5):
                pass
            log.info("stopping: no new streams, making what is held durable, finishing runs")
        finally:
            clean = collector.stop()
    finally:
        if handle.store is not None:
            try:
                handle.store.close()
            except Exception:
                log.warning("closing the store failed", exc_info=True)
    return 0 if clean else 1
