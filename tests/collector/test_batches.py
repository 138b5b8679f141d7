"""A rank's FrameBatch on its own stream (Welcome.takes_batches): its frames are applied in
order as if sent one by one, acked and de-duplicated one by one, and only data frames may be
inside. Over loopback into the memory store."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from proto.v1 import telemetry_pb2 as pb

from .conftest import mdef
from .test_stream import wait_for

METRICS = [mdef(f"moe/layer00/expert{e:03d}/tokens", pb.REDUCE_SUM, expert=e) for e in range(4)]
VALUES = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)


def send_steps(c) -> None:
    """A schema and three steps, chunked and folded: 6 frames."""
    c.schema(1, METRICS)
    c.chunk(0, 1, VALUES[0][:2], offset=0, total=4)
    c.chunk(0, 1, VALUES[0][2:], offset=2, total=4, ends_step=4)
    c.step(1, 1, VALUES[1])
    c.step(2, 1, VALUES[2], fold=True)


def stored(store, run: str) -> list[dict[str, float]]:
    out = []
    for step in range(len(VALUES)):
        df = store.at_step(run, step, rank=0)
        out.append(dict(zip(df["name"].to_list(), df["value"].to_list())))
    return out


def test_a_batch_is_its_frames_one_by_one(start_collector, client_factory):
    collector, addr, store = start_collector()
    one = client_factory(addr, "one-by-one", 0, 1)
    assert one.expect("welcome").takes_batches
    send_steps(one)
    batched = client_factory(addr, "batched", 0, 1, session="s1")
    batched.expect("welcome")
    with batched.batched() as held:
        send_steps(batched)
    assert len(held) == 6
    assert one.wait_ack().seq == batched.wait_ack().seq == 6
    expect = [dict(zip([m.name for m in METRICS], v.tolist())) for v in VALUES]
    assert stored(store, "one-by-one") == stored(store, "batched") == expect
    stats = collector.stats()
    assert stats["batches"] == 1 and stats["frames"] == 2 + 12  # Hellos + data frames

    # the same batch again on a new connection (a resend after a reconnect): every frame a
    # duplicate, acked again, nothing stored twice
    again = client_factory(addr, "batched", 0, 1, session="s1")
    assert again.expect("welcome").acked_seq == 6
    with again.batched() as held:
        held += batched.sent
    wait_for(lambda: collector.stats()["frames_duplicate"] == 6, "the resent frames")
    assert again.wait_ack(6).seq == 6
    assert stored(store, "batched") == expect
    for c in (one, again):
        assert c.close().code == grpc.StatusCode.OK


@pytest.mark.parametrize("inner", ["batch", "hello"])
def test_a_batch_holds_data_frames_only(start_collector, client_factory, inner):
    _, addr, _ = start_collector()
    c = client_factory(addr, "nested", 0, 1)
    c.expect("welcome")
    bad = (
        pb.ClientFrame(batch=pb.FrameBatch())
        if inner == "batch"
        else pb.ClientFrame(hello=pb.Hello(header=c.header(-1, 0), world_size=1))
    )
    with c.batched() as held:
        c.schema(1, METRICS)
        held.append(bad)
    end = c.wait_end()
    assert end.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"data frames only, not {inner}" in end.details


def test_a_batch_cannot_open_a_stream(start_collector, client_factory):
    _, addr, _ = start_collector()
    c = client_factory(addr, "first", 0, 1, hello=False)
    with c.batched():
        c.schema(1, METRICS)
    end = c.wait_end()
    assert end.code == grpc.StatusCode.INVALID_ARGUMENT and "must be Hello" in end.details


def test_the_welcome_paces_a_big_run_and_not_a_small_one(start_collector, client_factory):
    """Welcome.send_interval_ms = world_size / max_stream_messages_per_s: none for a run too
    small to need it, and capped for a huge one (collector/config.py)."""
    from collector.config import MAX_SEND_INTERVAL_MS, MIN_SEND_INTERVAL_MS

    _, addr, _ = start_collector(max_stream_messages_per_s=100.0)
    world_of = {"small": 2, "big": 64, "huge": 4096}  # 20 ms, 640 ms, 40.96 s
    got = {run: client_factory(addr, run, 0, w).expect("welcome") for run, w in world_of.items()}
    assert 20 < MIN_SEND_INTERVAL_MS and MAX_SEND_INTERVAL_MS < 40_960
    assert {run: w.send_interval_ms for run, w in got.items()} == {
        "small": 0,
        "big": 640,
        "huge": MAX_SEND_INTERVAL_MS,
    }
    assert all(w.takes_batches for w in got.values())  # pacing needs the batches


def test_a_tier_collector_paces_for_its_share_of_the_ranks(start_collector, client_factory):
    """Hello.collectors = N (the client's target list): a collector in tier mode paces a
    run for world_size / N ranks, its share (rank % N picks the collector), and a single
    collector for the whole world whatever the client names; an older client (0) is paced
    for the whole world everywhere. The tier's coordinator is not needed for a Welcome."""
    _, single, _ = start_collector(max_stream_messages_per_s=100.0)
    _, tier, _ = start_collector(max_stream_messages_per_s=100.0, coordinator="127.0.0.1:9")

    def interval(addr: str, run: str, collectors: int) -> int:
        c = client_factory(addr, run, 0, 256, collectors=collectors)
        return c.expect("welcome").send_interval_ms

    assert interval(tier, "t4", 4) == 640  # 64 streams of the 256 at 100 a second
    assert interval(tier, "t3", 3) == 860  # ceil(256 / 3) = 86
    assert interval(tier, "t0", 0) == interval(tier, "t1", 1) == 2560
    assert interval(single, "s4", 4) == 2560


@pytest.mark.parametrize("rate", [0, -1.0, float("inf"), float("nan")])
def test_a_pacing_rate_must_be_a_positive_number(rate):
    from collector.config import CollectorConfig

    with pytest.raises(ValueError, match="max_stream_messages_per_s"):
        CollectorConfig(insecure=True, max_stream_messages_per_s=rate)


def test_acks_are_paced_like_the_frames_and_a_goodbye_gets_its_ack_at_once(
    start_collector, client_factory
):
    """A flush acks a rank at most once per its send interval: an ack that comes sooner is
    held back and sent once the interval is over (the ack clock: the last ack sent), never
    lost; a rank that says goodbye gets it at once, so its close does not wait the interval
    out. World 1 at 0.2 messages a second: the 5 s cap."""
    from collector.config import MAX_SEND_INTERVAL_MS

    _, addr, store = start_collector(max_stream_messages_per_s=0.2)
    c = client_factory(addr, "paced-acks", 0, 1)
    assert c.expect("welcome").send_interval_ms == MAX_SEND_INTERVAL_MS
    c.schema(1, METRICS)
    c.step(0, 1, VALUES[0], fold=True)
    first = (
        c.wait_ack()
    )  # schema and step 0 (held at most one interval, if the schema was acked first)
    first_at = time.monotonic()
    assert first.seq == 2
    c.step(1, 1, VALUES[1], fold=True)
    wait_for(lambda: store.at_step("paced-acks", 1, rank=0).height == 4, "step 1 stored")
    time.sleep(0.5)
    assert c.acks[-1].seq == 2  # durable, but its ack waits for the interval
    assert c.wait_ack(3, timeout=15).seq == 3
    assert time.monotonic() - first_at > MAX_SEND_INTERVAL_MS / 1000 - 1.0

    c.step(2, 1, VALUES[2], fold=True)  # within the next interval; then goodbye
    t0 = time.monotonic()
    end = c.close()
    assert end.code == grpc.StatusCode.OK and c.acks[-1].seq == 4
    assert time.monotonic() - t0 < MAX_SEND_INTERVAL_MS / 1000 - 1.0  # not held back
    assert stored(store, "paced-acks") == [
        dict(zip([m.name for m in METRICS], v.tolist())) for v in VALUES
    ]
