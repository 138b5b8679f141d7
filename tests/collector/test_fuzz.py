"""Fuzzing frame decoding and validation (hypothesis, bounded: 1,200 sequences, ~20 s on 2 cores).

Random sequences of ClientFrames (well-formed, half-formed and absurd: any kind, any header,
seqs and steps at the edges, schemas with odd defs, chunks with odd bytes, non-finite times)
and random mutations of valid frames' bytes are fed to Ingest, as the servicer feeds it, next
to a healthy rank of another run. Invariants:

  - every refusal is a CollectorError or a DecodeError, i.e. a clear gRPC status, never an
    internal error (a refused stream is dropped, as the servicer drops it);
  - whatever ingest accepted, the store accepts: the writer jobs it produced apply to a
    MemoryStore and flush without an error;
  - the healthy rank is unaffected: its step is reduced and acked.
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.barrier import ByteBudget
from collector.clipboard import ClipBoard
from collector.config import CollectorConfig
from collector.conn import Conn
from collector.errors import REJECTED
from collector.ingest import Ingest
from collector.jobs import WriteStep
from collector.stats import Counters
from proto.v1 import telemetry_pb2 as pb
from store.memory import MemoryStore

from .conftest import mdef


class Writer:
    saturated = False

    def __init__(self) -> None:
        self.jobs: list = []

    def submit(self, job) -> int:
        self.jobs.append(job)
        return len(self.jobs)

    def flush_soon(self) -> None:
        pass


runs = st.sampled_from(["fz", "fz", "fz", "healthy", "", "bad name", "x" * 200])
ranks = st.one_of(st.integers(-2, 3), st.sampled_from([2**31 - 1, -(2**31)]))
steps = st.one_of(st.integers(-2, 6), st.sampled_from([2**62, -(2**62), 10**12]))
seqs = st.one_of(st.integers(0, 12), st.sampled_from([2**64 - 1, 1000]))
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1.0e9, 0.0, math.nan])
)


@st.composite
def headers(draw):
    return pb.FrameHeader(run=draw(runs), rank=draw(ranks), step=draw(steps), seq=draw(seqs))


@st.composite
def metric_defs(draw):
    return pb.MetricDef(
        name=draw(st.sampled_from(["a", "b", "c", "", "x" * 600, "healthy/x"])),
        layer=draw(st.integers(-3, 3)),
        expert=draw(st.integers(-3, 3)),
        head=draw(st.integers(-1, 1)),
        stat=draw(st.sampled_from(["s", "t", ""])),
        unit=draw(st.sampled_from(["", "s"])),
        reduce=draw(st.integers(0, 6)),
    )


@st.composite
def frames(draw):
    kind = draw(st.sampled_from(["hello", "schema", "chunk", "chunk", "end", "clip", "empty"]))
    h = draw(headers())
    if kind == "hello":
        return pb.ClientFrame(
            hello=pb.Hello(
                header=h,
                world_size=draw(st.integers(-1, 3)),
                protocol_version=draw(st.sampled_from([1, 1, 0, 2])),
                session=draw(st.sampled_from(["", "s1", "s2"])),
            )
        )
    if kind == "schema":
        return pb.ClientFrame(
            schema=pb.Schema(
                header=h,
                schema_id=draw(st.integers(0, 3)),
                metrics=draw(st.lists(metric_defs(), max_size=5)),
            )
        )
    if kind == "chunk":
        return pb.ClientFrame(
            chunk=pb.StepChunk(
                header=h,
                schema_id=draw(st.integers(0, 3)),
                offset=draw(st.integers(0, 6)),
                total=draw(st.integers(0, 6)),
                values=draw(st.binary(max_size=28)),
                ends_step=draw(st.booleans()),
                step_values=draw(st.integers(0, 8)),
                wall_time=draw(floats),
            )
        )
    if kind == "end":
        return pb.ClientFrame(
            end_of_step=pb.EndOfStep(
                header=h, n_values=draw(st.integers(0, 8)), wall_time=draw(floats)
            )
        )
    if kind == "clip":
        return pb.ClientFrame(clip_ack=pb.ClipAck(header=h, version=draw(st.integers(0, 3))))
    return pb.ClientFrame()


@st.composite
def mutated(draw):
    """A valid frame's bytes with some bytes flipped, cut or inserted, decoded."""
    data = bytearray(draw(frames()).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(data))))
        if op == "flip" and data:
            data[min(pos, len(data) - 1)] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=6))
    return bytes(data)


def hello(run: str, rank: int, world: int) -> pb.ClientFrame:
    return pb.ClientFrame(
        hello=pb.Hello(
            header=pb.FrameHeader(run=run, rank=rank, step=-1), world_size=world, protocol_version=1
        )
    )


def healthy_step(ingest: Ingest, conn: Conn, seq: int, step: int) -> None:
    h = pb.FrameHeader(run="healthy", rank=0, step=step, seq=seq)
    ingest.receive(
        conn,
        pb.ClientFrame(
            chunk=pb.StepChunk(
                header=h,
                schema_id=1,
                total=1,
                values=np.float32(step).tobytes(),
                ends_step=True,
                step_values=1,
                wall_time=1.0,
            )
        ),
    )


@settings(
    max_examples=1200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(st.one_of(frames(), mutated()), min_size=1, max_size=25))
def test_fuzzed_frames_get_a_status_never_an_internal_error(items):
    cfg = CollectorConfig(max_step_ahead=100, max_pending_steps=8, max_metrics_per_run=64)
    writer = Writer()
    ingest = Ingest(cfg, writer, ByteBudget(1 << 20), ClipBoard(), Counters())
    good = Conn("healthy")
    ingest.receive(good, hello("healthy", 0, 1))
    ingest.receive(
        good,
        pb.ClientFrame(
            schema=pb.Schema(
                header=pb.FrameHeader(run="healthy", rank=0, step=-1, seq=1),
                schema_id=1,
                metrics=[mdef("healthy/x")],
            )
        ),
    )
    conn = Conn("fuzz")
    ingest.receive(conn, hello("fz", 0, 2))
    for item in items:
        try:
            frame = item if isinstance(item, pb.ClientFrame) else pb.ClientFrame.FromString(item)
            ingest.receive(conn, frame)
        except REJECTED:
            conn = Conn("fuzz")  # the servicer ends a refused stream; the client reconnects
        except DecodeError:
            conn = Conn("fuzz")
    healthy_step(ingest, good, 2, 0)
    with MemoryStore() as store:
        for job in writer.jobs:
            job.apply(store)
        store.flush()
        assert store.series("healthy", "healthy/x")["value"].to_list() == [0.0]
    assert any(isinstance(j, WriteStep) and j.run == "healthy" for j in writer.jobs)
    ingest.on_flushed(len(writer.jobs), set())
    acks = [f.ack.seq for f in good.take() if f.WhichOneof("kind") == "ack"]
    assert acks[-1] == 2
