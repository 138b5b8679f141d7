"""`ChannelSender` (benchmarks/channel_sender.py): many senders, one grpc.aio channel, one
event loop, no thread per rank, against the client tests' recording server on loopback.

These mirror tests/hooks/test_sender.py's threaded ones: same frame order and seqs, exact
resend after a dropped stream, the buffer bound, misuse refused with a clear error.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # importlib mode: make `tests.hooks.*` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.channel_sender import ChannelSender  # noqa: E402
from hooks.buffer import StepItem  # noqa: E402
from hooks.config import MonitorConfig  # noqa: E402
from hooks.frames import Identity  # noqa: E402
from hooks.layout import MetricSpec  # noqa: E402
from proto.v1 import telemetry_pb2 as pb  # noqa: E402
from tests.hooks.servicer import LoopbackServer, RecordingServicer, header_of  # noqa: E402

pytestmark = pytest.mark.timeout(60)

IDENT = Identity("aiotest", 1, 2)


class _Vec:
    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def materialize(self) -> np.ndarray:
        return self.values.copy()


def item(step: int, n: int = 5) -> StepItem:
    return StepItem(
        step, _Vec(np.arange(n, dtype=np.float32) + 1000 * step), [(1, n)], wall_time=1e9 + step
    )


def specs(n: int) -> list[MetricSpec]:
    return [MetricSpec(f"a/m{i:03d}", "mean", "m", layer=i) for i in range(n)]


def config(**kw) -> MonitorConfig:
    return MonitorConfig(**{"backoff_initial_s": 0.05, "backoff_max_s": 0.2, **kw})


def data_seqs(frames) -> list[int]:
    return [header_of(f).seq for f in frames if f.WhichOneof("kind") not in ("hello", "schema")]


async def until(predicate, timeout: float = 10.0) -> bool:
    """Poll, yielding to the loop (the senders' tasks run on it)."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return False


class PerRankServicer(RecordingServicer):
    """The recording servicer, acking each rank's seqs on their own (several ranks share a
    connection here); `durable` becomes a dict rank -> highest contiguous seq."""

    def __init__(self) -> None:
        super().__init__()
        self.durable = {}

    def Stream(self, request_iterator, context):
        hello = next(request_iterator)
        rank = hello.hello.header.rank
        with self.lock:
            frames = [hello]
            self.connections.append(frames)
        yield pb.ServerFrame(welcome=pb.Welcome(acked_seq=self.durable.get(rank, 0)))
        for frame in request_iterator:
            with self.lock:
                frames.append(frame)
                seq = header_of(frame).seq
                if seq == self.durable.get(rank, 0) + 1:
                    self.durable[rank] = seq
                    ack = pb.ServerFrame(ack=pb.Ack(seq=seq, step=header_of(frame).step))
                else:
                    ack = None
                self.lock.notify_all()
            if ack is not None:
                yield ack


def test_senders_share_one_channel_and_no_thread():
    servicer = PerRankServicer()
    server = LoopbackServer(servicer)

    async def play() -> list[ChannelSender]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            senders = [
                ChannelSender(
                    server.target,
                    Identity("aiotest", r, 3),
                    [(1, specs(5))],
                    config(),
                    channel=channel,
                )
                for r in range(3)
            ]
            names = {t.name for t in threading.enumerate()}
            assert not any(n.startswith("stepwatch") for n in names)
            for step in range(3):
                for s in senders:
                    assert await s.wait_space(timeout=10)
                    assert s.submit(item(step))
            assert all(await asyncio.gather(*(s.aclose(10) for s in senders)))
            return senders

    try:
        senders = asyncio.run(play())
    finally:
        server.stop()
    assert len(servicer.connections) == 3
    for conn in servicer.connections:  # one stream per rank, in order
        kinds = [f.WhichOneof("kind") for f in conn]
        assert kinds == ["hello", "schema"] + ["chunk", "end_of_step"] * 3
        assert [header_of(f).seq for f in conn[1:]] == list(range(1, 8))
        assert len({header_of(f).rank for f in conn}) == 1
    assert servicer.durable == {0: 7, 1: 7, 2: 7}
    np.testing.assert_array_equal(servicer.step_vectors(1)[2], item(2).values())
    assert all(s.stats()["steps_sent"] == 3 and s.stats()["connects"] == 1 for s in senders)


def test_channel_mode_resends_exactly_the_unacked_frames():
    servicer = RecordingServicer()
    server = LoopbackServer(servicer)

    async def play() -> ChannelSender:
        async with grpc.aio.insecure_channel(server.target) as channel:
            sender = ChannelSender(server.target, IDENT, [(1, specs(5))], config(), channel=channel)
            for step in range(2):
                sender.submit(item(step))
            assert await until(lambda: sender.stats().get("acked_seq") == 5)  # schema + 2 steps
            servicer.acking = False
            for step in range(2, 4):
                sender.submit(item(step))
            assert await until(lambda: len(servicer.frames("end_of_step")) == 4)
            servicer.acking = True
            servicer.drop_current()
            assert await until(lambda: sender.stats().get("acked_seq") == 9)
            sender.submit(item(4))
            assert await sender.aclose(10)
            return sender

    try:
        sender = asyncio.run(play())
    finally:
        server.stop()
    first, second = servicer.connections
    assert data_seqs(first) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert [header_of(f).seq for f in second[1:2]] == [1]  # the schema keeps its seq
    assert data_seqs(second) == [6, 7, 8, 9, 10, 11]  # resend, then new
    stats = sender.stats()
    assert stats["frames_resent"] == 4 and stats["connects"] == 2
    assert set(servicer.step_vectors(1)) == {0, 1, 2, 3, 4}


def test_wait_space_bounds_the_buffer():
    """Nothing acknowledged: the buffer fills, wait_space times out instead of blocking the
    loop, and aclose reports the steps it could not deliver."""
    servicer = RecordingServicer()
    servicer.acking = False
    server = LoopbackServer(servicer)

    async def play() -> ChannelSender:
        async with grpc.aio.insecure_channel(server.target) as channel:
            sender = ChannelSender(
                server.target,
                IDENT,
                [(1, specs(5))],
                config(buffer_steps=2, full_policy="block"),
                channel=channel,
            )
            for step in range(2):
                assert await sender.wait_space(timeout=10)
                assert sender.submit(item(step))
            assert await sender.wait_space(timeout=0.2) is False
            assert await sender.wait_space(below=3, timeout=0.2) is True
            assert await sender.aclose(0.3) is False
            return sender

    try:
        sender = asyncio.run(play())
    finally:
        server.stop()
    assert sender.stats()["lost_at_close"] == 2
    assert sender.stats().get("dropped_steps", 0) == 0


def test_a_paced_channel_sender_batches_within_its_interval_and_close_does_not_wait():
    """Welcome.send_interval_ms, as the threaded sender (tests/hooks/test_sender.py): the
    first step at once, the ones within the interval together in one FrameBatch, the last
    flushed by aclose without waiting the interval out."""
    servicer = RecordingServicer()
    servicer.chunk_ends_step = servicer.takes_batches = True
    servicer.send_interval_ms = 3000
    server = LoopbackServer(servicer)
    steps_in = lambda: {header_of(f).step for f in servicer.frames("chunk")}

    async def play() -> tuple[ChannelSender, float]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            sender = ChannelSender(server.target, IDENT, [(1, specs(5))], config(), channel=channel)
            assert sender.submit(item(0))
            assert await until(lambda: steps_in() == {0})
            for step in (1, 2, 3):
                assert sender.submit(item(step))
            await asyncio.sleep(0.3)
            assert steps_in() == {0}  # held: the interval is not over
            assert await until(lambda: steps_in() == {0, 1, 2, 3})
            assert sender.submit(item(4))
            t0 = asyncio.get_running_loop().time()
            assert await sender.aclose(10)
            return sender, asyncio.get_running_loop().time() - t0

    try:
        sender, close_s = asyncio.run(play())
    finally:
        server.stop()
    chunks = [n for _, n in servicer.messages][-3:]
    assert chunks == [1, 3, 1]  # step 0; steps 1-3 as one batch; step 4 at close
    (t_first, _), (t_batch, _) = servicer.messages[-3:-1]
    assert t_batch - t_first > 2.0 and close_s < 2.5
    assert steps_in() == {0, 1, 2, 3, 4} and sender.stats()["lost_at_close"] == 0


def test_channel_mode_refuses_misuse():
    with pytest.raises(TypeError, match="grpc.aio.Channel"):
        ChannelSender(
            "127.0.0.1:1",
            IDENT,
            [(1, specs(5))],
            config(),
            channel=grpc.insecure_channel("127.0.0.1:1"),
        )

    async def outside_then_close() -> None:
        channel = grpc.aio.insecure_channel("127.0.0.1:1")
        sender = ChannelSender("127.0.0.1:1", IDENT, [(1, specs(5))], config(), channel=channel)
        with pytest.raises(RuntimeError, match="aclose"):
            sender.close(1)
        await sender.aclose(0.1)
        await channel.close()

    async def make_channel() -> grpc.aio.Channel:
        return grpc.aio.insecure_channel("127.0.0.1:1")

    channel = asyncio.run(make_channel())
    with pytest.raises(RuntimeError, match="event loop"):
        ChannelSender("127.0.0.1:1", IDENT, [(1, specs(5))], config(), channel=channel)
    asyncio.run(outside_then_close())
