"""Encoding: schemas, step vectors and control acks into protobuf ClientFrames.

The only module of the client that builds protobufs; capture hands it numpy vectors, the
sender hands it sequence numbers, and neither sees a message type.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hooks.layout import MetricSpec
from proto.v1 import telemetry_pb2 as pb

PROTOCOL_VERSION = 1
CLIENT_VERSION = "stepwatch-hooks/0.1"
# A Schema message is not chunked: at ~50 bytes per MetricDef, 16,384 definitions stay far under
# the collector's message limit. A bigger logical schema (a flash-sized model has ~10^5 metrics
# per rank) travels as several wire schemas: part 0 keeps the logical id, part k >= 1 gets
# (id << 16) | k. Values keep their order, so the packed vector is simply cut at the same places.
MAX_SCHEMA_METRICS = 16_384
REDUCE = {"sum": pb.REDUCE_SUM, "mean": pb.REDUCE_MEAN, "max": pb.REDUCE_MAX, "min": pb.REDUCE_MIN}


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


def hello(ident: Identity, config: dict) -> pb.ClientFrame:
    """First frame of every connection. It carries no data, so it takes no seq (0). Built
    once per sender, so every reconnect carries the same random session (the collector
    refuses a second client of a (run, rank) that is streaming, but lets this one take over
    its own dead stream)."""
    return pb.ClientFrame(
        hello=pb.Hello(
            header=ident.header(-1, 0),
            world_size=ident.world_size,
            config_json=json.dumps(config, sort_keys=True, default=str),
            protocol_version=PROTOCOL_VERSION,
            client_version=CLIENT_VERSION,
            session=uuid.uuid4().hex,
        )
    )


def _part_id(schema_id: int, k: int) -> int:
    return schema_id if k == 0 else (schema_id << 16) | k


def wire_schemas(
    schemas: Sequence[tuple[int, Sequence[MetricSpec]]],
) -> list[tuple[int, Sequence[MetricSpec]]]:
    """Logical (schema_id, specs) -> wire schemas of at most MAX_SCHEMA_METRICS specs each."""
    out = []
    for schema_id, specs in schemas:
        for k, start in enumerate(range(0, max(len(specs), 1), MAX_SCHEMA_METRICS)):
            out.append((_part_id(schema_id, k), specs[start : start + MAX_SCHEMA_METRICS]))
    return out


def wire_layout(schemas: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Logical (schema_id, n_values) in vector order -> the same cut into wire schemas."""
    out = []
    for schema_id, n in schemas:
        for k, start in enumerate(range(0, max(n, 1), MAX_SCHEMA_METRICS)):
            out.append((_part_id(schema_id, k), min(MAX_SCHEMA_METRICS, n - start)))
    return out


@functools.lru_cache(maxsize=256)
def _metric_defs(specs: tuple[MetricSpec, ...]) -> bytes:
    """The MetricDefs of a schema, encoded once: ranks of one EP group (a load generator
    plays thousands in one process) register the same names."""
    return pb.Schema(
        metrics=[
            pb.MetricDef(
                name=s.name,
                layer=s.layer,
                expert=s.expert,
                head=s.head,
                stat=s.stat,
                unit=s.unit,
                reduce=REDUCE[s.reduce],
            )
            for s in specs
        ]
    ).SerializeToString()


def schema(
    ident: Identity, seq: int, schema_id: int, specs: Sequence[MetricSpec]
) -> pb.ClientFrame:
    msg = pb.Schema.FromString(_metric_defs(tuple(specs)))
    msg.header.CopyFrom(ident.header(-1, seq))
    msg.schema_id = schema_id
    return pb.ClientFrame(schema=msg)


def step_frames(
    ident: Identity,
    payload: StepPayload,
    chunk_values: int,
    next_seq: Callable[[], int],
    chunk_ends_step: bool = False,
) -> list[pb.ClientFrame]:
    """StepChunks of every schema of the step (each slice <= chunk_values values), then
    EndOfStep. Values go little-endian float32, as the contract says. With chunk_ends_step
    (the collector's Welcome said it takes that form) the last chunk carries the end of step
    instead: one frame and one seq less per step. A step without values ends with EndOfStep."""
    frames, start, total_sent = [], 0, 0
    values = np.ascontiguousarray(payload.values, dtype="<f4")
    for schema_id, n in wire_layout(payload.schemas):
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


def clip_ack(ident: Identity, step: int, version: int, seq: int) -> pb.ClientFrame:
    return pb.ClientFrame(clip_ack=pb.ClipAck(header=ident.header(step, seq), version=version))
