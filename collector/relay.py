"""The node agent's relay state: one rank's coalescing down slots, one upstream stream's queue.

`Local` is the down side of one local rank (the latest Welcome, clip table and Ack, then the
end), as collector/conn.py's Conn is on the collector. `Upstream` is one multiplexed stream to
the collector: one FIFO of every rank's frames (a rank's Goodbye never overtakes its data, nor
the next Hello of that rank), bounded in bytes by `put` while `post` never waits, sent up one
by one or, once the collector takes them, as FrameBatch messages; and the routing of what the
collector sends back to the rank(s) it names. Event-loop thread only (agent.py runs it).
"""

from __future__ import annotations

import asyncio
import collections

from collector.mux import BROADCAST_RANK, Key
from collector.stats import Counters
from proto.v1 import telemetry_pb2 as pb

OK = "OK"  # Local.end's code for a rank whose stream ends OK
BATCH_BYTES = 1 << 20  # a FrameBatch stays under the collector's limit (1 MiB chunk + 64 KiB)
BATCH_FRAMES = 256


# ---- one rank's stream to the agent ------------------------------------------------------------
class Local:
    """The down side of one local rank: coalescing slots, as collector/conn.py's."""

    def __init__(self) -> None:
        self.key: Key | None = None
        self.session = ""
        self.welcomed = False
        self.wake = asyncio.Event()
        self.end: tuple[str, str, bool] | None = None  # (code, message, permanent) or OK
        self._welcome: pb.Welcome | None = None
        self._clip: pb.ClipUpdate | None = None
        self._ack: pb.Ack | None = None

    def down(self, frame: pb.ServerFrame) -> None:
        kind = frame.WhichOneof("kind")
        if kind == "welcome":
            self._welcome, self.welcomed = frame.welcome, True
        elif kind == "clip":
            if self._clip is None or frame.clip.version > self._clip.version:
                self._clip = frame.clip
        elif kind == "ack":
            self._ack = frame.ack
        elif kind == "error":
            self.finish(frame.error.code, frame.error.message, frame.error.permanent)
        elif kind == "goodbye":
            self.finish(OK, "", False)
        self.wake.set()

    def finish(self, code: str, message: str, permanent: bool) -> None:
        if self.end is None:
            self.end = (code, message, permanent)
        self.wake.set()

    def take(self) -> list[pb.ServerFrame]:
        out = []
        if self._welcome is not None:
            out.append(pb.ServerFrame(welcome=self._welcome))
        if self._clip is not None:
            out.append(pb.ServerFrame(clip=self._clip))
        if self._ack is not None:
            out.append(pb.ServerFrame(ack=self._ack))
        self._welcome = self._clip = self._ack = None
        return out


class Upstream:
    """One multiplexed stream to the collector and the local ranks riding on it."""

    def __init__(self, max_queued_bytes: int) -> None:
        # One FIFO for every rank's frames: a rank's Goodbye never overtakes its data, nor
        # a new Hello of the same rank the Goodbye of its previous stream. Bounded by `put`
        # (data waits for room); `post` (Goodbyes, at most one per local stream) never waits.
        self._frames: collections.deque[pb.ClientFrame | None] = collections.deque()
        self._bytes = 0  # of the frames in _frames
        self.max_queued_bytes = max_queued_bytes
        self._waiting = asyncio.Event()  # _frames has something
        self._room = asyncio.Event()
        self._room.set()
        self.locals: dict[Key, Local] = {}
        self.streams: set[Local] = set()  # every local stream on it, with a Hello yet or not
        self.dead = False
        self.batches = False  # the collector's Welcome said takes_batches

    async def requests(self):
        """What goes up: every frame waiting, as one FrameBatch once the collector takes
        them (up to BATCH_BYTES; a larger frame goes alone), else one by one; None ends."""
        frames = self._frames
        while True:
            while not frames:
                self._waiting.clear()
                await self._waiting.wait()
            frame = frames.popleft()
            if frame is None:
                return
            batch, size = [frame], frame.ByteSize()
            while self.batches and frames and len(batch) < BATCH_FRAMES:
                nxt = frames[0]
                if nxt is None or size + nxt.ByteSize() + 8 > BATCH_BYTES:
                    break
                size += nxt.ByteSize() + 8
                batch.append(frames.popleft())  # type: ignore[arg-type]  # nxt is not None
            self._bytes -= sum(f.ByteSize() for f in batch)
            if self._bytes < self.max_queued_bytes:
                self._room.set()
            yield frame if len(batch) == 1 else pb.ClientFrame(batch=pb.FrameBatch(frames=batch))

    async def put(self, frame: pb.ClientFrame) -> None:
        """A rank's frame, once there is room (the rank's reads wait meanwhile)."""
        while self._bytes and self._bytes >= self.max_queued_bytes and not self.dead:
            self._room.clear()
            await self._room.wait()
        self.post(frame)

    def post(self, frame: pb.ClientFrame | None) -> None:
        """Queue without waiting (a Goodbye from a finally block, the end), in order."""
        self._frames.append(frame)
        self._bytes += frame.ByteSize() if frame is not None else 0
        self._waiting.set()

    def goodbye(self, key: Key, half_closed: bool) -> None:
        header = pb.FrameHeader(run=key[0], rank=key[1], step=-1, seq=0)
        self.post(pb.ClientFrame(goodbye=pb.Goodbye(header=header, half_closed=half_closed)))

    def route(self, frame: pb.ServerFrame, counters: Counters) -> None:
        """A frame from the collector to the local rank(s) it names."""
        to = frame.to
        frame.ClearField("to")
        if to.rank == BROADCAST_RANK:  # a clip table once per host: every rank of the run
            targets = [v for k, v in self.locals.items() if k[0] == to.run and v.welcomed]
            counters.add("clips_fanned_out", len(targets))
        else:
            one = self.locals.get((to.run, to.rank))
            targets = [one] if one is not None else []
        if not targets:
            counters.add("down_frames_unrouted")  # a rank that already left: nothing to do
        for local in targets:
            local.down(frame)

    def fail_all(self, code: str, message: str, permanent: bool = False) -> None:
        self.dead = True
        self._room.set()  # nobody waits for room on a dead stream
        for local in self.streams:
            local.finish(code, message, permanent)
