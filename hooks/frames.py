"""Encoding: step vectors, control frames and batches into protobuf ClientFrames.

With hooks/schemas.py (a rank's schemas on the wire) the only modules of the client that
build protobufs; capture hands them numpy vectors, the sender hands them sequence numbers, and
neither sees a message type.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from proto.v1 import telemetry_pb2 as pb

PROTOCOL_VERSION = 1
CLIENT_VERSION = "stepwatch-hooks/0.1"


@dataclass(frozen=True)
class Identity:
    """Who is sending: constant for the life of a client."""

    run: str
    rank: int
    world_size: int

    def header(self, step: int, seq: int) -> pb.FrameHeader:
        return pb.FrameHeader(run=self.run, rank=self.rank, step=step, seq=seq)


@dataclass
class StepPayload:
    """One step ready to encode: its vector (schema 1 values, then schema 2 values if
    periodic) and which schemas it covers."""

    step: int
    values: np.ndarray  # float32, length n_step (+ n_periodic)
    schemas: Sequence[tuple[int, int]]  # (schema_id, n_values) in vector order
    wall_time: float


def hello(ident: Identity, config: dict, session: str = "", collectors: int = 1) -> pb.ClientFrame:
    """First frame of every connection. It carries no data, so it takes no seq (0). The
    sender builds it once, so every reconnect carries the same random session. `collectors`:
    how many its target list names (a tier collector paces by its share of the run)."""
    return pb.ClientFrame(
        hello=pb.Hello(
            header=ident.header(-1, 0),
            world_size=ident.world_size,
            config_json=json.dumps(config, sort_keys=True, default=str),
            protocol_version=PROTOCOL_VERSION,
            client_version=CLIENT_VERSION,
            session=session,
            collectors=collectors,
        )
    )


def step_frames(
    ident: Identity,
    payload: StepPayload,
    chunk_values: int,
    next_seq: Callable[[], int],
    chunk_ends_step: bool = False,
) -> list[pb.ClientFrame]:
    """StepChunks of every schema of the step (payload.schemas are wire schemas: wire_layout;
    each slice <= chunk_values values), then EndOfStep. Values go little-endian float32, as the contract says. With chunk_ends_step
    (the collector's Welcome said it takes that form) the last chunk carries the end of step
    instead: one frame and one seq less per step. A step without values ends with EndOfStep."""
    frames, start, total_sent = [], 0, 0
    values = np.ascontiguousarray(payload.values, dtype="<f4")
    for schema_id, n in payload.schemas:
        vec = values[start : start + n]
        for off in range(0, n, chunk_values):
            part = vec[off : off + chunk_values]
            frames.append(
                pb.ClientFrame(
                    chunk=pb.StepChunk(
                        header=ident.header(payload.step, next_seq()),
                        schema_id=schema_id,
                        offset=off,
                        total=n,
                        values=part.tobytes(),
                    )
                )
            )
        start += n
        total_sent += n
    if chunk_ends_step and frames:
        last = frames[-1].chunk
        last.ends_step, last.step_values, last.wall_time = True, total_sent, payload.wall_time
        return frames
    frames.append(
        pb.ClientFrame(
            end_of_step=pb.EndOfStep(
                header=ident.header(payload.step, next_seq()),
                n_values=total_sent,
                wall_time=payload.wall_time,
            )
        )
    )
    return frames


def folds_end(frame: pb.ClientFrame) -> bool:
    """A chunk that also ends its step (sent only to a collector that takes it)."""
    return frame.WhichOneof("kind") == "chunk" and frame.chunk.ends_step


def ends_step(frame: pb.ClientFrame) -> bool:
    """Whether `frame` is the last of its step: an EndOfStep or a chunk that ends the step."""
    return frame.WhichOneof("kind") == "end_of_step" or folds_end(frame)


def seq_of(frame: pb.ClientFrame) -> int:
    return getattr(frame, frame.WhichOneof("kind")).header.seq


def split_ends_step(sent: Sequence[pb.ClientFrame]) -> list[pb.ClientFrame]:
    """Frames sent to a collector that takes chunks ending a step, rewritten for one that
    does not (a reconnect found an older collector): each such chunk becomes the plain chunk
    and its EndOfStep, and the frames are renumbered from the first one's seq so that seqs
    stay one per frame. Only unacknowledged frames are rewritten, and the collector that
    answers without the capability is not the one that saw their old numbers."""
    out, seq = [], seq_of(sent[0]) if sent else 0
    for original in sent:
        frame = pb.ClientFrame()
        frame.CopyFrom(original)  # a sent frame may still be in a dead stream's queue
        split = [frame]
        if folds_end(frame):
            c = frame.chunk
            split.append(
                pb.ClientFrame(
                    end_of_step=pb.EndOfStep(
                        header=pb.FrameHeader(
                            run=c.header.run, rank=c.header.rank, step=c.header.step
                        ),
                        n_values=c.step_values,
                        wall_time=c.wall_time,
                    )
                )
            )
            for name in ("ends_step", "step_values", "wall_time"):
                c.ClearField(name)
        for f in split:
            getattr(f, f.WhichOneof("kind")).header.seq = seq
            seq += 1
            out.append(f)
    return out


def steps_dropped(
    ident: Identity, seq: int, ranges: Sequence[tuple[int, int]], total: int, reason: str
) -> pb.ClientFrame:
    """A hole report: steps [first, last] of each range were never sent."""
    return pb.ClientFrame(
        dropped=pb.StepsDropped(
            header=ident.header(ranges[-1][1], seq),
            ranges=[pb.StepRange(first=a, last=b) for a, b in ranges],
            total=total,
            reason=reason,
        )
    )


def clip_ack(ident: Identity, step: int, version: int, seq: int) -> pb.ClientFrame:
    return pb.ClientFrame(clip_ack=pb.ClipAck(header=ident.header(step, seq), version=version))


# ---- several frames in one message ---------------------------------------------------------------
# A FrameBatch (Welcome.takes_batches) carries consecutive frames of one stream in one gRPC
# message, applied by the collector in order as if sent one by one: a frame keeps its own seq,
# is buffered, acked and resent on its own, and only the transport groups it. It stays under
# the collector's 1 MiB + 64 KiB message limit; a frame that does not fit beside the next one
# goes alone, as it would without batches.
BATCH_BYTES = 1 << 20
BATCH_FRAMES = 256  # the collector applies a batch in one go on its event loop: keep it short


def wire_size(frame: pb.ClientFrame) -> int:
    """Bytes `frame` takes inside a FrameBatch, at most (tag and length included); a chunk's
    without encoding it: its values and < 256 bytes of header (a run name is <= 128)."""
    if frame.WhichOneof("kind") == "chunk":
        return len(frame.chunk.values) + 256
    return frame.ByteSize() + 8


def batch(group: Sequence[pb.ClientFrame]) -> pb.ClientFrame:
    """One message for `group` (the frame itself when it is alone)."""
    return group[0] if len(group) == 1 else pb.ClientFrame(batch=pb.FrameBatch(frames=group))


def batched(sent: Sequence[pb.ClientFrame], limit: int = BATCH_BYTES) -> list[pb.ClientFrame]:
    """Consecutive frames grouped into as few messages of at most `limit` bytes as there can
    be, in order (each group through `batch`)."""
    out: list[pb.ClientFrame] = []
    group: list[pb.ClientFrame] = []
    size = 0
    for frame in sent:
        n = wire_size(frame)
        if group and (size + n > limit or len(group) >= BATCH_FRAMES):
            out.append(batch(group))
            group, size = [], 0
        group.append(frame)
        size += n
    if group:
        out.append(batch(group))
    return out
