"""The down side of one client stream: coalescing slots the servicer drains in order.

Nothing here can grow: an Ack slot holds only the latest cumulative ack, a clip slot only the
latest update (each carries the whole table, clipboard.py), and an error ends the stream. A client
that stops reading costs a few objects, never a queue. Event-loop thread only.
"""

from __future__ import annotations

import asyncio
import time

from collector.registry import PROTOCOL_VERSION
from proto.v1 import telemetry_pb2 as pb


class Conn:
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.run: str | None = None  # set by Hello
        self.rank = -1
        self.session = ""  # Hello.session: the client process (trust.py's identity rule)
        self.last_seq = 0  # seq of the last frame other than a Schema on this stream
        self.opened_at = time.monotonic()
        self.half_closed = False  # the client finished sending
        self.done = False  # the servicer should end the RPC with OK
        self.error: BaseException | None = None
        self.wake = asyncio.Event()
        self._welcome: pb.Welcome | None = None
        self._clip: pb.ClipUpdate | None = None
        self._clip_version = 0
        self._ack: pb.Ack | None = None

    def welcome(self, acked_seq: int, send_interval_ms: int = 0) -> None:
        """Ingest takes a step's last chunk with ends_step, StepsDropped, packed schemas,
        mean_nonzero and an early goodbye (ingest.py, registry.py): say so; and how to pace (config.py)."""
        self._welcome = pb.Welcome(
            send_interval_ms=send_interval_ms,
            acked_seq=acked_seq,
            protocol_version=PROTOCOL_VERSION,
            chunk_ends_step=True,
            takes_dropped=True,
            takes_packed_schema=True,
            takes_mean_nonzero=True,  # reduction.py's OP_MEAN_NONZERO
            takes_batches=True,
            flushes_at_goodbye=True,  # ingest.half_close asks the writer for a flush at once
        )
        self.wake.set()

    def send_clip(self, update: pb.ClipUpdate) -> None:
        if update.version > self._clip_version:  # never step back to an older table
            self._clip, self._clip_version = update, update.version
            self.wake.set()

    def reply(self, update: pb.ClipUpdate) -> None:
        """An operator stream's answer: the clip table whatever its version (0 included)."""
        self._clip, self._clip_version = update, update.version
        self.wake.set()

    def send_ack(self, seq: int, step: int) -> None:
        self._ack = pb.Ack(seq=seq, step=step)
        self.wake.set()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.wake.set()

    def finish(self) -> None:
        self.done = True
        self.wake.set()

    def take(self) -> list[pb.ServerFrame]:
        """Frames to send now: Welcome first, then the clip table, then the latest ack."""
        out = []
        if self._welcome is not None:
            out.append(pb.ServerFrame(welcome=self._welcome))
            self._welcome = None
        if self._clip is not None:
            out.append(pb.ServerFrame(clip=self._clip))
            self._clip = None
        if self._ack is not None:
            out.append(pb.ServerFrame(ack=self._ack))
            self._ack = None
        return out
