"""A rank's FrameBatch on its own stream (Welcome.takes_batches): its frames are applied in
order as if sent one by one, acked and de-duplicated one by one, and only data frames may be
inside. Over loopback into the memory store."""

from __future__ import annotations

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
