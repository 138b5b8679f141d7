"""A node agent's multiplexed stream, as the collector sees it: one gRPC stream, many ranks.

A node agent (agent.py) forwards all the ranks of its host on one stream. Every Hello it
forwards says `multiplexed`; each opens one rank's part of the stream, a `Conn` of its own
(a "sub-conn"), so Ingest applies the rank's frames exactly as on the rank's own stream: the
same trust rules, the same acks, the same identity rule. Frames up are routed by their
FrameHeader (run, rank); a Goodbye ends one rank's part (half-closed or gone). Down, the
sub-conns' coalescing slots share one wake-up; every frame is tagged with `to` (the rank it
is for), and a ClipUpdate that every welcomed rank of a run on this stream gets in the same
round goes out once, to rank -1, for the agent to fan out: a host gets one copy, not eight.

A rank's refused frame ends that rank's part only (a tagged Error), never the other ranks'.
The agent keeps the local rule that one rank's frames can only name that rank; here a frame
for a rank that has no open part on this stream is the agent's bug and ends the whole stream.
Event-loop thread only, like Ingest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from collector.conn import Conn
from collector.errors import REJECTED, InvalidArgument, is_permanent, status_of
from collector.ingest import Ingest
from collector.operator import OPERATOR_CLIENT
from collector.stats import Counters
from proto.v1 import telemetry_pb2 as pb

log = logging.getLogger("collector")
Key = tuple[str, int]  # (run, rank)
BROADCAST_RANK = -1  # ServerFrame.to.rank: every rank of the run on this stream
STOPPING_POLL_S = 0.5  # how soon an idle multiplexed stream notices the collector stopping


def is_multiplexed(frame: pb.ClientFrame) -> bool:
    return frame.WhichOneof("kind") == "hello" and frame.hello.multiplexed


async def first_frame(
    request_iterator: AsyncIterator[pb.ClientFrame],
    context,
    stopping: Callable[[], bool],
) -> tuple[pb.ClientFrame | None, AsyncIterator[pb.ClientFrame]]:
    """The stream's first frame (None: it ended first), and an iterator that yields it again
    followed by the rest: the servicer picks the rank path or the multiplexed one by it.
    A stream still silent when the collector stops (an idle node agent's) ends UNAVAILABLE."""
    it = request_iterator.__aiter__()
    first: pb.ClientFrame | None = None
    failed: Exception | None = None
    task = asyncio.ensure_future(it.__anext__())
    while not task.done():
        await asyncio.wait({task}, timeout=STOPPING_POLL_S)
        if not task.done() and stopping():
            task.cancel()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "collector shutting down")
    try:
        first = task.result()
    except StopAsyncIteration:
        pass
    except Exception as exc:  # noqa: BLE001 - an undecodable first frame: the rank path reports it
        failed = exc

    async def chained() -> AsyncIterator[pb.ClientFrame]:
        if failed is not None:
            raise failed
        if first is None:
            return
        yield first
        async for frame in it:
            yield frame

    return first, chained()


def _to(run: str, rank: int) -> pb.FrameHeader:
    return pb.FrameHeader(run=run, rank=rank, step=-1, seq=0)


class MuxStream:
    """The ranks' parts of one multiplexed stream: `receive` routes frames up, `take` the
    tagged frames down; `close` detaches whatever is still attached."""

    def __init__(self, ingest: Ingest, counters: Counters, peer: str) -> None:
        self.ingest = ingest
        self.counters = counters
        self.peer = peer
        self.subs: dict[Key, Conn] = {}
        self.closed: set[Key] = set()  # parts whose end went down; their late frames are dropped
        self.welcomed: set[Key] = set()
        self.wake = asyncio.Event()
        self.error: BaseException | None = None  # ends the whole stream
        self.ended = False  # the agent closed the stream

    # ---- up -------------------------------------------------------------------------------
    def receive(self, frame: pb.ClientFrame, nested: bool = False) -> None:
        kind = frame.WhichOneof("kind")
        if kind == "batch":  # several frames in one message (the Welcome said takes_batches)
            if nested:
                raise InvalidArgument("a FrameBatch inside a FrameBatch")
            self.counters.add("mux_batches")
            for inner in frame.batch.frames:
                self.receive(inner, nested=True)
            return None
        self.counters.add("mux_frames")
        if kind is None:
            raise InvalidArgument("empty ClientFrame on a multiplexed stream")
        h = getattr(frame, kind).header
        key = (h.run, h.rank)
        if kind == "hello":
            return self._hello(key, frame)
        conn = self.subs.get(key)
        if conn is None:
            raise InvalidArgument(
                f"{kind} for run {h.run!r} rank {h.rank}, which has no Hello on this "
                "multiplexed stream (a node agent opens every rank with its own Hello)"
            )
        if kind == "goodbye" and not frame.goodbye.half_closed:
            self._forget(key)  # the rank's stream to the agent is gone, ended here or not
            return None
        if key in self.closed:  # in flight when its part ended: the rank resends it
            self.counters.add("mux_frames_late")
            return None
        if kind == "goodbye":
            self.ingest.half_close(conn)
            return None
        self._apply(key, conn, frame)

    def _hello(self, key: Key, frame: pb.ClientFrame) -> None:
        if not frame.hello.multiplexed:
            raise InvalidArgument("every Hello on a multiplexed stream says multiplexed")
        if key in self.subs:  # the agent's rank reconnected: its old part is gone
            self._forget(key)
        conn = Conn(f"{self.peer} (node agent) rank {key[1]}")
        conn.wake = self.wake  # one wake-up for every part of the stream
        self.subs[key] = conn
        if frame.hello.client_version == OPERATOR_CLIENT:
            conn.fail(InvalidArgument("clip commands go to the collector, not a node agent"))
            return
        self._apply(key, conn, frame)

    def _apply(self, key: Key, conn: Conn, frame: pb.ClientFrame) -> None:
        try:
            self.ingest.receive(conn, frame)
        except REJECTED as exc:  # this rank's part ends with it; the others go on
            self.counters.add("frames_rejected")
            log.info("rejected a frame of %s: %s", conn.peer, exc)
            conn.fail(exc)

    def _forget(self, key: Key) -> None:
        conn = self.subs.pop(key, None)
        self.closed.discard(key)
        self.welcomed.discard(key)
        if conn is not None:
            self.ingest.detach(conn)

    def close(self) -> None:
        for key in list(self.subs):
            self._forget(key)

    # ---- the RPC --------------------------------------------------------------------------
    async def serve(
        self,
        request_iterator: AsyncIterator[pb.ClientFrame],
        context,
        on_clip_sent: Callable[[str, int], None] | None = None,
    ) -> AsyncIterator[pb.ServerFrame]:
        """The servicer's Stream for a multiplexed stream: read up in a task, send down."""
        self.counters.add("mux_streams_opened")
        reader = asyncio.create_task(self._read(request_iterator, context))
        watcher = asyncio.create_task(self._watch_stopping())
        try:
            while True:
                for frame in self.take(on_clip_sent):
                    yield frame
                if self.error is not None:
                    code, message = status_of(self.error)
                    permanent = is_permanent(self.error)
                    yield pb.ServerFrame(
                        error=pb.Error(code=code.name, message=message, permanent=permanent)
                    )
                    await context.abort(code, message)
                if self.ended:
                    return
                if self.ingest.stopping and self.closed >= self.subs.keys():
                    # every rank's part has its end: the agent reconnects (to the next collector)
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "collector shutting down")
                await self.wake.wait()
                self.wake.clear()
        finally:
            reader.cancel()
            watcher.cancel()
            self.close()
            self.counters.add("mux_streams_closed")

    async def _watch_stopping(self) -> None:
        """Wake the sender once the collector stops, so that a stream with no ranks (or all
        of them ended) ends too; a timer per stream, not a timeout per wake-up."""
        while not self.ingest.stopping:
            await asyncio.sleep(STOPPING_POLL_S)
        self.wake.set()

    async def _read(self, request_iterator: AsyncIterator[pb.ClientFrame], context) -> None:
        try:
            async for frame in request_iterator:
                self.receive(frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the agent's bug or a broken transport: this stream
            if context.done() or context.cancelled():
                return
            self.counters.add("frames_rejected")
            log.info("multiplexed stream from %s failed: %s", self.peer, exc)
            self.error = exc
            self.wake.set()
            return
        # The agent half-closed the whole stream (it stops): every rank still on it is gone.
        self.ended = True
        self.wake.set()

    # ---- down -----------------------------------------------------------------------------
    def take(self, on_clip_sent: Callable[[str, int], None] | None = None) -> list[pb.ServerFrame]:
        """Everything to send now: Welcomes, then clip tables (once per run where every
        welcomed rank of it gets the same one), acks, then the ends of parts (Error or
        Goodbye), each tagged with its rank; the order of each rank's own frames is kept."""
        welcomes: list[pb.ServerFrame] = []
        clips: dict[tuple[str, int], list[tuple[int, pb.ServerFrame]]] = {}
        acks: list[pb.ServerFrame] = []
        ends: list[pb.ServerFrame] = []
        for key, conn in list(self.subs.items()):
            if key in self.closed:
                continue
            run, rank = key
            for frame in conn.take():
                frame.to.CopyFrom(_to(run, rank))
                kind = frame.WhichOneof("kind")
                if kind == "welcome":
                    frame.welcome.multiplexed = frame.welcome.takes_batches = True
                    self.welcomed.add(key)
                    welcomes.append(frame)
                elif kind == "clip":
                    clips.setdefault((run, frame.clip.version), []).append((rank, frame))
                else:
                    acks.append(frame)
            end = self._end_of(conn)
            if end is not None:
                end.to.CopyFrom(_to(run, rank))
                ends.append(end)
                self.closed.add(key)
                self.ingest.detach(conn)  # frees the identity now; the Goodbye up forgets it
        out = welcomes
        for (run, version), got in clips.items():
            live = {r for (n, r) in self.welcomed - self.closed if n == run}
            if len(got) > 1 and {r for r, _ in got} >= live:
                one = got[0][1]
                one.to.rank = BROADCAST_RANK
                out.append(one)
                self.counters.add("mux_clips_coalesced", len(got) - 1)
            else:
                out.extend(frame for _, frame in got)
            if on_clip_sent is not None:
                on_clip_sent(run, version)
        return out + acks + ends

    @staticmethod
    def _end_of(conn: Conn) -> pb.ServerFrame | None:
        if conn.error is not None:
            code, message = status_of(conn.error)
            err = pb.Error(code=code.name, message=message, permanent=is_permanent(conn.error))
            return pb.ServerFrame(error=err)
        if conn.done:
            return pb.ServerFrame(goodbye=pb.Goodbye(half_closed=True))
        return None
