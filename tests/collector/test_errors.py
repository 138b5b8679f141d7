"""Bad input gets its gRPC status, the server keeps serving, other clients' data stays intact;
token authentication on the stream."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from proto.v1 import telemetry_pb2 as pb

from .conftest import RawClient, mdef

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


def _schema_then(c: RawClient, then, n: int = 2) -> None:
    c.schema(1, [mdef(f"m{i}") for i in range(n)])
    then(c)


CASES = {
    # name: (client kwargs, what the client sends, expected code, message fragment)
    "hello missing": (
        dict(hello=False),
        lambda c: c.schema(1, [mdef("x")]),
        INVALID,
        "first frame of a stream must be Hello",
    ),
    "bad run name": (dict(run="no spaces allowed"), None, INVALID, "run name"),
    "rank >= world_size": (dict(rank=2), None, INVALID, "outside [0, world_size=2)"),
    "protocol version": (dict(protocol_version=7), None, INVALID, "protocol_version 7"),
    "world size changed": (dict(run="good", world_size=3), None, INVALID, "world_size 1"),
    "unknown schema id": ({}, lambda c: c.chunk(0, 99, [1.0]), INVALID, "unknown schema_id 99"),
    "chunk outside the schema": (
        {},
        lambda c: _schema_then(c, lambda c: c.chunk(0, 1, [1.0, 2.0], offset=1, total=2)),
        INVALID,
        "outside schema 1",
    ),
    "total differs from schema": (
        {},
        lambda c: _schema_then(c, lambda c: c.chunk(0, 1, [1.0], total=5)),
        INVALID,
        "total 5",
    ),
    "bytes not a multiple of 4": (
        {},
        lambda c: _schema_then(c, lambda c: c.chunk(0, 1, None, raw=b"\0" * 6, total=2)),
        INVALID,
        "not a multiple of 4",
    ),
    "reduce op unspecified": (
        {},
        lambda c: c.schema(1, [mdef("x", pb.REDUCE_UNSPECIFIED)]),
        INVALID,
        "declare sum, mean, max, min or mean_nonzero",
    ),
    "reduce op beyond the known ones": (
        {},
        lambda c: c.schema(1, [mdef("x", pb.REDUCE_MEAN_NONZERO + 1)]),
        INVALID,
        "reduce op 6: declare",
    ),
    "metric redeclared with another op": (
        dict(run="shared", rank=1),
        lambda c: c.schema(1, [mdef("shared/m", pb.REDUCE_MAX)]),
        INVALID,
        "conflicts",
    ),
    "header of another rank": (
        {},
        lambda c: c.send(
            pb.ClientFrame(
                end_of_step=pb.EndOfStep(header=pb.FrameHeader(run="bad", rank=1, step=0, seq=1))
            )
        ),
        INVALID,
        "said Hello as run 'bad' rank 0",
    ),
    "seq 0": (
        {},
        lambda c: c.send(
            pb.ClientFrame(
                end_of_step=pb.EndOfStep(header=pb.FrameHeader(run="bad", rank=0, step=0, seq=0))
            )
        ),
        INVALID,
        "seq 0",
    ),
    "negative step": ({}, lambda c: c.end_of_step(-1, 0), INVALID, "step must be >= 0"),
    "n_values mismatch": (
        {},
        lambda c: _schema_then(c, lambda c: (c.chunk(0, 1, [1.0], total=2), c.end_of_step(0, 2))),
        INVALID,
        "counts 2 values",
    ),
    "step_values mismatch in a chunk ending the step": (
        {},
        lambda c: _schema_then(c, lambda c: c.chunk(0, 1, [1.0], total=2, ends_step=2)),
        INVALID,
        "StepChunk ending step 0 of rank 0 counts 2 values but 1 arrived",
    ),
    "non-finite wall_time in a chunk ending the step": (
        {},
        lambda c: _schema_then(
            c, lambda c: c.chunk(0, 1, [1.0, 2.0], ends_step=2, wall_time=float("inf"))
        ),
        INVALID,
        "wall_time inf",
    ),
    "clip ack of unknown version": ({}, lambda c: c.clip_ack(3, 0), INVALID, "version 3"),
    "chunk over 1 MiB": (
        {},
        lambda c: _schema_then(
            c, lambda c: c.chunk(0, 1, None, raw=b"\0" * ((1 << 20) + 4), total=8), n=8
        ),
        INVALID,
        "at most 1048576",
    ),
    "message over the gRPC limit": (
        {},
        lambda c: c.chunk(0, 1, None, raw=b"\0" * (2 << 20)),
        EXHAUSTED,
        "",
    ),
    "too far ahead": (
        {},
        lambda c: [c.end_of_step(s, 0) for s in range(5)],
        EXHAUSTED,
        "too far ahead at step 4",
    ),
    "too many pending bytes": (
        {},
        lambda c: _schema_then(c, lambda c: c.chunk(0, 1, [1.0], total=1000), n=1000),
        EXHAUSTED,
        "max_pending_bytes",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_its_status_and_others_are_unharmed(case, start_collector, client_factory):
    kwargs, send, code, fragment = CASES[case]
    collector, addr, store = start_collector(max_pending_steps=4, max_pending_bytes=4000)
    good = client_factory(addr, "good", 0, 1)
    good.expect("welcome")  # run "good" exists, world 1
    good.schema(1, [mdef("loss", pb.REDUCE_MEAN), mdef("tokens", pb.REDUCE_SUM)])
    good.step(0, 1, [1.5, 100])
    other = client_factory(addr, "shared", 0, 2)  # owns "shared/m" (sum)
    other.schema(1, [mdef("shared/m", pb.REDUCE_SUM)])
    other.wait_ack()

    args = dict(run="bad", rank=0, world_size=2)
    args.update(kwargs)
    bad = client_factory(addr, args.pop("run"), args.pop("rank"), args.pop("world_size"), **args)
    if send is not None:
        send(bad)
    end = bad.wait_end()
    assert end.code == code, end
    assert fragment in end.details

    good.step(1, 1, [2.5, 200])  # the server still serves
    good.wait_ack()
    assert store.series("good", "loss")["value"].to_list() == [1.5, 2.5]
    assert store.series("good", "tokens")["value"].to_list() == [100, 200]
    # gRPC itself refuses an oversized message before it reaches the collector's code
    assert collector.stats()["frames_rejected"] == (1 if fragment else 0)


def test_undecodable_bytes_are_invalid_argument(start_collector, client_factory):
    collector, addr, store = start_collector()
    channel = grpc.insecure_channel(addr)
    raw = channel.stream_stream("/stepwatch.v1.Telemetry/Stream")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as err:
        list(raw(iter([b"\xff\xff\xff\xff not a ClientFrame"])))
    channel.close()
    assert err.value.code() == INVALID and "undecodable frame" in err.value.details()
    good = client_factory(addr, "good", 0, 1)
    good.schema(1, [mdef("x")])
    good.step(0, 1, [1.0])
    good.wait_ack()
    assert store.series("good", "x")["value"].to_list() == [1.0]
    assert collector.stats()["frames_rejected"] == 1


def test_error_frame_precedes_the_status(start_collector, client_factory):
    _, addr, _ = start_collector()
    bad = client_factory(addr, "bad", 0, 1)
    assert bad.expect("welcome").acked_seq == 0
    bad.chunk(0, 42, [1.0])
    err = bad.expect("error")
    assert err.code == "INVALID_ARGUMENT" and "unknown schema_id 42" in err.message
    assert bad.wait_end().code == INVALID


@pytest.mark.parametrize("token,ok", [(None, False), ("wrong", False), ("s3cret", True)])
def test_token_auth_on_the_stream(token, ok, start_collector, client_factory):
    collector, addr, store = start_collector(token="s3cret")
    c = client_factory(addr, "authrun", 0, 1, token=token)
    if not ok:
        end = c.wait_end()
        assert end.code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in end.details
        assert collector.stats()["auth_failures"] == 1 and collector.stats()["frames"] == 0
        return
    c.schema(1, [mdef("x")])
    c.step(0, 1, np.array([3.0]))
    c.wait_ack()
    assert store.series("authrun", "x")["value"].to_list() == [3.0]
