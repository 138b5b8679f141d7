"""The sender against a real gRPC server on loopback (tests/hooks/servicer.py): frame order,
chunking, reconnect with exact resend, buffer-full policies, auth, seq continuation."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from hooks.buffer import StepItem
from hooks.config import MonitorConfig
from hooks.frames import Identity
from hooks.layout import MetricSpec
from hooks.sender import Sender
from tests.hooks.servicer import LoopbackServer, RecordingServicer, header_of, wait_until

pytestmark = pytest.mark.timeout(60)
IDENT = Identity("sendtest", 1, 2)


class ArrayVector:
    """Stands in for hooks.stats.HostVector: the step's values, already on the host."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def materialize(self) -> np.ndarray:
        return self.values.copy()


def specs(n: int, prefix: str) -> list[MetricSpec]:
    return [MetricSpec(f"{prefix}/m{i:03d}", "mean", "m", layer=i) for i in range(n)]


def vector(step: int, n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) + 1000 * step).astype(np.float32)


def item(step: int, n1: int = 5, n2: int = 0) -> StepItem:
    schemas = [(1, n1)] + ([(2, n2)] if n2 else [])
    return StepItem(
        step=step, vector=ArrayVector(vector(step, n1 + n2)), schemas=schemas, wall_time=1e9 + step
    )


def make_sender(
    target: str, n1: int = 5, n2: int = 3, token: str | None = None, **config
) -> Sender:
    cfg = MonitorConfig(**{"backoff_initial_s": 0.05, "backoff_max_s": 0.2, **config})
    return Sender(
        target,
        IDENT,
        [(1, specs(n1, "a")), (2, specs(n2, "b"))],
        cfg,
        token=token,
        run_config={"preset": "test"},
    )


def data_seqs(frames) -> list[int]:
    return [header_of(f).seq for f in frames if f.WhichOneof("kind") not in ("hello", "schema")]


def test_frames_in_order_and_values_round_trip(server, servicer):
    sender = make_sender(server.target)
    step0 = item(0, 5, 3)
    step0.patch_idx, step0.patch_vals = np.array([4]), np.array([-7.5], np.float32)
    assert sender.submit(step0) and sender.submit(item(1))
    sender.submit_clip_ack(step=2, version=9)
    assert sender.close(timeout=10)
    (conn,) = servicer.connections
    kinds = [f.WhichOneof("kind") for f in conn]
    assert kinds == [
        "hello",
        "schema",
        "schema",
        "chunk",
        "chunk",
        "end_of_step",
        "chunk",
        "end_of_step",
        "clip_ack",
    ]
    hello = conn[0].hello
    assert (hello.header.run, hello.header.rank, hello.world_size) == ("sendtest", 1, 2)
    assert hello.protocol_version == 1 and json.loads(hello.config_json) == {"preset": "test"}
    assert hello.collectors == 1  # one target: a tier collector paces for the whole world
    assert [header_of(f).seq for f in conn[1:]] == list(range(1, 9))  # contiguous from 1
    assert [f.schema.schema_id for f in conn[1:3]] == [1, 2]
    assert [m.name for m in conn[1].schema.metrics] == [f"a/m{i:03d}" for i in range(5)]
    assert [header_of(f).step for f in conn[3:]] == [0, 0, 0, 1, 1, 2]
    assert conn[5].end_of_step.n_values == 8 and conn[7].end_of_step.n_values == 5
    assert conn[5].end_of_step.wall_time == 1e9
    assert conn[8].clip_ack.version == 9
    want = vector(0, 8)
    want[4] = -7.5
    np.testing.assert_array_equal(servicer.step_vectors(1)[0], want[:5])
    np.testing.assert_array_equal(servicer.step_vectors(2)[0], want[5:])
    np.testing.assert_array_equal(servicer.step_vectors(1)[1], vector(1, 5))
    assert sender.stats()["acked_seq"] == 8


def test_a_vector_bigger_than_the_chunk_size_is_split(server, servicer):
    sender = make_sender(server.target, n1=10, chunk_values=4)
    sender.submit(item(0, 10))
    assert sender.close(timeout=10)
    chunks = [f.chunk for f in servicer.frames("chunk")]
    assert [(c.offset, c.total, len(c.values) // 4) for c in chunks] == [
        (0, 10, 4),
        (4, 10, 4),
        (8, 10, 2),
    ]
    np.testing.assert_array_equal(servicer.step_vectors(1)[0], vector(0, 10))
    assert servicer.frames("end_of_step")[0].end_of_step.n_values == 10


def test_reconnect_resends_exactly_the_unacked_frames(server, servicer):
    sender = make_sender(server.target)
    for step in range(2):
        sender.submit(item(step))
    assert servicer.wait_for(lambda s: s.durable == 2 + 2 * 2)  # schemas + 2 steps acked
    servicer.acking = False
    for step in range(2, 4):
        sender.submit(item(step))
    assert servicer.wait_for(lambda s: len(s.frames("end_of_step")) == 4)
    unacked = data_seqs(servicer.connections[0])[4:]
    assert unacked == [7, 8, 9, 10]
    servicer.acking = True
    servicer.drop_current()
    assert servicer.wait_for(lambda s: len(s.connections) == 2 and s.durable == 10)
    sender.submit(item(4))
    assert sender.close(timeout=10)
    second = servicer.connections[1]
    assert [f.WhichOneof("kind") for f in second[:3]] == ["hello", "schema", "schema"]
    assert [header_of(f).seq for f in second[1:3]] == [1, 2]  # schemas keep their seq
    assert data_seqs(second) == [7, 8, 9, 10, 11, 12]  # resend, then new
    assert [header_of(f).step for f in second[3:]] == [2, 2, 3, 3, 4, 4]
    stats = sender.stats()
    assert stats["frames_resent"] == 4 and stats["connects"] == 2
    assert set(servicer.step_vectors(1)) == {0, 1, 2, 3, 4}
    sessions = {c[0].hello.session for c in servicer.connections}  # one client, one session
    assert sessions == {sender.session} and len(sender.session) == 32


def test_frames_acked_only_by_welcome_are_not_resent(server, servicer):
    """The collector made frames durable but the stream broke before their Ack arrived: the
    next Welcome.acked_seq covers them, and the client must drop, not resend, them."""
    sender = make_sender(server.target)
    sender.submit(item(0))
    assert wait_until(lambda: sender.stats().get("acked_seq") == 4)
    servicer.send_acks = False
    sender.submit(item(1))
    assert servicer.wait_for(lambda s: s.durable == 6)
    assert sender.stats()["acked_seq"] == 4
    servicer.send_acks = True
    servicer.drop_current()
    assert servicer.wait_for(lambda s: len(s.connections) == 2)
    sender.submit(item(2))
    assert sender.close(timeout=10)
    assert data_seqs(servicer.connections[1]) == [7, 8]
    assert sender.stats()["frames_resent"] == 0


def test_drop_oldest_while_the_collector_is_down_then_deliver(servicer):
    probe = LoopbackServer(servicer)
    port = probe.port
    probe.stop()  # a free port nobody listens on
    sender = make_sender(f"127.0.0.1:{port}", buffer_steps=3)
    for step in range(5):
        assert sender.submit(item(step))
    stats = sender.stats()
    assert stats["dropped_steps"] == 2 and stats["buffered_steps"] == 3
    server = LoopbackServer(servicer, port=port)
    try:
        assert sender.close(timeout=20)
    finally:
        server.stop()
    assert sorted(servicer.step_vectors(1)) == [2, 3, 4]  # the oldest two dropped
    assert data_seqs(servicer.connections[-1]) == list(range(3, 9))  # no seq gap


def test_drop_oldest_when_every_step_is_in_flight_drops_the_new_one(server, servicer):
    """Sent frames are owed (a seq gap is refused): the new step is dropped, and reported as
    a hole once the collector acknowledges again; seqs stay contiguous throughout."""
    servicer.acking = False
    servicer.takes_dropped = True
    sender = make_sender(server.target, buffer_steps=2)
    sender.submit(item(0))
    sender.submit(item(1))
    assert servicer.wait_for(lambda s: len(s.frames("end_of_step")) == 2)
    assert sender.submit(item(2)) is False and sender.submit(item(3)) is False
    stats = sender.stats()
    assert stats["dropped_steps"] == 2 and stats["dropped_newest"] == 2
    assert stats["buffered_steps"] == 2
    servicer.acking = True
    servicer.drop_current()  # the reconnect's Welcome acks what it holds; then the report
    assert servicer.wait_for(lambda s: len(s.frames("dropped")) == 1)
    assert sender.close(timeout=10)
    (report,) = [f.dropped for f in servicer.frames("dropped")]
    assert [(r.first, r.last) for r in report.ranges] == [(2, 3)] and report.total == 2
    # the unacked steps resent as they were, then the report: no seq skipped
    assert data_seqs(servicer.connections[-1]) == [3, 4, 5, 6, 7]
    assert servicer.connections[-1][-1].WhichOneof("kind") == "dropped"


def test_block_policy_waits_then_drops_the_new_step(servicer):
    probe = LoopbackServer(servicer)
    target = probe.target
    probe.stop()
    sender = make_sender(target, buffer_steps=2, full_policy="block", block_timeout_s=0.2)
    assert sender.submit(item(0)) and sender.submit(item(1))
    assert sender.submit(item(2)) is False
    stats = sender.stats()
    assert stats["dropped_block_timeout"] == 1 and stats["blocked_submits"] == 1
    assert stats["buffered_steps"] == 2
    assert sender.close(timeout=0.2) is False and sender.stats()["lost_at_close"] == 2


def test_seq_continues_after_what_the_collector_already_holds(server, servicer):
    servicer.durable = 100  # a restarted trainer: the run has history
    sender = make_sender(server.target)
    sender.submit(item(0))
    assert sender.close(timeout=10)
    assert [header_of(f).seq for f in servicer.connections[0][1:]] == [101, 102, 103, 104]


def test_token_in_metadata():
    servicer = RecordingServicer(token="s3cret")
    server = LoopbackServer(servicer)
    try:
        good = make_sender(server.target, token="s3cret")
        good.submit(item(0))
        assert good.close(timeout=10)
        assert len(servicer.frames("end_of_step")) == 1
        bad = make_sender(server.target, token="wrong")
        bad.submit(item(1))
        assert wait_until(lambda: "fatal_error" in bad.stats())  # permanent: no reconnect
        assert bad.close(timeout=0.2) is False
        stats = bad.stats()
        assert stats["status_UNAUTHENTICATED"] == 1 and stats["connect_attempts"] == 1
        assert stats["fatal_error"].startswith("UNAUTHENTICATED")
        assert bad.submit(item(2)) is False and bad.stats()["dropped_stopped"] == 1
        assert servicer.rejected == 1 and len(servicer.frames("end_of_step")) == 1
    finally:
        server.stop()


# ---------------------------------------------------------------- the step's end in its last chunk
def test_a_capable_collector_gets_one_frame_per_rank_step(server, servicer):
    servicer.chunk_ends_step = True
    sender = make_sender(server.target, n1=6, chunk_values=4)
    sender.submit(item(0, 6, 3))
    sender.submit(item(1, 6))
    sender.submit(
        StepItem(step=2, vector=ArrayVector(np.zeros(0, np.float32)), schemas=[], wall_time=5.0)
    )
    assert sender.close(timeout=10)
    (conn,) = servicer.connections
    assert [f.WhichOneof("kind") for f in conn[3:]] == ["chunk"] * 5 + ["end_of_step"]
    assert data_seqs(conn) == list(range(3, 9))  # one seq per frame
    assert [f.chunk.ends_step for f in conn[3:8]] == [False, False, True, False, True]
    assert servicer.ended_steps() == [(0, 9, 1e9), (1, 6, 1e9 + 1), (2, 0, 5.0)]
    np.testing.assert_array_equal(servicer.step_vectors(1)[0], vector(0, 9)[:6])
    np.testing.assert_array_equal(servicer.step_vectors(2)[0], vector(0, 9)[6:])
    assert sender.stats()["acked_seq"] == 8 and sender.stats()["buffered_steps"] == 0


def test_an_older_collector_keeps_endofstep_frames(server, servicer):
    sender = make_sender(server.target)
    sender.submit(item(0))
    assert sender.close(timeout=10)
    assert not any(f.chunk.ends_step for f in servicer.frames("chunk"))
    assert servicer.ended_steps() == [(0, 5, 1e9)]


def test_folded_frames_resent_to_an_older_collector_are_split_and_renumbered(server, servicer):
    """Sent to a capable collector, unacked, then the stream breaks and the collector that
    answers is an older one: each folded chunk goes again as chunk + EndOfStep, seqs stay one
    per frame from the first unacked one, and steps built after follow on."""
    servicer.chunk_ends_step = True
    sender = make_sender(server.target)
    sender.submit(item(0))
    assert servicer.wait_for(lambda s: s.durable == 3)  # schemas + step 0 (1 frame)
    servicer.acking = False
    sender.submit(item(1))
    sender.submit_clip_ack(step=2, version=4)
    sender.submit(item(2))
    assert servicer.wait_for(lambda s: len(s.ended_steps()) == 3)
    assert data_seqs(servicer.connections[0]) == [3, 4, 5, 6]
    servicer.chunk_ends_step, servicer.acking = False, True
    servicer.drop_current()
    assert servicer.wait_for(lambda s: len(s.connections) == 2)
    sender.submit(item(3))
    assert sender.close(timeout=10)
    second = servicer.connections[1]
    assert [f.WhichOneof("kind") for f in second[3:]] == [
        "chunk",
        "end_of_step",
        "clip_ack",
        "chunk",
        "end_of_step",
        "chunk",
        "end_of_step",
    ]
    assert data_seqs(second) == list(range(4, 11))
    assert not any(f.chunk.ends_step for f in second[3:] if f.WhichOneof("kind") == "chunk")
    assert servicer.ended_steps(1) == [(1, 5, 1e9 + 1), (2, 5, 1e9 + 2), (3, 5, 1e9 + 3)]
    assert set(servicer.step_vectors(1)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(servicer.step_vectors(1)[2], vector(2, 5))
    stats = sender.stats()
    assert stats["resends_split"] == 1 and stats["frames_resent"] == 5
    assert stats["acked_seq"] == 10 and stats["buffered_steps"] == 0


def test_plain_frames_resent_to_a_capable_collector_go_as_built(server, servicer):
    """The other way round: frames built for an older collector are valid for a newer one and
    go again unchanged; only the steps built after the upgrade fold their end."""
    sender = make_sender(server.target)
    sender.submit(item(0))
    assert servicer.wait_for(lambda s: s.durable == 4)
    servicer.acking = False
    sender.submit(item(1))
    assert servicer.wait_for(lambda s: len(s.ended_steps()) == 2)
    servicer.chunk_ends_step, servicer.acking = True, True
    servicer.drop_current()
    assert servicer.wait_for(lambda s: len(s.connections) == 2)
    sender.submit(item(2))
    assert sender.close(timeout=10)
    second = servicer.connections[1]
    assert [f.WhichOneof("kind") for f in second[3:]] == ["chunk", "end_of_step", "chunk"]
    assert data_seqs(second) == [5, 6, 7]
    assert second[3] == servicer.connections[0][5]  # the same frame again
    assert servicer.ended_steps(1) == [(1, 5, 1e9 + 1), (2, 5, 1e9 + 2)]
    assert sender.stats().get("resends_split", 0) == 0


# ---------------------------------------------------------------- backoff
def test_backoff_doubles_with_jitter_up_to_its_ceiling_and_resets():
    import random

    from hooks.sender.core import Backoff

    b = Backoff(0.2, 3.0, random.Random(7))
    waits = [b.next() for _ in range(10)]
    nominal = [min(0.2 * 2**i, 3.0) for i in range(10)]
    assert all(n / 2 <= w <= n for w, n in zip(waits, nominal))
    assert len({round(w / n, 6) for w, n in zip(waits, nominal)}) == 10  # jittered, not fixed
    b.reset()
    assert 0.1 <= b.next() <= 0.2


def test_steps_never_cut_the_backoff_short(servicer):
    """The bug: every submit woke the worker, which then reconnected: one attempt per step.
    Now 200 steps over ~2 s of outage cost a handful of attempts."""
    probe = LoopbackServer(servicer)
    target = probe.target
    probe.stop()  # nobody listens
    sender = make_sender(target, backoff_initial_s=0.1, backoff_max_s=10.0)
    for step in range(200):
        sender.submit(item(step))
        time.sleep(0.01)
    attempts = sender.stats()["connect_attempts"]
    sender.close(timeout=0.1)
    assert 1 <= attempts <= 7, attempts  # ~log2(2 s / 0.05 s) + 1; the bug made ~200


def test_schemas_go_packed_to_a_collector_that_takes_them_and_as_defs_after_a_downgrade(
    server, servicer
):
    """The first collector says takes_packed_schema: both schemas go as PackedMetrics. The
    stream drops, and the collector that answers next is an older one: the same schemas go
    again under the same seqs as MetricDefs, holding exactly the same metrics."""
    from hooks import schemas

    servicer.takes_packed_schema = True
    sender = make_sender(server.target)
    sender.submit(item(0, 5, 3))
    assert servicer.wait_for(lambda s: s.durable >= 4)
    servicer.takes_packed_schema = False
    servicer.drop_current()
    assert servicer.wait_for(lambda s: len(s.connections) == 2)
    sender.submit(item(1))
    assert sender.close(timeout=10)
    first, second = (
        [f.schema for f in c if f.WhichOneof("kind") == "schema"] for c in servicer.connections
    )
    assert [s.HasField("packed") for s in first] == [True, True] and not first[0].metrics
    assert [s.HasField("packed") for s in second] == [False, False]
    assert [s.header.seq for s in second] == [s.header.seq for s in first]
    for packed, defs, want in zip(first, second, (specs(5, "a"), specs(3, "b"))):
        assert schemas.columns_of(packed).specs() == want
        assert [(d.name, d.layer, d.stat) for d in defs.metrics] == [
            (s.name, s.layer, s.stat) for s in want
        ]
    assert sender.stats()["schemas_reencoded"] == 1
    np.testing.assert_array_equal(servicer.step_vectors(1)[1], vector(1, 5))


def test_the_hello_names_how_many_collectors_the_target_list_holds(servicer):
    """A tier's list of N collectors: the Hello says N (a tier collector paces for its share,
    world_size / N); rank 1 of 3 prefers entry 1, the live one here."""
    live = LoopbackServer(servicer)
    dead = ["127.0.0.1:9", "127.0.0.1:9"]
    cfg = MonitorConfig(backoff_initial_s=0.05, backoff_max_s=0.2)
    ident = Identity("tiers", 1, 3)
    sender = Sender(",".join([dead[0], live.target, dead[1]]), ident, [(1, specs(2, "a"))], cfg)
    try:
        assert servicer.wait_for(lambda s: s.connections)
        assert servicer.connections[0][0].hello.collectors == 3
    finally:
        sender.close(timeout=1)
        live.stop()


@pytest.mark.parametrize("packed", [False, True])
def test_mean_nonzero_goes_as_mean_to_a_collector_that_lacks_it_and_stays_mean(
    server, servicer, packed
):
    """Schema 1 declares mean_nonzero on its even metrics. A collector whose Welcome says
    takes_mean_nonzero gets it as declared; after a downgrade to one that lacks it (it would
    refuse the schema), the same schemas go again under the same seqs with mean in its place,
    the other ops and every other field as they were; and a collector that takes it again
    gets mean (the re-encoded frame no longer says which it was)."""
    from hooks import schemas

    mixed = [
        MetricSpec(f"a/m{i:03d}", "mean_nonzero" if i % 2 == 0 else "max", "m", layer=i)
        for i in range(5)
    ]
    servicer.takes_packed_schema = packed
    servicer.takes_mean_nonzero = True
    cfg = MonitorConfig(backoff_initial_s=0.05, backoff_max_s=0.2)
    sender = Sender(server.target, IDENT, [(1, mixed), (2, specs(3, "b"))], cfg)
    sender.submit(item(0, 5, 3))
    assert servicer.wait_for(lambda s: s.durable >= 4)
    for n, takes in ((2, False), (3, True)):
        servicer.takes_mean_nonzero = takes
        servicer.drop_current()
        assert servicer.wait_for(lambda s, n=n: len(s.connections) == n)
        sender.submit(item(n))
        assert servicer.wait_for(lambda s, n=n: s.ended_steps(n - 1))

    def declared(conn) -> list[list[str]]:
        out = []
        for f in conn:
            if f.WhichOneof("kind") == "schema":
                s = f.schema
                got = (
                    schemas.columns_of(s).specs()
                    if s.HasField("packed")
                    else [
                        MetricSpec(m.name, schemas._OP_OF[m.reduce], m.stat, m.layer)
                        for m in s.metrics
                    ]
                )
                out.append([m.reduce for m in got])
        return out

    nz = ["mean_nonzero", "max", "mean_nonzero", "max", "mean_nonzero"]
    plain = ["mean", "max", "mean", "max", "mean"]
    first, second, third = (declared(c) for c in servicer.connections)
    assert first == [nz, ["mean"] * 3]
    assert second == third == [plain, ["mean"] * 3]
    assert sender.close(timeout=10)
    assert sender.stats()["schemas_reencoded"] == 1


def test_close_waits_for_a_step_the_worker_is_still_encoding(server, servicer, monkeypatch):
    """The bug (seen at 10 M metrics, where one step is 644 chunks): the worker had popped the
    last step and was encoding it when close() found nothing pending or unacked, said goodbye,
    and the step's frames went after the end of the stream: lost at close."""
    from hooks import frames

    real = frames.step_frames

    def slow(*args, **kwargs):
        time.sleep(0.5)  # a wide step takes this long to encode on a loaded machine
        return real(*args, **kwargs)

    monkeypatch.setattr(frames, "step_frames", slow)
    sender = make_sender(server.target)
    assert servicer.wait_for(lambda s: s.durable == 2)  # the two schemas
    sender.submit(item(0))
    assert wait_until(lambda: not sender.buffer.has_pending())  # popped by the worker
    assert sender.stats()["buffered_steps"] == 1 and "steps_sent" not in sender.stats()  # encoding
    assert sender.close(timeout=10)
    assert sender.stats()["lost_at_close"] == 0
    np.testing.assert_array_equal(servicer.step_vectors(1)[0], vector(0, 5))


def test_the_request_iterator_sends_a_backlog_as_batches():
    """hooks/sender/threaded.py's request iterator: what queued while gRPC wrote the last
    message goes as FrameBatch messages once the Welcome said takes_batches, one by one
    before (or without) it; the end sentinel still ends the stream after the batch."""
    import itertools
    import queue

    import grpc

    from hooks import frames
    from hooks.sender.threaded import _Conn, _requests

    seqs = itertools.count(1)
    sent = [
        f
        for s in range(5)
        for f in frames.step_frames(
            IDENT, frames.StepPayload(s, vector(s, 5), [(1, 5)], 1e9), 4, lambda: next(seqs)
        )
    ]
    counts: dict[str, int] = {}

    def run(takes_batches: bool) -> list:
        conn = _Conn(channel=grpc.insecure_channel("127.0.0.1:1"), out_q=queue.Queue())
        conn.takes_batches = takes_batches
        for f in sent:
            conn.out_q.put(f)
        conn.out_q.put(None)
        out = list(_requests(conn, lambda k, n: counts.__setitem__(k, counts.get(k, 0) + n)))
        conn.channel.close()
        return out

    assert run(False) == sent and counts == {}
    (message,) = run(True)
    assert list(message.batch.frames) == sent and counts == {"batches_sent": 1}


def test_close_says_goodbye_before_the_last_acks_where_the_collector_flushes_at_goodbye(
    server, servicer
):
    """Welcome.flushes_at_goodbye: close() half-closes once everything is sent, and the
    collector's acks at that goodbye (its flush) are what close waits for: here the
    collector acks nothing before the goodbye, so an ack-first close could never finish."""
    servicer.flushes_at_goodbye = servicer.ack_at_goodbye = True
    servicer.acking = False
    sender = make_sender(server.target)
    for step in range(3):
        sender.submit(item(step))
    assert sender.close(timeout=10)
    st = sender.stats()
    assert st["early_goodbyes"] == 1 and st["connects"] == 1
    assert st["buffered_steps"] == 0 and st["lost_at_close"] == 0
    assert servicer.goodbyes == 1
    assert [s for s, _, _ in servicer.ended_steps()] == [0, 1, 2]
    for step in range(3):
        np.testing.assert_array_equal(servicer.step_vectors(1)[step], vector(step, 5))


def test_an_older_collector_gets_its_goodbye_only_after_every_ack(server, servicer):
    """Without flushes_at_goodbye the stream is half-closed only once everything is acked:
    a collector that acks nothing never sees a goodbye, and close reports the loss."""
    servicer.acking = False
    sender = make_sender(server.target)
    sender.submit(item(0))
    assert not sender.close(timeout=1.0)
    assert servicer.goodbyes == 0
    assert sender.stats().get("early_goodbyes", 0) == 0 and sender.stats()["lost_at_close"] == 1


def test_a_stream_that_breaks_after_an_early_goodbye_is_reopened_and_resent(server, servicer):
    """The goodbye went out before the acks and the stream then ended without them (the
    collector crashed before its flush): the client reconnects, resends exactly what was
    unacknowledged, says goodbye again, and close succeeds only with everything acked."""
    servicer.flushes_at_goodbye = servicer.ack_at_goodbye = True
    servicer.acking, servicer.drop_at_goodbye = False, 1
    sender = make_sender(server.target)
    for step in range(2):
        sender.submit(item(step))
    assert sender.close(timeout=10)
    st = sender.stats()
    assert st["early_goodbyes"] == 2 and st["connects"] == 2
    assert st["lost_at_close"] == 0 and st["buffered_steps"] == 0
    first, second = servicer.connections
    assert data_seqs(second) == data_seqs(first)  # the same frames, the same seqs
    assert servicer.durable == max(data_seqs(second))


def test_a_paced_stream_holds_what_comes_within_its_interval_and_close_does_not_wait(
    server, servicer
):
    """Welcome.send_interval_ms (with takes_batches): the first step goes at once; the steps
    submitted within the interval wait for it to end and leave as one FrameBatch; a close
    flushes at once instead of waiting out the next interval."""
    servicer.chunk_ends_step = servicer.takes_batches = True
    servicer.send_interval_ms = 3000
    sender = make_sender(server.target)
    steps_in = lambda s: {header_of(f).step for f in s.frames("chunk")}
    assert sender.submit(item(0))
    assert servicer.wait_for(lambda s: steps_in(s) == {0})
    first_at = servicer.messages[-1][0]
    for step in (1, 2, 3):
        assert sender.submit(item(step))
    time.sleep(0.3)
    assert steps_in(servicer) == {0}  # held: the interval is not over
    assert servicer.wait_for(lambda s: steps_in(s) == {0, 1, 2, 3})
    batch_at, n_frames = servicer.messages[-1]
    assert n_frames == 3  # one message: steps 1-3, a frame each
    assert batch_at - first_at > 2.0  # not before the interval ended (3 s after step 0 left)

    assert sender.submit(item(4))  # within the next interval: only close can send it now
    t0 = time.monotonic()
    assert sender.close(timeout=10)
    assert time.monotonic() - t0 < 2.5  # it did not wait out the 3 s interval
    assert steps_in(servicer) == {0, 1, 2, 3, 4}
    assert sender.stats()["lost_at_close"] == 0
    assert sender.stats()["batches_sent"] == sum(n > 1 for _, n in servicer.messages)
    np.testing.assert_array_equal(servicer.step_vectors(1)[2], vector(2, 5))


def test_an_unpaced_stream_sends_each_step_as_it_comes(server, servicer):
    """send_interval_ms 0 (an older collector, a small run): nothing waits, one message per
    step; the pacing of the test above is the Welcome's doing."""
    servicer.chunk_ends_step = servicer.takes_batches = True
    sender = make_sender(server.target)
    for step in range(3):
        assert sender.submit(item(step))
        assert servicer.wait_for(lambda s, n=step + 1: len(s.frames("chunk")) == n)
    assert sender.close(timeout=10)
    assert [n for _, n in servicer.messages[-2:]] == [1, 1]  # steps 1 and 2, each alone
