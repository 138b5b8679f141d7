"""The node agent's rules on loopback: a real Collector, a real NodeAgent (its own event loop on
a thread, a unix socket), raw rank streams (conftest.RawClient) frame by frame.

The processes-and-outages story (agent killed, collector restarted, upstream cut) is
tests/integration/test_agent.py; this file checks each rule where a wrong implementation
would show at once: one upstream stream for several ranks, acks only from the collector, one
rank's refusal never touching another rank, no rank writing as another, the identity rule,
the clip table once per host, auth, and an old collector refused clearly.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading

import grpc
import numpy as np
import pytest

from collector.agent import AgentConfig, NodeAgent
from collector.process import ROOT, start_collector, stop_collector
from proto.v1 import telemetry_pb2 as pb

from .conftest import mdef
from .test_stream import reduced, wait_for


class AgentThread:
    """A NodeAgent on its own event loop thread (as `python -m collector agent` runs it)."""

    def __init__(self, config: AgentConfig, listen: str) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="agent").start()
        self.agent = NodeAgent(config)
        self.target = self._run(self.agent.start(listen))
        wait_for(lambda: self.agent.up is not None, "the agent's upstream stream")

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self._run(self.agent.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def agent_factory(tmp_path):
    started: list[AgentThread] = []

    def make(upstream: str, name: str = "agent", **config) -> AgentThread:
        config.setdefault("insecure", config.get("local_token") is None)
        a = AgentThread(AgentConfig(upstream=upstream, **config), f"unix:{tmp_path / name}.sock")
        started.append(a)
        return a

    yield make
    for a in started:
        a.stop()


METRICS = [mdef("train/loss", pb.REDUCE_MEAN), mdef("moe/tokens", pb.REDUCE_SUM)]


def test_two_ranks_on_one_upstream_stream_reduce_and_ack_as_direct(
    start_collector, client_factory, agent_factory
):
    collector, addr, store = start_collector()
    agent = agent_factory(addr)
    ranks = [client_factory(agent.target, "mux", r, 2) for r in (0, 1)]
    welcomes = [c.expect("welcome") for c in ranks]
    assert [w.acked_seq for w in welcomes] == [0, 0]
    assert all(w.multiplexed and w.chunk_ends_step for w in welcomes)
    assert all(w.takes_batches for w in welcomes)
    ranks[0].schema(1, METRICS)
    with ranks[1].batched():  # rank 1's backlog in one FrameBatch: unpacked at the agent
        ranks[1].schema(1, METRICS)
        ranks[1].step(0, 1, [1.0, 10.0])
    for step in range(3):
        for c in ranks[: 1 if step == 0 else 2]:
            c.step(step, 1, [float(step + c.rank), 10.0])
    for c in ranks:
        assert c.wait_ack().seq == c.seq == 7  # schema + 3 x (chunk, end): acked by the collector
    assert reduced(store, "mux", 2) == {"train/loss": 2.5, "moe/tokens": 20.0}
    stats = collector.stats()
    assert (stats["streams_opened"], stats["mux_streams_opened"]) == (0, 1)
    for c in ranks:
        assert c.close().code == grpc.StatusCode.OK  # ends after its acks, as direct
    wait_for(lambda: store.runs().filter(run="mux")["status"].to_list() == ["finished"], "finish")


def test_no_ack_before_the_collector_made_it_durable(
    start_collector, client_factory, agent_factory
):
    _, addr, _ = start_collector(flush_interval_s=3600.0, flush_every_steps=2)
    agent = agent_factory(addr)
    c = client_factory(agent.target, "held", 0, 1)
    c.expect("welcome")
    c.schema(1, METRICS)
    c.step(0, 1, [1.0, 2.0])  # one step: the collector flushes every 2, so nothing is durable
    with pytest.raises(TimeoutError):
        c.expect("ack", timeout=1.0)
    c.step(1, 1, [1.0, 2.0])
    assert c.wait_ack().seq == 5


def test_one_ranks_refusal_ends_only_that_rank(start_collector, client_factory, agent_factory):
    _, addr, store = start_collector(straggler_timeout_s=0.2)  # the refused rank's steps
    agent = agent_factory(addr)
    good, bad = (client_factory(agent.target, "iso", r, 2) for r in (0, 1))
    for c in (good, bad):
        c.expect("welcome")
        c.schema(1, METRICS)
    bad.chunk(0, 1, [1.0, 2.0, 3.0], total=2)  # more values than the schema: refused
    end = bad.wait_end()
    assert end.code == grpc.StatusCode.INVALID_ARGUMENT
    good.step(0, 1, [1.0, 2.0])
    assert good.wait_ack().seq == good.seq  # the other rank on the same upstream goes on
    assert agent.agent.counters.snapshot()["upstream_connects"] == 1


def test_a_rank_cannot_write_as_another(start_collector, client_factory, agent_factory):
    _, addr, store = start_collector(straggler_timeout_s=0.2)  # rank 0's steps never come
    agent = agent_factory(addr)
    r0, r1 = (client_factory(agent.target, "spoof", r, 2) for r in (0, 1))
    for c in (r0, r1):
        c.expect("welcome")
        c.schema(1, METRICS)
    r0.send(  # rank 0's stream, rank 1's header
        pb.ClientFrame(
            chunk=pb.StepChunk(
                header=pb.FrameHeader(run="spoof", rank=1, step=0, seq=2),
                schema_id=1,
                offset=0,
                total=2,
                values=np.array([9.0, 9.0], "<f4").tobytes(),
            )
        )
    )
    end = r0.wait_end()
    assert end.code == grpc.StatusCode.INVALID_ARGUMENT and "rank 1" in end.details
    r2 = client_factory(agent.target, "spoof", 0, 2)  # rank 0 again, the spoof inside a batch
    r2.expect("welcome")
    with r2.batched() as held:
        held.append(r0.sent[-1])
    end = r2.wait_end()
    assert end.code == grpc.StatusCode.INVALID_ARGUMENT and "rank 1" in end.details
    r1.step(0, 1, [1.0, 2.0])
    assert r1.wait_ack().seq == r1.seq
    assert store.series("spoof", "train/loss", rank=1)["value"].to_list() == [1.0]


def test_identity_rule_through_the_agent(start_collector, client_factory, agent_factory):
    _, addr, _ = start_collector()
    agent = agent_factory(addr)
    first = client_factory(agent.target, "who", 0, 1, session="s1")
    first.expect("welcome")
    other = client_factory(agent.target, "who", 0, 1, session="s2")
    assert other.wait_end().code == grpc.StatusCode.ALREADY_EXISTS
    again = client_factory(agent.target, "who", 0, 1, session="s1")  # the same client, back
    again.expect("welcome")
    assert first.wait_end().code == grpc.StatusCode.ABORTED
    again.schema(1, METRICS)
    again.step(0, 1, [1.0, 2.0])
    assert again.wait_ack().seq == again.seq


def test_a_clip_table_goes_once_per_host_and_reaches_every_rank(
    start_collector, client_factory, agent_factory
):
    collector, addr, _ = start_collector()
    agent = agent_factory(addr)
    ranks = [client_factory(agent.target, "clip", r, 3) for r in range(3)]
    for c in ranks:
        c.expect("welcome")
        c.schema(1, METRICS)
        c.step(0, 1, [1.0, 2.0])
    version = collector.push_clip("clip", [(1, "routed", 5.0)], reason="test")
    for c in ranks:
        clip = c.expect("clip")
        assert (clip.version, clip.settings[0].limit) == (version, 5.0)
        c.clip_ack(version, step=1)
        assert c.wait_ack().seq == c.seq  # the ClipAck went up and was made durable
    assert collector.stats()["mux_clips_coalesced"] == 2  # one frame on the wire, not three
    assert agent.agent.counters.snapshot()["clips_fanned_out"] == 3
    assert sorted(a.rank for a in collector.clip_acks("clip")) == [0, 1, 2]
    assert {a.step for a in collector.clip_acks("clip")} == {1}


def test_auth_the_agent_needs_the_ranks_token_and_sends_its_own(
    start_collector, client_factory, agent_factory
):
    _, addr, _ = start_collector(token="up-secret")
    denied = agent_factory(addr, "denied")  # no upstream token: ranks are held off, retrying
    assert client_factory(denied.target, "auth", 0, 1).wait_end().code == (
        grpc.StatusCode.UNAVAILABLE
    )
    wait_for(  # the agent says why (gRPC sometimes reports the refusal as INTERNAL)
        lambda: "UNAUTHENTICATED" in denied.agent.last_upstream_error, "the agent's reason"
    )
    agent = agent_factory(addr, token="up-secret", local_token="local-secret")
    assert client_factory(agent.target, "auth", 0, 1).wait_end().code == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    ok = client_factory(agent.target, "auth", 0, 1, token="local-secret")
    ok.expect("welcome")
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(NodeAgent(AgentConfig(upstream=addr, insecure=True)).start("0.0.0.0:0"))


def test_an_old_collector_is_refused_clearly(tmp_path, client_factory, agent_factory):
    """The collector of the commit before the node agent (git archive), a real process."""
    old = tmp_path / "old"
    old.mkdir()
    git = ["git", "-C", str(ROOT)]
    added = subprocess.run(  # the commit that brought Hello.multiplexed
        [*git, "log", "--format=%H", "-S", "bool multiplexed", "--", "proto/v1/telemetry.proto"],
        capture_output=True,
        text=True,
    ).stdout.split()
    if not added:
        pytest.skip("needs the git history")
    archive = subprocess.run([*git, "archive", f"{added[-1]}~1"], capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    env = {"PYTHONPATH": str(old), "PYTHONSAFEPATH": "1"}
    proc, addr = start_collector("memory:", "--insecure", env=env)
    try:
        agent = agent_factory(addr)
        c = client_factory(agent.target, "old", 0, 1)
        end = c.wait_end()
        assert end.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not take a node agent's multiplexed stream" in end.details
    finally:
        stop_collector(proc)


def test_waiting_frames_go_up_as_one_batch_in_order():
    from collector.relay import BATCH_BYTES, Upstream

    async def first_two(batches: bool) -> list[pb.ClientFrame]:
        up = Upstream(max_queued_bytes=1 << 30)
        up.batches = batches
        frames = [
            pb.ClientFrame(chunk=pb.StepChunk(header=pb.FrameHeader(run="b", rank=r, seq=s)))
            for s in (1, 2)
            for r in (0, 1)
        ]
        big = pb.ClientFrame(chunk=pb.StepChunk(values=b"\0" * BATCH_BYTES))
        for f in [*frames, big]:
            up.post(f)
        up.post(None)
        return [f async for f in up.requests()]

    sent = asyncio.run(first_two(True))
    assert [f.WhichOneof("kind") for f in sent] == ["batch", "chunk"]  # the big one alone
    inner = [(f.chunk.header.rank, f.chunk.header.seq) for f in sent[0].batch.frames]
    assert inner == [(0, 1), (1, 1), (0, 2), (1, 2)]
    assert [f.WhichOneof("kind") for f in asyncio.run(first_two(False))] == ["chunk"] * 5


def test_a_full_queue_holds_the_ranks_until_frames_go_up():
    from collector.relay import Upstream

    async def main() -> tuple[bool, bool]:
        up = Upstream(max_queued_bytes=100)
        frame = pb.ClientFrame(chunk=pb.StepChunk(values=b"\0" * 80))
        await up.put(frame)  # 80 of 100 bytes
        await up.put(frame)  # one more still fits: the bound is checked before
        third = asyncio.create_task(up.put(frame))
        await asyncio.sleep(0.05)
        held = not third.done()
        sent = up.requests()
        await sent.__anext__()  # one goes up: below the bound again
        await asyncio.sleep(0.05)
        return held, third.done()

    assert asyncio.run(main()) == (True, True)


def test_the_collector_applies_a_batch_of_two_ranks_frames(start_collector, client_factory):
    """The collector's side alone (mux.py): a raw multiplexed stream, one FrameBatch."""
    collector, addr, store = start_collector()
    mux = client_factory(addr, "batch", 0, 2, hello=False)

    def hello(rank: int) -> pb.ClientFrame:
        h = pb.FrameHeader(run="batch", rank=rank, step=-1, seq=0)
        hello = pb.Hello(header=h, world_size=2, protocol_version=1, multiplexed=True)
        return pb.ClientFrame(hello=hello)

    def data(rank: int) -> list[pb.ClientFrame]:
        h = lambda step, seq: pb.FrameHeader(run="batch", rank=rank, step=step, seq=seq)
        values = np.array([1.0 + rank, 2.0], "<f4").tobytes()
        return [
            pb.ClientFrame(schema=pb.Schema(header=h(-1, 1), schema_id=1, metrics=METRICS)),
            pb.ClientFrame(
                chunk=pb.StepChunk(
                    header=h(0, 2),
                    schema_id=1,
                    total=2,
                    values=values,
                    ends_step=True,
                    step_values=2,
                    wall_time=1.0e9,
                )
            ),
        ]

    mux.send(hello(0))
    mux.send(hello(1))
    mux.send(pb.ClientFrame(batch=pb.FrameBatch(frames=data(0) + data(1))))
    acked: dict[int, int] = {}
    while len(acked) < 2 or min(acked.values()) < 2:
        frame = mux.next()
        if frame.WhichOneof("kind") == "welcome":
            assert frame.welcome.multiplexed and frame.welcome.takes_batches
        if frame.WhichOneof("kind") == "ack":
            assert frame.to.run == "batch"
            acked[frame.to.rank] = frame.ack.seq
    assert reduced(store, "batch", 0) == {"train/loss": 1.5, "moe/tokens": 4.0}
    assert collector.stats()["mux_batches"] == 1
    mux.send(pb.ClientFrame(batch=pb.FrameBatch(frames=[pb.ClientFrame(batch=pb.FrameBatch())])))
    end = mux.wait_end()
    assert end.code == grpc.StatusCode.INVALID_ARGUMENT and "inside a FrameBatch" in end.details


def agent_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os
    import sys

    environ = {k: v for k, v in os.environ.items() if not k.startswith("STEPWATCH_")}
    return subprocess.run(
        [sys.executable, "-m", "collector", "agent", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**environ, **(env or {})},
    )


def test_cli_refuses_insecure_off_loopback_and_no_token():
    out = agent_cli("--upstream", "127.0.0.1:1", "--listen", "0.0.0.0:0", "--insecure")
    assert out.returncode == 2 and "unix socket or loopback only" in out.stderr
    out = agent_cli("--upstream", "127.0.0.1:1", "--listen", "127.0.0.1:0")
    assert out.returncode == 2 and "needs its ranks' token" in out.stderr


def test_cli_token_from_the_environment_guards_both_sides(
    tmp_path, start_collector, client_factory
):
    from collector.process import start_agent

    _, addr, _ = start_collector(token="shared-secret")
    listen = f"unix:{tmp_path / 'cli.sock'}"
    proc, target = start_agent(addr, listen, env={"STEPWATCH_TOKEN": "shared-secret"})
    try:
        assert target == listen
        no_token = client_factory(target, "cli", 0, 1)
        assert no_token.wait_end().code == grpc.StatusCode.UNAUTHENTICATED
        ok = client_factory(target, "cli", 0, 1, token="shared-secret")
        assert ok.expect("welcome").multiplexed  # through the agent, which sent its token up
    finally:
        assert stop_collector(proc) == 0


def test_a_live_agents_socket_is_not_taken_over(tmp_path, start_collector, agent_factory):
    _, addr, _ = start_collector()
    agent_factory(addr, "taken")
    second = NodeAgent(AgentConfig(upstream=addr, insecure=True))
    with pytest.raises(OSError, match="another process listens"):
        asyncio.run(second.start(f"unix:{tmp_path / 'taken'}.sock"))


def test_a_ranks_own_stream_refuses_the_multiplexed_kinds(start_collector, client_factory):
    """Goodbye is a node agent's; a FrameBatch a rank may send too (tests/collector/
    test_batches.py)."""
    _, addr, _ = start_collector()
    c = client_factory(addr, "own", 0, 1)
    c.expect("welcome")
    c.send(pb.ClientFrame(goodbye=pb.Goodbye(header=pb.FrameHeader(run="own", rank=0))))
    end = c.wait_end()
    assert end.code == grpc.StatusCode.INVALID_ARGUMENT and "multiplexed" in end.details


def test_a_stopping_collector_ends_the_agents_stream_itself(start_collector, agent_factory):
    """Not by cancelling it after stop_grace_s: it says UNAVAILABLE, with or without ranks."""
    collector, addr, _ = start_collector(stop_grace_s=30.0)
    agent = agent_factory(addr)
    collector.stop()
    wait_for(lambda: "shutting down" in agent.agent.last_upstream_error, "the agent's reason")
    assert agent.agent.last_upstream_error.startswith("UNAVAILABLE")


def test_a_goodbye_forgets_a_ranks_part_even_after_its_end(start_collector):
    """mux.py on the collector's own loop: a refused rank's part ends (one tagged Error), and
    the agent's Goodbye then frees it; nothing of the rank stays on the stream."""
    from collector.mux import MuxStream

    collector, _, _ = start_collector()

    async def steps():
        mux = MuxStream(collector.ingest, collector.counters, "test")
        h = pb.FrameHeader(run="gone", rank=0, step=-1, seq=0)
        hello = pb.Hello(header=h, world_size=1, protocol_version=1, multiplexed=True)
        mux.receive(pb.ClientFrame(hello=hello))
        bad = pb.FrameHeader(run="gone", rank=0, step=0, seq=1)
        mux.receive(pb.ClientFrame(chunk=pb.StepChunk(header=bad, schema_id=9)))  # unknown
        errors = [f.to.rank for f in mux.take() if f.WhichOneof("kind") == "error"]
        held = (dict(mux.subs), set(mux.closed))
        mux.receive(pb.ClientFrame(goodbye=pb.Goodbye(header=h, half_closed=False)))
        return errors, held, (dict(mux.subs), set(mux.closed))

    errors, held, after = asyncio.run_coroutine_threadsafe(steps(), collector._loop).result(10)
    assert errors == [0] and len(held[0]) == 1 and held[1] == {("gone", 0)}
    assert after == ({}, set())


@pytest.mark.skipif(__import__("shutil").which("openssl") is None, reason="needs the openssl CLI")
def test_tls_on_the_local_listener(tmp_path, start_collector, client_factory):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"]
        + ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    _, addr, _ = start_collector()
    config = AgentConfig(upstream=addr, local_token="t", tls=(cert.read_bytes(), key.read_bytes()))
    agent = AgentThread(config, "127.0.0.1:0")
    try:
        port = agent.target.rsplit(":", 1)[1]
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        ok = client_factory(f"localhost:{port}", "tls", 0, 1, token="t", credentials=creds)
        assert ok.expect("welcome").multiplexed
        plain = client_factory(f"127.0.0.1:{port}", "tls", 0, 1, token="t")  # no TLS: refused
        assert plain.wait_end().code == grpc.StatusCode.UNAVAILABLE
    finally:
        agent.stop()
