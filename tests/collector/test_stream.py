"""End to end over loopback into the memory store: reductions read back, acks only after a
flush, reconnect + resend without double counting, stragglers, goodbye."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from proto.v1 import telemetry_pb2 as pb
from store.memory import MemoryStore

from .conftest import WAIT_S, mdef

OPS = {pb.REDUCE_SUM: np.sum, pb.REDUCE_MEAN: np.mean, pb.REDUCE_MAX: np.max, pb.REDUCE_MIN: np.min}


def wait_for(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def reduced(store, run: str, step: int) -> dict[str, float]:
    df = store.at_step(run, step)
    return dict(zip(df["name"].to_list(), df["value"].to_list()))


def test_two_ranks_values_read_back_equal_independent_reductions(start_collector, client_factory):
    _, addr, store = start_collector()
    rng = np.random.default_rng(1)
    names = [f"moe/layer{i // 4:02d}/expert{i % 4:03d}/act_rms" for i in range(10)]
    ops = [list(OPS)[i % 4] for i in range(10)]
    every = [mdef(n, op, layer=i // 4, expert=i % 4) for i, (n, op) in enumerate(zip(names, ops))]
    sparse = [mdef("param_norm/total", pb.REDUCE_MAX)]
    c0 = client_factory(addr, "e2e", 0, 2)
    c1 = client_factory(addr, "e2e", 1, 2)
    order1 = rng.permutation(10)  # rank 1 declares the same metrics in another order
    c0.schema(1, every)
    c0.schema(2, sparse)
    c1.schema(4, [every[i] for i in order1])
    c1.schema(2, sparse)
    sent = {}  # (step, rank) -> {name: value}
    for step in range(3):
        v0, v1 = rng.normal(size=10).astype(np.float32), rng.normal(size=10).astype(np.float32)
        c0.chunk(step, 1, v0[:6], offset=0, total=10)  # chunked, out of order
        c0.chunk(step, 1, v0[6:], offset=6, total=10)
        c1.chunk(step, 4, v1[order1][5:], offset=5, total=10)
        c1.chunk(step, 4, v1[order1][:5], offset=0, total=10)
        n0 = n1 = 10
        sent[step, 0] = dict(zip(names, v0.tolist()))
        sent[step, 1] = dict(zip(names, v1.tolist()))
        if step % 2 == 0:  # every other step only
            c0.chunk(step, 2, [float(step)])
            c1.chunk(step, 2, [float(step) + 0.5])
            n0, n1 = n0 + 1, n1 + 1
            sent[step, 0]["param_norm/total"] = float(step)
            sent[step, 1]["param_norm/total"] = step + 0.5
        c0.end_of_step(step, n0)
        c1.end_of_step(step, n1)
    c0.wait_ack()
    c1.wait_ack()

    op_of = dict(zip(names, ops)) | {"param_norm/total": pb.REDUCE_MAX}
    for step in range(3):
        got = reduced(store, "e2e", step)
        assert set(got) == set(sent[step, 0])
        for name, value in got.items():
            expect = OPS[op_of[name]](
                np.array([sent[step, 0][name], sent[step, 1][name]], dtype=np.float64)
            )
            assert value == pytest.approx(expect, rel=1e-6, abs=1e-6), (step, name)
        for rank in (0, 1):
            raw = store.at_step("e2e", step, rank=rank)
            assert dict(zip(raw["name"].to_list(), raw["value"].to_list())) == pytest.approx(
                sent[step, rank]
            )
    steps = store.steps("e2e")
    assert steps["step"].to_list() == [0, 1, 2] and steps["complete"].all()
    md = store.metrics("e2e")
    assert md.height == 11 and md["metric_id"].to_list() == list(range(11))  # dense, shared
    assert store.series("e2e", names[3])["step"].to_list() == [0, 1, 2]


class GatedStore(MemoryStore):
    """A flush that carries step values waits until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def flush(self) -> None:
        if self._pending:  # value rows buffered (not just run/metric rows)
            self.gate.wait(WAIT_S)
        super().flush()


def test_acks_are_cumulative_and_only_after_the_flush(start_collector, client_factory):
    store = GatedStore()
    collector, addr, _ = start_collector(store=store)
    c = client_factory(addr, "acks", 0, 1)
    assert c.expect("welcome").acked_seq == 0
    c.schema(1, [mdef("loss", pb.REDUCE_MEAN)])
    c.step(0, 1, [2.5])  # seqs 2 (chunk) and 3 (end)
    wait_for(lambda: collector.stats()["values_written"] >= 1, "the step to be written")
    with pytest.raises(TimeoutError):  # written, not flushed: no ack covers the step's
        c.wait_ack(seq=2, timeout=0.5)  # frames (a keepalive may repeat an older ack)
    assert all(a.seq < 2 for a in c.acks)
    store.gate.set()
    ack = c.wait_ack()
    assert (ack.seq, ack.step) == (3, 0)  # one ack covers all three frames
    assert store.series("acks", "loss")["value"].to_list() == [2.5]  # durable before the ack
    for step in (1, 2, 3):
        c.step(step, 1, [float(step)])
    assert c.wait_ack().seq == 9
    seqs = [a.seq for a in c.acks]
    assert seqs == sorted(seqs) and c.acks[-1].step == 3


def test_reconnect_and_resend_keeps_exactly_one_copy(start_collector, client_factory):
    collector, addr, store = start_collector()
    ms = [mdef("tokens", pb.REDUCE_SUM), mdef("max_logit", pb.REDUCE_MAX)]
    c0 = client_factory(addr, "resend", 0, 2)
    c1 = client_factory(addr, "resend", 1, 2)
    c0.schema(1, ms)
    c1.schema(1, ms)
    c0.step(0, 1, [10, 1])
    c1.step(0, 1, [20, 2])
    acked = c0.wait_ack().seq  # 3
    c0.chunk(1, 1, [100], offset=0, total=2)  # half of step 1 ...
    wait_for(lambda: collector.stats()["frames"] >= 9, "the half step to arrive")
    c0.cancel()  # ... and the connection drops
    wait_for(lambda: collector.stats()["streams_closed"] >= 1, "the server to see the drop")
    assert collector.ingest.runs["resend"].said_goodbye == set()  # a drop is no goodbye

    again = client_factory(addr, "resend", 0, 2, seq=c0.seq)
    assert again.expect("welcome").acked_seq == acked
    dup_before = collector.stats()["frames_duplicate"]
    for frame in c0.sent:  # resend everything it still had,
        again.send(frame)  # even what was already acked
    again.chunk(1, 1, [5], offset=1, total=2)
    again.end_of_step(1, 2)
    c1.step(1, 1, [200, 3])
    again.wait_ack()
    c1.wait_ack()

    assert collector.stats()["frames_duplicate"] - dup_before == 3  # schema + step 0 frames
    assert reduced(store, "resend", 0) == {"tokens": 30, "max_logit": 2}
    assert reduced(store, "resend", 1) == {"tokens": 300, "max_logit": 5}
    raw = store.at_step("resend", 1, rank=0)
    assert raw.height == 2 and raw["value"].to_list() == [100, 5]
    assert store.steps("resend")["complete"].to_list() == [True, True]


def test_straggler_is_left_out_and_recorded_late(start_collector, client_factory):
    collector, addr, store = start_collector(straggler_timeout_s=0.3)
    c0 = client_factory(addr, "strag", 0, 2)
    c1 = client_factory(addr, "strag", 1, 2)
    c0.schema(1, [mdef("grad_norm", pb.REDUCE_MAX)])
    c1.schema(1, [mdef("grad_norm", pb.REDUCE_MAX)])
    c0.step(0, 1, [1.0])
    assert c0.wait_ack().step == 0  # reduced without rank 1
    st = store.steps("strag").row(0, named=True)
    assert (st["n_ranks"], st["missing_ranks"], st["complete"]) == (1, [1], False)
    assert reduced(store, "strag", 0) == {"grad_norm": 1.0}

    c1.step(0, 1, [50.0])  # rank 1 wakes up: late
    c1.wait_ack()
    assert reduced(store, "strag", 0) == {"grad_norm": 1.0}  # reduction stands
    assert store.at_step("strag", 0, rank=1)["value"].to_list() == [50.0]  # but recorded
    c0.step(1, 1, [2.0])
    c1.step(1, 1, [3.0])
    c0.wait_ack()
    c1.wait_ack()
    assert reduced(store, "strag", 1) == {"grad_norm": 3.0}
    assert store.steps("strag")["complete"].to_list() == [False, True]
    s = collector.stats()
    assert (s["steps_incomplete"], s["stragglers"], s["late_values"]) == (1, 1, 1)


def test_keepalive_acks_repeat_the_seq_while_the_barrier_waits(start_collector, client_factory):
    _, addr, _ = start_collector(straggler_timeout_s=60, keepalive_s=0.05)
    c0 = client_factory(addr, "alive", 0, 2)
    c0.schema(1, [mdef("x")])
    assert c0.wait_ack().seq == 1
    c0.step(0, 1, [1.0])  # rank 1 never comes
    for _ in range(3):
        assert c0.expect("ack").seq == 1  # same seq: the step is not durable


def test_goodbye_ends_streams_after_their_acks_and_finishes_the_run(
    start_collector, client_factory
):
    _, addr, store = start_collector()
    c0 = client_factory(addr, "bye", 0, 2)
    c1 = client_factory(addr, "bye", 1, 2)
    c0.schema(1, [mdef("x")])
    c1.schema(1, [mdef("x")])
    c0.step(0, 1, [1.0])
    c1.step(0, 1, [2.0])
    c0.step(1, 1, [4.0])  # rank 1 never ends step 1
    assert c1.close().code.name == "OK"
    end = c0.close()  # last goodbye: step 1 is reduced
    assert end.code.name == "OK" and c0.acks[-1].seq == c0.seq
    assert store.runs().row(0, named=True)["status"] == "finished"
    st = store.steps("bye")
    assert st["complete"].to_list() == [True, False] and st["missing_ranks"][1].to_list() == [1]
    assert reduced(store, "bye", 1) == {"x": 4.0}


def test_a_goodbye_before_the_acks_is_flushed_at_once_acked_and_ends_ok(
    start_collector, client_factory
):
    """Welcome.flushes_at_goodbye: a rank half-closes with nothing acked yet; the collector
    flushes then, not at its flush tick (an hour here), acks everything and ends the stream
    OK with the run finished and every value stored."""
    _, addr, store = start_collector(flush_interval_s=3600.0, flush_every_steps=10_000)
    c = client_factory(addr, "early", 0, 1)
    assert c.expect("welcome").flushes_at_goodbye
    c.schema(1, [mdef("a"), mdef("b", pb.REDUCE_MAX)])
    for step in range(3):
        c.step(step, 1, [float(step), 10.0 + step])
    with pytest.raises(TimeoutError):  # read what came down (keepalives at most)
        while True:
            c.next(timeout=0.3)
    assert all(a.seq == 0 for a in c.acks)  # nothing durable before the goodbye: tick in 1 h
    end = c.close()
    assert end.code.name == "OK" and c.acks[-1].seq == c.seq
    assert store.runs().row(0, named=True)["status"] == "finished"
    for step in range(3):
        assert reduced(store, "early", step) == {"a": float(step), "b": 10.0 + step}


def test_many_concurrent_streams_of_one_run(start_collector, client_factory):
    _, addr, store = start_collector()
    world = 32
    clients = [client_factory(addr, "wide", r, world) for r in range(world)]
    for c in clients:
        c.schema(
            1,
            [
                mdef("tokens", pb.REDUCE_SUM),
                mdef("act_max", pb.REDUCE_MAX),
                mdef("act_min", pb.REDUCE_MIN),
            ],
        )
    for step in range(3):
        for r, c in enumerate(clients):
            c.step(step, 1, [r, r * (step + 1), -r])
    for c in clients:
        c.wait_ack()
    for step in range(3):
        assert reduced(store, "wide", step) == {
            "tokens": sum(range(world)),
            "act_max": (world - 1) * (step + 1),
            "act_min": -(world - 1),
        }
    assert store.steps("wide")["n_ranks"].to_list() == [world] * 3


class RecordingStore(MemoryStore):
    """Records the shape of every raw write (then stores it as the memory store does)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: list[tuple[int, list[int], int]] = []  # (step, ranks, n metrics)
        self.raw_rows: list[tuple[int, list[int]]] = []  # (rows, ranks)

    def write_raw_block(self, run, block) -> None:
        self.blocks.append((block.step, block.rank.tolist(), block.metric_id.size))
        super().write_raw_block(run, block)

    def write_raw(self, run, batch) -> None:
        self.raw_rows.append((batch.value.size, sorted(set(batch.rank.tolist()))))
        super().write_raw(run, batch)


def test_ranks_sharing_a_schema_are_written_as_one_block(start_collector, client_factory):
    """Ranks 0-2 register the same metrics (one layout), rank 3 others; rank 2 sends half its
    vector and straggles. One block per layout, the straggler's half as rows, all readable."""
    store = RecordingStore()
    _, addr, _ = start_collector(store=store, straggler_timeout_s=0.3)
    shared = [mdef("loss", pb.REDUCE_MEAN)] + [
        mdef(f"moe/layer00/expert{e:03d}/tokens", pb.REDUCE_SUM, layer=0, expert=e)
        for e in range(4)
    ]
    other = [
        mdef("loss", pb.REDUCE_MEAN),
        mdef("moe/layer00/expert009/tokens", pb.REDUCE_SUM, layer=0, expert=9),
    ]
    clients = [client_factory(addr, "blk", r, 4) for r in range(4)]
    for r, c in enumerate(clients):
        c.schema(7 + r, other if r == 3 else shared)  # schema ids differ, content not
    vals = {r: np.arange(5, dtype=np.float32) + 10 * r for r in range(3)}
    vals[3] = np.array([100.0, 5.0], np.float32)
    for r in (0, 1, 3):
        clients[r].step(0, 7 + r, vals[r])
    clients[2].chunk(0, 9, vals[2][:2], offset=0, total=5)  # never ends the step
    clients[0].wait_ack()

    assert sorted(store.blocks) == [(0, [0, 1], 5), (0, [3], 2)]
    assert store.raw_rows == [(2, [2])]
    got = reduced(store, "blk", 0)
    assert got["loss"] == pytest.approx((0 + 10 + 100) / 3)
    assert got["moe/layer00/expert003/tokens"] == 4 + 14  # position 4
    for r in (0, 1, 2):
        n = 2 if r == 2 else 5
        assert store.at_step("blk", 0, rank=r)["value"].to_list() == vals[r][:n].tolist()


def test_mixed_plain_and_folded_clients_and_a_folded_resend(start_collector, client_factory):
    """Rank 0 speaks the older form (chunk + EndOfStep), rank 1 ends each step in its last
    chunk; rank 1's stream drops after an unacked folded frame and it resends it: every step is
    reduced once over both ranks, and each folded frame is acked by its own seq."""
    collector, addr, store = start_collector()
    ms = [mdef("tokens", pb.REDUCE_SUM), mdef("max_logit", pb.REDUCE_MAX)]
    old = client_factory(addr, "mixed", 0, 2)
    new = client_factory(addr, "mixed", 1, 2)
    assert new.expect("welcome").chunk_ends_step
    old.schema(1, ms)
    new.schema(1, ms)
    old.step(0, 1, [10, 1])
    new.chunk(0, 1, [20], offset=0, total=2)
    new.chunk(0, 1, [2], offset=1, total=2, ends_step=2)  # seq 3 ends step 0
    assert new.wait_ack().seq == 3 and old.wait_ack().seq == 3
    new.step(1, 1, [30, 4], fold=True)  # seq 4, step 1 waits
    wait_for(lambda: collector.stats()["frames"] >= 8, "the folded frame to arrive")
    new.cancel()
    wait_for(lambda: collector.stats()["streams_closed"] >= 1, "the server to see the drop")
    again = client_factory(addr, "mixed", 1, 2, seq=new.seq)
    assert again.expect("welcome").acked_seq == 3
    for frame in new.sent:
        again.send(frame)  # schema and step 0 are duplicates, seq 4 a resend
    old.step(1, 1, [40, 3])
    assert again.wait_ack().seq == 4 and old.wait_ack().seq == 5
    assert collector.stats()["frames_duplicate"] == 3
    assert reduced(store, "mixed", 0) == {"tokens": 30, "max_logit": 2}
    assert reduced(store, "mixed", 1) == {"tokens": 70, "max_logit": 4}
    raw = store.at_step("mixed", 1, rank=1)
    assert raw["value"].to_list() == [30, 4]  # one copy
    assert store.steps("mixed")["complete"].to_list() == [True, True]
