"""The wire inside a collector tier: the coordinator's server and the collectors' client.

    service TIER_SERVICE (unary RPCs; payloads in jobs.py's record format, JSON meta + raw
    little-endian arrays; rank-facing proto/v1 is untouched):
        Register  run info + new metric-dictionary rows -> the run's global ids
        Partial   a step's partial (partials.py), `wait` or not -> status, covered ranks, the
                  run's clip table
        Finish    ranks that said goodbye
        ClipAcks  (rank, version, step) acks of the collector's ranks

What each call means is coordinator.py's (the state) and tier.py's (when a collector calls):
this module only moves bytes. `CoordinatorServer` serves a Coordinator: every call carries the
bearer token (the collectors'), bad input is INVALID_ARGUMENT, a store away or a wait that
timed out is UNAVAILABLE (the caller retries). `CoordinatorLink` is the collector's side: it
retries UNAVAILABLE-like codes with jittered exponential backoff (to 2 s) for as long as the
collector runs, and gives up (jobs.NotDurable) once it stops, or on a permanent refusal.
"""

from __future__ import annotations

import hmac
import json
import logging
import random
import threading
from collections.abc import Callable
from concurrent import futures

import grpc
import numpy as np

from collector import gcpolicy
from collector.coordinator import Coordinator
from collector.errors import InvalidArgument, Unavailable
from collector.jobs import NotDurable, _pack, _unpack, pack_metrics, unpack_metrics
from collector.partials import Partial
from proto import auth
from proto.v1 import telemetry_pb2 as pb
from store.base import MetricDict, NotFound, RunInfo

log = logging.getLogger("collector.tierwire")
TIER_SERVICE = "stepwatch.tier.v1.Coordinator"


# ---- the coordinator's side ---------------------------------------------------------------------
class CoordinatorServer:
    """The coordinator's gRPC server: TIER_SERVICE's unary RPCs on a thread pool (a waiting
    Partial holds one thread), the bearer token on every call, and the ticker thread."""

    def __init__(self, co: Coordinator, token: str | None = None) -> None:
        self.co = co
        self._token = f"Bearer {token}".encode() if token else None
        self._server: grpc.Server | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self.port = 0

    def start(
        self, host: str = "127.0.0.1", port: int = 0, tls: tuple[bytes, bytes] | None = None
    ) -> int:
        """Listen on host:port (0: a free one), with TLS when `tls` = (cert chain, key) PEM."""
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="coordinator"),
            options=[
                ("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 256 << 20),
                ("grpc.so_reuseport", 0),
            ],
        )
        handlers = {
            "Register": self._rpc(self._on_register),
            "Partial": self._rpc(self._on_partial),
            "Finish": self._rpc(self._on_finish),
            "ClipAcks": self._rpc(self._on_clip_acks),
            "Operate": self._rpc(self._on_operate),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(TIER_SERVICE, handlers),)
        )
        try:
            self.port = (
                self._server.add_secure_port(
                    f"{host}:{port}", grpc.ssl_server_credentials([(tls[1], tls[0])])
                )
                if tls
                else self._server.add_insecure_port(f"{host}:{port}")
            )
        except RuntimeError as exc:
            raise OSError(f"could not listen on {host}:{port} (port taken?): {exc}") from None
        self._server.start()
        self._ticker = threading.Thread(
            target=self._tick_loop, name="coordinator-tick", daemon=True
        )
        self._ticker.start()
        return self.port

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.stop(2.0).wait(5.0)
        self.co.flush()

    def _tick_loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.co.tick()
            except Exception:
                log.exception("coordinator tick failed")

    def _rpc(self, fn: Callable[[bytes], bytes]) -> grpc.RpcMethodHandler:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            got = dict(context.invocation_metadata()).get("authorization", "")
            got_b = got.encode() if isinstance(got, str) else got
            if self._token is not None and not hmac.compare_digest(got_b, self._token):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
            try:
                return fn(request)
            except (ValueError, KeyError, TypeError, InvalidArgument) as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(exc).__name__}: {exc}")
            except TimeoutError as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            except NotFound as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            except Exception as exc:  # the store is away, or a bug: the caller retries
                log.exception("coordinator RPC failed")
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{type(exc).__name__}: {exc}")
            raise AssertionError("unreachable")  # context.abort raises

        return grpc.unary_unary_rpc_method_handler(handle)

    def _on_register(self, request: bytes) -> bytes:
        meta, a = _unpack(request)
        info = RunInfo(
            meta["run"],
            int(meta["world_size"]),
            meta.get("config_json", "{}"),
            float(meta.get("started_at", 0.0)),
        )
        md = unpack_metrics(meta, a)
        return b"".join(_pack({}, [self.co.register(info.run, info, md)]))

    def _on_partial(self, request: bytes) -> bytes:
        p = Partial.decode(request)
        status, covered = self.co.partial(p)
        clip = self.co.clip_table(p.run)
        blob = np.frombuffer(clip.SerializeToString(), np.uint8) if clip else np.empty(0, np.uint8)
        return b"".join(_pack({"status": status, "covered": covered}, [blob]))

    def _on_finish(self, request: bytes) -> bytes:
        m = json.loads(request)
        self.co.finish_ranks(m["run"], [int(r) for r in m["ranks"]], m["status"])
        return b"{}"

    def _on_clip_acks(self, request: bytes) -> bytes:
        m = json.loads(request)
        self.co.clip_acks(m["run"], [(int(r), int(v), int(s)) for r, v, s in m["acks"]])
        return b"{}"

    def _on_operate(self, request: bytes) -> bytes:
        m = json.loads(request)
        return self.co.operate(str(m["run"]), str(m["command"])).SerializeToString()


def serve_coordinator(
    store_url: str,
    *,
    host: str,
    port: int,
    token: str | None,
    straggler_timeout_s: float,
    detect: bool,
    observe_only: bool,
    insecure: bool,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; prints `coordinator listening on HOST:PORT store=URL`. With
    tls_cert and tls_key (PEM files) the collectors' link is TLS."""
    import signal

    from collector.server import is_loopback
    from store import open_store

    if token is None and not insecure:
        raise ValueError(
            "the coordinator needs a token (--token-file or $STEPWATCH_TOKEN) "
            "or an explicit --insecure, which listens on loopback only"
        )
    if insecure and not is_loopback(host):
        raise ValueError(f"--insecure listens on loopback only, not on {host!r}")
    tls = auth.server_tls(tls_cert, tls_key)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    store = open_store(store_url)
    try:
        store.lock_writer(60.0)
        co = Coordinator(
            store, straggler_timeout_s=straggler_timeout_s, detect=detect, observe_only=observe_only
        )
        server = CoordinatorServer(co, token)
        bound = server.start(host, port, tls)
        gcpolicy.tune()
        print(f"coordinator listening on {host}:{bound} store={store_url}", flush=True)
        while not stop.wait(0.5):
            pass
        server.stop()
    finally:
        store.close()
    return 0


# ---- a collector's side ------------------------------------------------------------------------
RETRIABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNKNOWN,
)


class CoordinatorLink:
    """The tier collector's client of the coordinator (writer thread only, but for `stop`).
    Holds each run's info and its local -> global metric id map."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        on_clip: Callable[[str, pb.ClipUpdate], None] | None = None,
        tls_ca: str | None = None,
    ) -> None:
        """tls_ca: a PEM file of the roots to trust; the link is then TLS."""
        self.address = address
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_send_message_length", 256 << 20),
            ("grpc.max_receive_message_length", 256 << 20),
        ]
        credentials = auth.client_credentials(tls_ca=tls_ca, environ={}) if tls_ca else None
        self._channel = (
            grpc.secure_channel(address, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(address, options=options)
        )
        self.on_clip = on_clip
        self.info: dict[str, RunInfo] = {}
        self.global_of: dict[str, np.ndarray] = {}  # run -> int32 [local id] -> global id
        self._stopping = threading.Event()
        self._clip_version: dict[str, int] = {}

    def stop(self) -> None:
        """The collector is stopping: calls that fail now give up (NotDurable)."""
        self._stopping.set()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, payload: bytes) -> bytes:
        fn: Callable[..., bytes] = self._channel.unary_unary(f"/{TIER_SERVICE}/{method}")
        backoff = 0.05
        while True:
            try:
                return fn(payload, metadata=self._metadata, timeout=120.0)
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in RETRIABLE:
                    raise NotDurable(
                        f"coordinator refused {method}: {code.name} {exc.details()}"
                    ) from None
                if self._stopping.is_set():
                    raise NotDurable(
                        f"stopping; coordinator {self.address} did not take {method} ({code.name})"
                    ) from None
                log.warning(
                    "coordinator %s: %s %s; retrying in %.2f s",
                    self.address,
                    method,
                    code.name,
                    backoff,
                )
                self._stopping.wait(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 2.0)

    # ---- the calls -------------------------------------------------------------------------
    def register(self, run: str, md: MetricDict) -> np.ndarray:
        info = self.info[run]
        meta = {
            "run": run,
            "world_size": info.world_size,
            "config_json": info.config_json,
            "started_at": info.started_at,
        }
        # the registry's string columns may be polars Series: pack_metrics sends JSON lists
        reply = self._call("Register", b"".join(pack_metrics(meta, md)))
        gids = _unpack(reply)[1][0].astype(np.int32)
        g = self.global_of.get(run, np.empty(0, np.int32))
        top = int(md.metric_id.max()) + 1 if md.metric_id.size else 0  # local ids are dense
        if top > g.size:
            g = np.concatenate([g, np.full(top - g.size, -1, np.int32)])
        g[md.metric_id] = gids
        self.global_of[run] = g
        return gids

    def open(self, run: str) -> None:
        """Register no names: the coordinator opens the run (stored before it answers)."""
        none = np.empty(0, np.int32)
        self.register(run, MetricDict(none, [], none, none, none, [], [], []))

    def partial(
        self, make: Callable[[frozenset[int]], Partial], ranks: frozenset[int], wait: bool
    ) -> frozenset[int]:
        """Send the step's partial over `ranks`; on "overlap" (some of them are covered by
        another collector's partial: they failed over mid-step) send it over the rest.
        wait: the answer comes once the step is reduced and stored at the coordinator (its
        clip table goes to on_clip). Returns the ranks the partial was taken with."""
        while ranks:
            p = make(ranks)
            p.wait = wait
            meta, arrays = _unpack(self._call("Partial", p.encode()))
            self._clip(p.run, arrays[0])
            if meta["status"] != "overlap":
                return ranks
            ranks = ranks - frozenset(meta["covered"])
        return ranks

    def _clip(self, run: str, blob: np.ndarray) -> None:
        if not blob.size or self.on_clip is None:
            return
        update = pb.ClipUpdate.FromString(blob.tobytes())
        if update.version > self._clip_version.get(run, 0):
            self._clip_version[run] = update.version
            self.on_clip(run, update)

    def finish(self, run: str, ranks: list[int], status: str) -> None:
        self._call("Finish", json.dumps({"run": run, "ranks": ranks, "status": status}).encode())

    def clip_acks(self, run: str, acks: list[tuple[int, int, int]]) -> None:
        self._call("ClipAcks", json.dumps({"run": run, "acks": acks}).encode())

    def operate(self, run: str, command: str, timeout_s: float = 10.0) -> pb.ClipUpdate:
        """An operator's command to the coordinator, once (an operator retries, not we):
        its answer, or the coordinator's refusal as a CollectorError with its reason."""
        fn: Callable[..., bytes] = self._channel.unary_unary(f"/{TIER_SERVICE}/Operate")
        payload = json.dumps({"run": run, "command": command}).encode()
        try:
            return pb.ClipUpdate.FromString(fn(payload, metadata=self._metadata, timeout=timeout_s))
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(details) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise Unavailable(
                    f"the tier's coordinator {self.address} did not answer the clip command "
                    f"within {timeout_s:g} s; it may still apply it: `collector clip list` "
                    "shows the table it holds"
                ) from None
            raise Unavailable(
                f"the tier's coordinator {self.address} did not take the clip command: "
                f"{code.name} {details}"
            ) from None
