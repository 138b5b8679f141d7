"""ingest.py without gRPC: frames applied straight to Ingest on a fake clock, with a writer that
only records jobs. Layout interning (what the matrix reduction groups by), keepalive pacing, and
chunks that also end their step (one frame per rank-step) next to the chunk + EndOfStep pair."""

from __future__ import annotations

import math

import numpy as np
import pytest

from collector.barrier import ByteBudget
from collector.clipboard import ClipBoard
from collector.config import CollectorConfig
from collector.conn import Conn
from collector.errors import InvalidArgument
from collector.ingest import Ingest
from collector.jobs import FinishRun, WriteRaw, WriteStep
from collector.stats import Counters
from proto.v1 import telemetry_pb2 as pb

from .conftest import mdef, pending_steps


class RecordingWriter:
    saturated = False  # the real writer's "nothing more can be made durable"

    def __init__(self) -> None:
        self.jobs: list = []
        self.flushes_soon: list[int] = []

    def submit(self, job) -> int:
        self.jobs.append(job)
        return len(self.jobs)

    def flush_soon(self) -> None:
        self.flushes_soon.append(len(self.jobs))  # asked after this many jobs


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(world: int, **config):
    clock, writer = Clock(), RecordingWriter()
    cfg = CollectorConfig(**config)
    ingest = Ingest(
        cfg, writer, ByteBudget(cfg.max_pending_bytes), ClipBoard(), Counters(), clock=clock
    )
    conns = []
    for rank in range(world):
        conn = Conn(f"peer{rank}")
        ingest.receive(
            conn,
            pb.ClientFrame(
                hello=pb.Hello(
                    header=pb.FrameHeader(run="r", rank=rank, step=-1, seq=0),
                    world_size=world,
                    protocol_version=1,
                )
            ),
        )
        conns.append(conn)
    return ingest, conns, writer, clock


def header(rank: int, step: int, seq: int) -> pb.FrameHeader:
    return pb.FrameHeader(run="r", rank=rank, step=step, seq=seq)


def test_ranks_with_the_same_metrics_share_one_id_map_object():
    ingest, conns, writer, _ = make(3)
    a = [mdef("loss", pb.REDUCE_MEAN), mdef("x")]
    b = [mdef("loss", pb.REDUCE_MEAN), mdef("y")]
    for rank, (sid, metrics) in enumerate([(1, a), (5, a), (1, b)]):
        ingest.receive(
            conns[rank],
            pb.ClientFrame(
                schema=pb.Schema(header=header(rank, -1, 1), schema_id=sid, metrics=metrics)
            ),
        )
        v = np.array([rank, 10 + rank], "<f4").tobytes()
        ingest.receive(
            conns[rank],
            pb.ClientFrame(
                chunk=pb.StepChunk(
                    header=header(rank, 0, 2), schema_id=sid, offset=0, total=2, values=v
                )
            ),
        )
        ingest.receive(
            conns[rank],
            pb.ClientFrame(
                end_of_step=pb.EndOfStep(header=header(rank, 0, 3), n_values=2, wall_time=1.0)
            ),
        )
    [job] = [j for j in writer.jobs if isinstance(j, WriteStep)]
    maps = job.id_maps
    assert maps[0] is maps[1] and maps[2] is not maps[0]
    rows = job.reduce()
    assert sorted(b.rank.tolist() for b in rows.blocks) == [[0, 1], [2]]
    assert dict(zip(rows.reduced.metric_id.tolist(), rows.reduced.value.tolist())) == {
        0: 1.0,
        1: 10 + 11,
        2: 12,
    }


def test_keepalive_skips_ranks_acked_within_keepalive_s():
    ingest, conns, writer, clock = make(2, keepalive_s=2.0)
    run = ingest.runs["r"]
    ingest.receive(
        conns[0],
        pb.ClientFrame(schema=pb.Schema(header=header(0, -1, 1), schema_id=1, metrics=[mdef("x")])),
    )
    ingest.on_flushed(len(writer.jobs), set())  # the schema's rows are durable: acked
    assert conns[0].take()[-1].ack.seq == 1
    conns[1].take()  # its Welcome
    ingest.receive(
        conns[0],
        pb.ClientFrame(
            chunk=pb.StepChunk(
                header=header(0, 0, 2), schema_id=1, offset=0, total=1, values=b"\0\0\0\0"
            )
        ),
    )
    assert run.acks[0].max_seq > run.acks[0].acked  # waits for rank 1: keepalive applies
    clock.t += 1.0
    ingest.keepalive()
    assert conns[0].take() == []  # acked 1 s ago: no repeat yet
    clock.t += 1.0
    ingest.keepalive()
    assert [f.ack.seq for f in conns[0].take()] == [1]
    ingest.keepalive()  # just repeated: not again
    assert conns[0].take() == []
    assert conns[1].take() == []  # rank 1 holds nothing: never pinged


def test_a_paced_run_gets_its_acks_and_repeats_once_per_send_interval():
    """World 2 at 0.5 messages a second: a 4 s send interval. A flush's ack that comes within
    4 s of the last one is held and sent by tick() once the interval is over, or at once at
    the rank's goodbye; the keepalive repeat waits the interval, not keepalive_s."""
    ingest, conns, writer, clock = make(2, keepalive_s=2.0, max_stream_messages_per_s=0.5)
    assert [f.welcome.send_interval_ms for f in conns[0].take()] == [4000]
    conns[1].take()
    run = ingest.runs["r"]

    def schema_frame(rank: int, sid: int, seq: int) -> pb.ClientFrame:
        return pb.ClientFrame(
            schema=pb.Schema(header=header(rank, -1, seq), schema_id=sid, metrics=[mdef(f"x{sid}")])
        )

    ingest.receive(conns[0], schema_frame(0, 1, 1))
    ingest.on_flushed(len(writer.jobs), set())
    assert [f.ack.seq for f in conns[0].take()] == [1]  # the first ack: nothing to pace yet
    ingest.receive(conns[0], schema_frame(0, 2, 2))
    clock.t += 1.0
    ingest.on_flushed(len(writer.jobs), set())
    assert conns[0].take() == [] and run.acks_due == {0}  # durable, its ack held
    clock.t += 2.0
    ingest.tick()
    assert conns[0].take() == []  # 3 s since the last ack
    clock.t += 1.0
    ingest.tick()
    assert [f.ack.seq for f in conns[0].take()] == [2] and not run.acks_due

    chunk = pb.StepChunk(header=header(0, 0, 3), schema_id=1, offset=0, total=1, values=b"\0" * 4)
    ingest.receive(conns[0], pb.ClientFrame(chunk=chunk))  # waits for rank 1
    clock.t += 2.0
    ingest.keepalive()
    assert conns[0].take() == []  # keepalive_s passed, the 4 s interval not
    clock.t += 2.0
    ingest.keepalive()
    assert [f.ack.seq for f in conns[0].take()] == [2]

    ingest.receive(conns[1], schema_frame(1, 1, 1))
    ingest.on_flushed(len(writer.jobs), set())
    assert [f.ack.seq for f in conns[1].take()] == [1]
    ingest.receive(conns[1], schema_frame(1, 2, 2))
    ingest.on_flushed(len(writer.jobs), set())
    assert conns[1].take() == [] and run.acks_due == {1}
    ingest.half_close(conns[1])  # goodbye: nothing is held back from a closing rank
    assert [f.ack.seq for f in conns[1].take() if f.HasField("ack")] == [2]
    assert not run.acks_due


# ---------------------------------------------------------------- chunks that end their step
def schema(ingest, conn, rank: int, n: int = 2, seq: int = 1) -> None:
    ingest.receive(
        conn,
        pb.ClientFrame(
            schema=pb.Schema(
                header=header(rank, -1, seq), schema_id=1, metrics=[mdef(f"m{i}") for i in range(n)]
            )
        ),
    )


def chunk(
    rank: int,
    step: int,
    seq: int,
    values,
    offset: int = 0,
    total: int = 2,
    ends: int | None = None,
    wall_time: float = 1.0,
) -> pb.ClientFrame:
    end = {} if ends is None else dict(ends_step=True, step_values=ends, wall_time=wall_time)
    return pb.ClientFrame(
        chunk=pb.StepChunk(
            header=header(rank, step, seq),
            schema_id=1,
            offset=offset,
            total=total,
            values=np.asarray(values, "<f4").tobytes(),
            **end,
        )
    )


def end(rank: int, step: int, seq: int, n: int, wall_time: float = 1.0) -> pb.ClientFrame:
    return pb.ClientFrame(
        end_of_step=pb.EndOfStep(header=header(rank, step, seq), n_values=n, wall_time=wall_time)
    )


def steps_written(writer) -> list[WriteStep]:
    return [j for j in writer.jobs if isinstance(j, WriteStep)]


def reduced(job: WriteStep) -> dict[int, float]:
    rows = job.reduce().reduced
    return dict(zip(rows.metric_id.tolist(), rows.value.tolist()))


def acks_of(conn) -> list[int]:
    return [f.ack.seq for f in conn.take() if f.WhichOneof("kind") == "ack"]


def test_the_welcome_says_chunks_may_end_a_step():
    _, conns, _, _ = make(1)
    (welcome,) = conns[0].take()
    assert welcome.welcome.chunk_ends_step and welcome.welcome.acked_seq == 0


def test_old_and_folded_ranks_end_one_step_together():
    """Rank 0 sends chunk + EndOfStep, rank 1 a plain chunk then one that ends the step: the
    step is reduced over both, each rank's last frame acked once the write is flushed."""
    ingest, conns, writer, _ = make(2)
    for rank, conn in enumerate(conns):
        conn.take()
        schema(ingest, conn, rank)
    ingest.receive(conns[0], chunk(0, 0, 2, [1, 10]))
    ingest.receive(conns[0], end(0, 0, 3, 2, wall_time=5.0))
    ingest.receive(conns[1], chunk(1, 0, 2, [2], total=2))
    assert steps_written(writer) == []
    ingest.receive(conns[1], chunk(1, 0, 3, [20], offset=1, ends=2, wall_time=7.0))
    (job,) = steps_written(writer)
    assert job.ready.included == {0, 1} and job.ready.status.complete
    assert job.ready.status.wall_time == 7.0
    assert reduced(job) == {0: 3.0, 1: 30.0}
    ingest.on_flushed(len(writer.jobs), set())
    assert acks_of(conns[0]) == [3] and acks_of(conns[1]) == [3]
    assert ingest.runs["r"].acks[1].settled


@pytest.mark.parametrize(
    "ends, wall_time, message",
    [
        (3, 1.0, "counts 3 values but 2 arrived for that step, this chunk included"),
        (1, 1.0, "counts 1 values but 2 arrived"),
        (2, math.nan, "wall_time nan; it must be finite"),
    ],
)
def test_a_rejected_chunk_ending_the_step_changes_nothing(ends, wall_time, message):
    ingest, conns, writer, _ = make(2)
    schema(ingest, conns[0], 0)
    ingest.receive(conns[0], chunk(0, 0, 2, [1], total=2))
    run, budget = ingest.runs["r"], ingest.budget
    before = (budget.used, run.acks[0].max_seq, len(writer.jobs), pending_steps(run.barrier))
    with pytest.raises(InvalidArgument, match=message):
        ingest.receive(conns[0], chunk(0, 0, 3, [10], offset=1, ends=ends, wall_time=wall_time))
    assert (
        budget.used,
        run.acks[0].max_seq,
        len(writer.jobs),
        pending_steps(run.barrier),
    ) == before
    assert run.barrier.values_with(0, 0, 1, 0, 0) == 1  # the chunk is not in
    # the same seq, corrected, is new to the collector, and the step completes as usual
    ingest.receive(conns[0], chunk(0, 0, 3, [10], offset=1, ends=2))
    schema(ingest, conns[1], 1)
    ingest.receive(conns[1], chunk(1, 0, 2, [2, 20], ends=2))
    (job,) = steps_written(writer)
    assert reduced(job) == {0: 3.0, 1: 30.0}


def test_a_resent_chunk_ending_the_step_counts_once():
    ingest, conns, writer, _ = make(2)
    for rank, conn in enumerate(conns):
        conn.take()
        schema(ingest, conn, rank)
    frame = chunk(0, 0, 2, [1, 10], ends=2)
    ingest.receive(conns[0], frame)
    ingest.receive(conns[0], frame)  # resent before it was acked: no new values
    assert ingest.counters.snapshot()["frames_duplicate"] == 0
    ingest.receive(conns[1], chunk(1, 0, 2, [2, 20], ends=2))
    (job,) = steps_written(writer)
    assert reduced(job) == {0: 3.0, 1: 30.0}
    ingest.on_flushed(len(writer.jobs), set())
    assert acks_of(conns[0]) == [2]
    ingest.receive(conns[0], frame)  # resent after the ack: a duplicate, acked
    assert ingest.counters.snapshot()["frames_duplicate"] == 1 and acks_of(conns[0]) == [2]
    assert len(steps_written(writer)) == 1


def test_a_chunk_ending_an_already_reduced_step_is_stored_raw():
    ingest, conns, writer, clock = make(2, straggler_timeout_s=1.0)
    for rank, conn in enumerate(conns):
        conn.take()
        schema(ingest, conn, rank)
    ingest.receive(conns[0], chunk(0, 0, 2, [1, 10], ends=2))
    clock.t += 2.0
    ingest.tick()
    (job,) = steps_written(writer)
    assert job.ready.included == {0}
    ingest.receive(conns[1], chunk(1, 0, 2, [2, 20], ends=2))  # the straggler
    (late,) = [j for j in writer.jobs if isinstance(j, WriteRaw)]
    assert late.batch.value.tolist() == [2.0, 20.0] and late.batch.rank.tolist() == [1, 1]
    assert ingest.counters.snapshot()["late_values"] == 2
    ingest.on_flushed(len(writer.jobs), set())
    assert acks_of(conns[1]) == [2]


def test_each_goodbye_asks_for_a_flush_after_what_it_made_the_last_one_after_finishrun():
    """A rank's half-close asks the writer to flush now (its Welcome said flushes_at_goodbye:
    it may still wait for acks); the run's last goodbye asks after its FinishRun job."""
    ingest, conns, writer, _ = make(2)
    for rank in range(2):
        ingest.receive(
            conns[rank],
            pb.ClientFrame(
                schema=pb.Schema(header=header(rank, -1, 1), schema_id=1, metrics=[mdef("x")])
            ),
        )
    ingest.half_close(conns[0])
    assert writer.flushes_soon == [len(writer.jobs)]
    assert not any(isinstance(j, FinishRun) for j in writer.jobs)
    ingest.half_close(conns[1])
    assert isinstance(writer.jobs[-1], FinishRun)
    assert writer.flushes_soon[-1] == len(writer.jobs)
