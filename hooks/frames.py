"""Encoding: schemas, step vectors and control acks into protobuf ClientFrames.

The only module of the client that builds protobufs; capture hands it numpy vectors, the
sender hands it sequence numbers, and neither sees a message type.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hooks.layout import MetricSpec
from proto.v1 import telemetry_pb2 as pb

PROTOCOL_VERSION = 1
CLIENT_VERSION = "stepwatch-hooks/0.1"
# A Schema message is not chunked, so a logical schema is cut into wire schemas ("parts") by
# the encoded size of their MetricDefs: each part's defs take at most SCHEMA_PART_BYTES, which
# with its header stays under the contract's 1 MiB per message (the collector takes 1 MiB +
# 64 KiB). A def takes 10-600 bytes (names up to 512 characters), so a part holds ~1,700 to
# ~60,000 metrics; parts per logical schema are at most MAX_SCHEMA_PARTS (a rank can register
# 10^7 metrics of any name length). Part 0 keeps the logical id, part k >= 1 gets
# (id << 16) | k. Values keep their order, so the packed vector is cut at the same places.
SCHEMA_PART_BYTES = 1_000_000
MAX_SCHEMA_PARTS = 1 << 16
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


def hello(ident: Identity, config: dict, session: str = "") -> pb.ClientFrame:
    """First frame of every connection. It carries no data, so it takes no seq (0). The
    sender builds it once, so every reconnect carries the same random session."""
    return pb.ClientFrame(
        hello=pb.Hello(
            header=ident.header(-1, 0),
            world_size=ident.world_size,
            config_json=json.dumps(config, sort_keys=True, default=str),
            protocol_version=PROTOCOL_VERSION,
            client_version=CLIENT_VERSION,
            session=session,
        )
    )


def _part_id(schema_id: int, k: int) -> int:
    return schema_id if k == 0 else (schema_id << 16) | k


def _varint_len(v: np.ndarray) -> np.ndarray:
    """Bytes of the base-128 varint of each non-negative value."""
    n = np.ones(v.shape, np.int64)
    for bits in range(7, 64, 7):
        n += v >= (1 << bits)
    return n


def _int32_field(v: np.ndarray) -> np.ndarray:
    """Bytes of an int32 field (tag + varint; 0 is not encoded, negatives take 10)."""
    body = np.where(v < 0, 10, _varint_len(np.maximum(v, 0)))
    return np.where(v == 0, 0, 1 + body)


def _str_field(n: np.ndarray) -> np.ndarray:
    """Bytes of a string field of n UTF-8 bytes (tag + length + bytes; empty: none)."""
    return np.where(n == 0, 0, 1 + _varint_len(n) + n)


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def def_sizes(specs: Sequence[MetricSpec]) -> np.ndarray:
    """Exactly the bytes each spec's MetricDef takes inside a Schema (its tag and length
    included), computed column-wise: no protobuf is built."""
    n = len(specs)

    def column(get, fn=lambda x: x) -> np.ndarray:
        return np.fromiter((fn(get(s)) for s in specs), np.int64, n)

    body = (
        _str_field(column(lambda s: s.name, _utf8_len))
        + _int32_field(column(lambda s: s.layer))
        + _int32_field(column(lambda s: s.expert))
        + _int32_field(column(lambda s: s.head))
        + _str_field(column(lambda s: s.stat, _utf8_len))
        + _str_field(column(lambda s: s.unit, _utf8_len))
        + 2  # reduce: tag + a one-byte enum value (never 0: REDUCE maps every op to 1..4)
    )
    return 1 + _varint_len(body) + body


def cut_points(sizes: np.ndarray, budget: int | None = None) -> list[int]:
    """Start offsets of the parts: greedy, each part's sizes summing to at most `budget`
    (default SCHEMA_PART_BYTES; a lone def bigger than it gets a part of its own)."""
    budget = SCHEMA_PART_BYTES if budget is None else budget
    if sizes.size == 0:
        return [0]
    ends = np.cumsum(sizes)
    starts, base = [0], 0
    while True:
        cut = int(np.searchsorted(ends, base + budget, side="right"))
        cut = max(cut, starts[-1] + 1)  # at least one def per part
        if cut >= sizes.size:
            return starts
        starts.append(cut)
        base = int(ends[cut - 1])


def wire_schemas(
    schemas: Sequence[tuple[int, Sequence[MetricSpec]]],
) -> list[tuple[int, Sequence[MetricSpec]]]:
    """Logical (schema_id, specs) -> wire schemas whose MetricDefs take at most
    SCHEMA_PART_BYTES each; ValueError beyond MAX_SCHEMA_PARTS parts."""
    out = []
    for schema_id, specs in schemas:
        starts = cut_points(def_sizes(specs))
        if len(starts) > MAX_SCHEMA_PARTS:
            raise ValueError(
                f"schema {schema_id} needs {len(starts)} wire parts of "
                f"{SCHEMA_PART_BYTES} bytes, more than {MAX_SCHEMA_PARTS}"
            )
        for k, (a, b) in enumerate(zip(starts, [*starts[1:], len(specs)])):
            out.append((_part_id(schema_id, k), specs[a:b]))
    return out


def part_layouts(
    wire: Sequence[tuple[int, Sequence[MetricSpec]]],
) -> dict[int, list[tuple[int, int]]]:
    """Logical schema_id -> its parts [(wire schema_id, n_values)] in order, from
    wire_schemas' output: how a step's vector of that schema is cut."""
    out: dict[int, list[tuple[int, int]]] = {}
    for part_id, specs in wire:
        logical = part_id >> 16 if part_id >> 16 else part_id
        out.setdefault(logical, []).append((part_id, len(specs)))
    return out


def wire_layout(
    schemas: Sequence[tuple[int, int]], parts: dict[int, list[tuple[int, int]]]
) -> list[tuple[int, int]]:
    """Logical (schema_id, n_values) in vector order -> the same cut into wire schemas (a
    schema `parts` does not know travels as one part)."""
    out = []
    for schema_id, n in schemas:
        cut = parts.get(schema_id)
        if cut is None or sum(m for _, m in cut) != n:
            out.append((schema_id, n))
        else:
            out.extend(cut)
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
