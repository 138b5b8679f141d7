"""The node agent: one per host, the ranks of that host stream to it, it streams to the collector.

    python -m collector agent --upstream HOST:PORT --listen unix:/run/stepwatch.sock
        [--token-file F | $STEPWATCH_TOKEN] [--local-token-file F] [--insecure] [--tls-ca C]

The agent serves the same Telemetry service to its local ranks (an unmodified hooks client
points at it: `target="unix:/run/stepwatch.sock"`) and keeps ONE multiplexed stream to the
collector that carries every local rank's frames (mux.py is the collector's side): each rank's
Hello goes up marked `multiplexed`, its frames follow as they are (whatever is waiting goes as
one FrameBatch message once the collector's Welcome says takes_batches), and whatever the collector
sends names the rank it is for (ServerFrame.to); a ClipUpdate for a run comes once per host
and is fanned out here to each local rank of that run. So 4,096 ranks on 512 hosts are 512
streams at the collector, with the ranks' own protocol end to end.

Delivery guarantees are the ranks' own, unchanged: the agent holds nothing durable and acks
nothing itself; a rank's Ack is the collector's Ack for that rank, relayed once it arrives.
Every rank keeps its unacknowledged frames (hooks/sender), so nothing is lost when any hop
fails. When the upstream stream breaks (the collector restarts, the connection is cut), the
agent ends every local stream with UNAVAILABLE; the ranks reconnect with their backoff, the
agent opens a new upstream stream, forwards their Hellos again, and each rank resends from
its Welcome.acked_seq. A rank that connects while there is no upstream is held up to HOLD_S
for it (so the ranks' backoff does not grow through a short reconnect), then refused
UNAVAILABLE (retried). An agent that crashes costs the same: the ranks reconnect to the next one.

Local rules, so that one stream can carry many ranks safely: a local stream's frames must
all name the rank its Hello named (else INVALID_ARGUMENT: one rank can never write another's
data); one stream per (run, rank) at a time, with the collector's identity rule (the same
client session takes over, another is refused ALREADY_EXISTS); clip commands go to the
collector directly. A collector too old for multiplexed streams answers a Welcome without
`to`: the ranks are refused FAILED_PRECONDITION (permanent) and the log says to upgrade it or
point the ranks at it. Auth: the agent sends its own token upstream (--token-file,
$STEPWATCH_TOKEN, as ranks do) and requires a token of its local ranks (the same one unless
--local-token-file), or --insecure, which listens on a unix socket or loopback only; TLS
upstream with --tls / --tls-ca, on the local listener with --tls-cert / --tls-key.

Memory is bounded: the frames up wait in one queue of `max_queued_bytes` (a full queue
holds the ranks' reads, gRPC's flow control pushes back to them); the frames down coalesce
per rank (the latest Ack and clip table only), as the collector's conn.py does.

Here: the agent (NodeAgent: the local server, the upstream loop) and the local rules
(_AgentServicer); relay.py holds the per-rank and per-upstream state, agent_cli.py the
command line and the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass

import grpc
from grpc import aio

from collector.operator import OPERATOR_CLIENT
from collector.relay import OK, Local, Upstream
from collector.server import GOODBYE_CONFIRM_S, _Auth, is_loopback
from collector.stats import Counters
from proto import auth
from proto.v1 import telemetry_pb2 as pb
from proto.v1 import telemetry_pb2_grpc as pbg

log = logging.getLogger("collector.agent")
BACKOFF_S, BACKOFF_MAX_S = 0.2, 5.0  # upstream reconnects: doubling, jittered
HOLD_S = 5.0  # a rank that connects while the upstream reconnects waits this long for it
UPSTREAM_OPTIONS = [
    ("grpc.max_send_message_length", 8 << 20),
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.use_local_subchannel_pool", 1),  # its own connection, even beside other agents
]
COUNTERS = (
    "auth_failures",  # local RPCs refused UNAUTHENTICATED
    "local_streams",  # local ranks' streams accepted
    "local_refused_no_upstream",  # refused UNAVAILABLE: no upstream stream yet
    "upstream_connects",  # multiplexed streams opened to the collector
    "upstream_losses",  # ... and lost (every local stream then ends UNAVAILABLE)
    "clips_fanned_out",  # local deliveries of clip tables the collector sent once per host
    "down_frames_unrouted",  # frames for a rank that had already left the agent
)
TOO_OLD = (
    "the collector at {target} does not take a node agent's multiplexed stream (it predates "
    "Hello.multiplexed): upgrade it, or point the ranks at it directly"
)


@dataclass
class AgentConfig:
    upstream: str
    """The collector, HOST:PORT."""
    token: str | None = None
    """Sent upstream with every RPC (the collector's token)."""
    local_token: str | None = None
    """Required of every local rank's RPC; None with insecure only."""
    insecure: bool = False
    """Accept local ranks without a token: on a unix socket or loopback only."""
    credentials: grpc.ChannelCredentials | None = None
    """TLS to the collector (proto.auth.client_credentials), None for plaintext."""
    tls: tuple[bytes, bytes] | None = None
    """(cert_pem, key_pem): the local listener speaks TLS (a TCP listen off this machine);
    None for plaintext (a unix socket, loopback)."""
    max_queued_bytes: int = 64 << 20
    """Bytes of frames waiting to go upstream; a full queue pushes back on the ranks (one
    frame always fits, whatever its size)."""

    def __post_init__(self) -> None:
        if self.insecure and self.local_token is not None:
            raise ValueError("give the agent a local token or --insecure, not both")
        if self.max_queued_bytes < 1:
            raise ValueError("max_queued_bytes must be >= 1")


# ---- the agent ---------------------------------------------------------------------------------
class NodeAgent:
    """Runs on the caller's event loop: `await start(listen)` returns the bound address,
    `await stop()` ends it."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.counters = Counters(COUNTERS)
        self.up: Upstream | None = None
        self._server: aio.Server | None = None
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self._ready = asyncio.Event()  # an upstream stream is open
        self.last_upstream_error = ""  # why the last upstream stream ended

    async def start(self, listen: str) -> str:
        cfg = self.config
        local = listen.startswith("unix:") or is_loopback(listen.rsplit(":", 1)[0])
        if cfg.local_token is None and not cfg.insecure:
            raise ValueError(
                "the agent needs its ranks' token (--local-token-file, else the upstream "
                "token from --token-file or $STEPWATCH_TOKEN) or an explicit --insecure"
            )
        if cfg.insecure and not local:
            raise ValueError(
                f"--insecure listens on a unix socket or loopback only, not on {listen!r}"
            )
        interceptors = [_Auth(cfg.local_token, None, self.counters)] if cfg.local_token else []
        self._server = aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.so_reuseport", 0)],
        )
        pbg.add_TelemetryServicer_to_server(_AgentServicer(self), self._server)
        if listen.startswith("unix:"):
            _remove_stale_socket(listen[len("unix:") :])
        try:
            if cfg.tls is not None:
                creds = grpc.ssl_server_credentials([(cfg.tls[1], cfg.tls[0])])
                bound = self._server.add_secure_port(listen, creds)
            else:
                bound = self._server.add_insecure_port(listen)
        except RuntimeError as exc:
            raise OSError(f"could not listen on {listen} (taken?): {exc}") from None
        await self._server.start()
        self._loop_task = asyncio.create_task(self._upstream_loop())
        if listen.startswith("unix:"):
            return listen
        return f"{listen.rsplit(':', 1)[0]}:{bound}"

    async def stop(self, grace_s: float = 2.0) -> None:
        self._stopping = True
        if self.up is not None:  # the ranks reconnect (to this host's next agent) and resend
            self.up.fail_all("UNAVAILABLE", "the node agent is stopping; reconnect and resend")
            await asyncio.sleep(0.2)  # their Error frames and statuses go out
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    # ---- upstream -------------------------------------------------------------------------
    async def _upstream_loop(self) -> None:
        cfg, backoff = self.config, BACKOFF_S
        metadata = auth.bearer(cfg.token)
        while not self._stopping:
            channel = (
                aio.secure_channel(cfg.upstream, cfg.credentials, options=UPSTREAM_OPTIONS)
                if cfg.credentials is not None
                else aio.insecure_channel(cfg.upstream, options=UPSTREAM_OPTIONS)
            )
            up, call = Upstream(cfg.max_queued_bytes), None
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout=backoff * 10)
                call = pbg.TelemetryStub(channel).Stream(up.requests(), metadata=metadata)
                self.up = up
                self._ready.set()
                self.counters.add("upstream_connects")
                log.info("node agent: streaming to %s", cfg.upstream)
                backoff = BACKOFF_S
                reason = await self._read_upstream(up, call)
            except TimeoutError:
                reason = "not reachable"
            except grpc.RpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            finally:
                self.up = None
                self._ready.clear()
                up.post(None)  # ends the request iterator before the channel goes
                if call is not None:
                    call.cancel()
            self.last_upstream_error = reason
            up.fail_all(
                "UNAVAILABLE",
                f"the node agent lost its collector ({cfg.upstream}: {reason}); reconnect and "
                "resend what is not acked",
            )
            await channel.close()
            if self._stopping:
                return
            self.counters.add("upstream_losses")
            log.warning("node agent: upstream %s: %s; retrying", cfg.upstream, reason)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    async def _read_upstream(self, up: Upstream, call) -> str:
        async for frame in call:
            if not frame.HasField("to"):  # an untagged frame: the stream is not multiplexed
                if frame.WhichOneof("kind") == "welcome":
                    message = TOO_OLD.format(target=self.config.upstream)
                    log.error("node agent: %s", message)
                    up.fail_all("FAILED_PRECONDITION", message, permanent=True)
                    call.cancel()
                    return "too old for a node agent"
                if frame.WhichOneof("kind") == "error":
                    log.warning("node agent: collector: %s", frame.error.message)
                continue
            if frame.WhichOneof("kind") == "welcome" and frame.welcome.takes_batches:
                up.batches = True
            up.route(frame, self.counters)
        return "the collector ended the stream"


class _AgentServicer(pbg.TelemetryServicer):
    """The Telemetry service to local ranks: relay up and down, check the local rules."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    async def Stream(self, request_iterator, context):
        up = self.agent.up
        if up is None or up.dead:  # reconnecting: hold the rank a moment rather than refuse
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.agent._ready.wait(), HOLD_S)
            up = self.agent.up
        if up is None or up.dead:
            self.agent.counters.add("local_refused_no_upstream")
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the node agent has no connection to its collector "
                f"({self.agent.config.upstream}) yet; retry",
            )
        assert up is not None
        local = Local()
        up.streams.add(local)  # from here on, losing the upstream ends this stream too
        self.agent.counters.add("local_streams")
        reader = asyncio.create_task(self._read(up, local, request_iterator, context))
        try:
            while True:
                for frame in local.take():
                    yield frame
                if local.end is not None:
                    code, message, permanent = local.end
                    if code == OK:
                        return
                    yield pb.ServerFrame(
                        error=pb.Error(code=code, message=message, permanent=permanent)
                    )
                    await context.abort(grpc.StatusCode[code], message)
                await local.wake.wait()
                local.wake.clear()
        finally:
            reader.cancel()
            up.streams.discard(local)
            key = local.key
            if key is not None and up.locals.get(key) is local:  # this stream still owns it
                del up.locals[key]
                if not up.dead:
                    up.goodbye(key, half_closed=False)  # forgets the rank's part upstream

    async def _read(self, up: Upstream, local: Local, request_iterator, context) -> None:
        try:
            async for message in request_iterator:
                # a rank's backlog may come as one FrameBatch (its Welcome, the collector's,
                # says takes_batches): its frames go up one by one, batched again there
                batch = message.batch.frames if message.WhichOneof("kind") == "batch" else None
                for frame in batch if batch is not None else (message,):
                    refusal = self._refusal(up, local, frame, batched=batch is not None)
                    if refusal is not None:
                        code, text = refusal
                        local.finish(code, text, code == "INVALID_ARGUMENT")
                        return
                    if local.end is not None:
                        return
                    if frame.WhichOneof("kind") == "hello":
                        frame.hello.multiplexed = True
                    await up.put(frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - bad frame or transport: this rank only
            if not (context.done() or context.cancelled()):
                local.finish("INVALID_ARGUMENT", f"bad frame: {exc}", True)
            return
        await asyncio.sleep(GOODBYE_CONFIRM_S)  # as the collector: a cancel looks like an end
        if context.done() or context.cancelled() or up.dead:
            return
        if local.key is None:
            local.finish(OK, "", False)
        elif up.locals.get(local.key) is local:
            up.goodbye(local.key, half_closed=True)

    def _refusal(
        self, up: Upstream, local: Local, frame: pb.ClientFrame, batched: bool = False
    ) -> tuple[str, str] | None:
        """(code, message) when the frame breaks a local rule; registers a Hello's rank."""
        kind = frame.WhichOneof("kind")
        if kind is None or kind == "goodbye":
            return "INVALID_ARGUMENT", f"a rank does not send {kind or 'an empty frame'}"
        if batched and kind in ("batch", "hello"):
            return "INVALID_ARGUMENT", f"a FrameBatch holds data frames only, not {kind}"
        if local.key is None:
            if kind != "hello":
                return "INVALID_ARGUMENT", f"the first frame of a stream must be Hello, got {kind}"
            hello = frame.hello
            if hello.client_version == OPERATOR_CLIENT:
                return "INVALID_ARGUMENT", "clip commands go to the collector, not a node agent"
            key = (hello.header.run, hello.header.rank)
            held = up.locals.get(key)
            if held is not None and held.end is None:
                if not (hello.session and hello.session == held.session):
                    return "ALREADY_EXISTS", (
                        f"rank {key[1]} of run {key[0]!r} is already streaming through this "
                        "node agent (another client session): a second job cannot share it"
                    )
                held.finish("ABORTED", "superseded by a newer stream of the same client", False)
                del up.locals[key]
                up.goodbye(key, half_closed=False)
            local.key, local.session = key, hello.session
            up.locals[key] = local
            return None
        if kind == "hello":
            return "INVALID_ARGUMENT", "Hello only opens a stream"
        h = getattr(frame, kind).header
        if (h.run, h.rank) != local.key:
            return "INVALID_ARGUMENT", (
                f"{kind} header names run {h.run!r} rank {h.rank}, but this stream said Hello "
                f"as run {local.key[0]!r} rank {local.key[1]}"
            )
        return None


def _remove_stale_socket(path: str) -> None:
    """A socket file nobody listens on (an agent killed -9) is removed; a live one is kept,
    so binding fails and a second agent never steals a running one's ranks."""
    import os
    import socket
    import stat

    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
    raise OSError(f"another process listens on unix:{path} (a running agent?)")
