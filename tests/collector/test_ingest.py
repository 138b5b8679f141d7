"""ingest.py without gRPC: frames applied straight to Ingest on a fake clock, with a writer that
only records jobs. Layout interning (what the matrix reduction groups by) and keepalive pacing."""
from __future__ import annotations

import numpy as np

from collector.barrier import ByteBudget
from collector.config import CollectorConfig
from collector.conn import Conn
from collector.control import ClipBoard
from collector.ingest import Ingest
from collector.stats import Counters
from collector.writer import WriteStep
from proto.v1 import telemetry_pb2 as pb

from .conftest import mdef


class RecordingWriter:
    def __init__(self) -> None:
        self.jobs: list = []

    def submit(self, job) -> int:
        self.jobs.append(job)
        return len(self.jobs)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(world: int, **config):
    clock, writer = Clock(), RecordingWriter()
    cfg = CollectorConfig(**config)
    ingest = Ingest(cfg, writer, ByteBudget(cfg.max_pending_bytes), ClipBoard(), Counters(),
                    clock=clock)
    conns = []
    for rank in range(world):
        conn = Conn(f"peer{rank}")
        ingest.receive(conn, pb.ClientFrame(hello=pb.Hello(
            header=pb.FrameHeader(run="r", rank=rank, step=-1, seq=0), world_size=world,
            protocol_version=1)))
        conns.append(conn)
    return ingest, conns, writer, clock


def header(rank: int, step: int, seq: int) -> pb.FrameHeader:
    return pb.FrameHeader(run="r", rank=rank, step=step, seq=seq)


def test_ranks_with_the_same_metrics_share_one_id_map_object():
    ingest, conns, writer, _ = make(3)
    a = [mdef("loss", pb.REDUCE_MEAN), mdef("x")]
    b = [mdef("loss", pb.REDUCE_MEAN), mdef("y")]
    for rank, (sid, metrics) in enumerate([(1, a), (5, a), (1, b)]):
        ingest.receive(conns[rank], pb.ClientFrame(schema=pb.Schema(
            header=header(rank, -1, 1), schema_id=sid, metrics=metrics)))
        v = np.array([rank, 10 + rank], "<f4").tobytes()
        ingest.receive(conns[rank], pb.ClientFrame(chunk=pb.StepChunk(
            header=header(rank, 0, 2), schema_id=sid, offset=0, total=2, values=v)))
        ingest.receive(conns[rank], pb.ClientFrame(end_of_step=pb.EndOfStep(
            header=header(rank, 0, 3), n_values=2, wall_time=1.0)))
    [job] = [j for j in writer.jobs if isinstance(j, WriteStep)]
    maps = job.id_maps
    assert maps[0] is maps[1] and maps[2] is not maps[0]
    rows = job.reduce()
    assert sorted(b.rank.tolist() for b in rows.blocks) == [[0, 1], [2]]
    assert dict(zip(rows.reduced.metric_id.tolist(), rows.reduced.value.tolist())) == {
        0: 1.0, 1: 10 + 11, 2: 12}


def test_keepalive_skips_ranks_acked_within_keepalive_s():
    ingest, conns, writer, clock = make(2, keepalive_s=2.0)
    run = ingest.runs["r"]
    ingest.receive(conns[0], pb.ClientFrame(schema=pb.Schema(
        header=header(0, -1, 1), schema_id=1, metrics=[mdef("x")])))
    ingest.on_flushed(len(writer.jobs), set())        # the schema's rows are durable: acked
    assert conns[0].take()[-1].ack.seq == 1
    conns[1].take()                                   # its Welcome
    ingest.receive(conns[0], pb.ClientFrame(chunk=pb.StepChunk(
        header=header(0, 0, 2), schema_id=1, offset=0, total=1, values=b"\0\0\0\0")))
    assert run.acks[0].max_seq > run.acks[0].acked    # waits for rank 1: keepalive applies
    clock.t += 1.0
    ingest.keepalive()
    assert conns[0].take() == []                      # acked 1 s ago: no repeat yet
    clock.t += 1.0
    ingest.keepalive()
    assert [f.ack.seq for f in conns[0].take()] == [1]
    ingest.keepalive()                                # just repeated: not again
    assert conns[0].take() == []
    assert conns[1].take() == []                      # rank 1 holds nothing: never pinged
