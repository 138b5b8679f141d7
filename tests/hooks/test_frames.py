"""Step encoding with and without the end of step folded into the last chunk, the split back
for an older collector, and the buffer's step accounting over both forms."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from hooks import frames, schemas
from hooks.buffer import StepBuffer, StepItem
from proto.v1 import telemetry_pb2 as pb

IDENT = frames.Identity("frametest", 3, 4)


def payload(step: int, n1: int = 5, n2: int = 0) -> frames.StepPayload:
    values = np.arange(n1 + n2, dtype=np.float32) + 100 * step
    schemas = [(1, n1)] + ([(2, n2)] if n2 else [])
    return frames.StepPayload(step, values, schemas, wall_time=1e9 + step)


def encode(
    p: frames.StepPayload, fold: bool, first_seq: int = 1, chunk_values: int = 4
) -> list[pb.ClientFrame]:
    seqs = itertools.count(first_seq)
    return frames.step_frames(IDENT, p, chunk_values, lambda: next(seqs), chunk_ends_step=fold)


def values_of(fs: list[pb.ClientFrame]) -> np.ndarray:
    """The step's packed vector back from its chunks (schemas in wire order)."""
    chunks = [f.chunk for f in fs if f.WhichOneof("kind") == "chunk"]
    return np.concatenate([np.frombuffer(c.values, dtype="<f4") for c in chunks])  # little-endian


def kinds(fs: list[pb.ClientFrame]) -> list[str]:
    return [f.WhichOneof("kind") for f in fs]


def test_folded_step_is_the_same_chunks_with_the_end_on_the_last():
    p = payload(7, 6, 3)  # chunks: schema 1 [0,4) [4,6), schema 2 [0,3)
    plain, folded = encode(p, False), encode(p, True)
    assert kinds(plain) == ["chunk"] * 3 + ["end_of_step"]
    assert kinds(folded) == ["chunk"] * 3
    assert [frames.seq_of(f) for f in folded] == [1, 2, 3]  # one seq less per step
    for a, b in zip(plain[:2], folded[:2]):
        assert a == b and not b.chunk.ends_step  # only the last one changes
    last = folded[-1].chunk
    assert (last.schema_id, last.offset, last.total) == (2, 0, 3)
    assert last.ends_step and last.step_values == 9 and last.wall_time == 1e9 + 7
    np.testing.assert_array_equal(values_of(folded), p.values)
    np.testing.assert_array_equal(values_of(plain), p.values)
    assert plain[-1].end_of_step.n_values == 9
    assert [frames.ends_step(f) for f in folded] == [False, False, True]
    assert [frames.ends_step(f) for f in plain] == [False, False, False, True]


def test_a_step_without_values_still_ends_with_endofstep():
    p = frames.StepPayload(4, np.zeros(0, np.float32), [], wall_time=5.0)
    (only,) = encode(p, True)
    assert only.WhichOneof("kind") == "end_of_step"
    assert (only.end_of_step.n_values, only.end_of_step.wall_time) == (0, 5.0)


def test_split_rewrites_folded_frames_for_an_older_collector():
    sent = encode(payload(1, 6), True, first_seq=10)  # seqs 10, 11
    sent += [frames.clip_ack(IDENT, step=2, version=3, seq=12)]
    sent += encode(payload(2, 3), True, first_seq=13)  # seq 13
    before = [f.SerializeToString() for f in sent]
    out = frames.split_ends_step(sent)
    assert kinds(out) == ["chunk", "chunk", "end_of_step", "clip_ack", "chunk", "end_of_step"]
    assert [frames.seq_of(f) for f in out] == list(range(10, 16))  # one seq per frame again
    assert [f.SerializeToString() for f in sent] == before  # the sent ones untouched
    assert not any(frames.folds_end(f) for f in out)
    ends = [f.end_of_step for f in out if f.WhichOneof("kind") == "end_of_step"]
    assert [(e.header.step, e.n_values, e.wall_time) for e in ends] == [
        (1, 6, 1e9 + 1),
        (2, 3, 1e9 + 2),
    ]
    assert all((e.header.run, e.header.rank) == ("frametest", 3) for e in ends)
    # what an older collector gets is exactly what the plain encoding gives, renumbered
    plain = encode(payload(1, 6), False, first_seq=10)
    assert out[:3] == plain
    np.testing.assert_array_equal(values_of(out[4:]), payload(2, 3).values)


def test_buffer_counts_a_folded_step_until_its_last_chunk_is_acked():
    buf = StepBuffer(capacity=4, policy="drop_oldest", block_timeout_s=0.1)
    buf.record_sent(encode(payload(0, 6), True, first_seq=1), is_step=True)  # seqs 1, 2
    buf.record_sent(encode(payload(1, 6), False, first_seq=3), is_step=True)  # seqs 3, 4, 5
    assert buf.buffered() == 2
    buf.ack(1)
    assert buf.buffered() == 2  # step 0's end is in seq 2
    buf.ack(2)
    assert buf.buffered() == 1
    buf.ack(5)
    assert buf.buffered() == 0 and buf.drained()


def test_drop_oldest_never_drops_a_frame_in_flight():
    """Sent frames are owed to the collector (it refuses a seq gap): with every buffered step
    in flight, the new step is the one dropped, and it is remembered as a hole."""
    buf = StepBuffer(capacity=2, policy="drop_oldest", block_timeout_s=0.1)
    buf.record_sent(encode(payload(0, 6), True, first_seq=1), is_step=True)  # seqs 1, 2
    buf.record_sent(encode(payload(1, 6), True, first_seq=3), is_step=True)  # seqs 3, 4
    for step in (2, 3):
        assert buf.submit(StepItem(step, None, [], 0.0)) is False
    assert [frames.seq_of(f) for f in buf.unacked_frames()] == [1, 2, 3, 4]
    assert buf.counters["dropped_newest"] == 2 and buf.buffered() == 2
    assert buf.drops.take() == [(2, 3)] and buf.drops.total == 2


# ---------------------------------------------------------------- schemas cut by encoded bytes
def _specs_of_every_shape() -> list:
    from hooks.layout import MetricSpec

    return [
        MetricSpec("a", "sum", "s"),
        MetricSpec("moe/layer07/expert013/act_rms", "mean", "act_rms", 7, 13),
        MetricSpec("x" * 512, "max", "y" * 40, layer=-1, expert=-1, head=-1, unit="tokens/s"),
        MetricSpec("ünïcødé/名前", "min", "ß", layer=0, expert=200, head=20_000, unit="µs"),
        MetricSpec("big", "sum", "", layer=2**31 - 1, expert=128, head=16_384),
    ]


def test_def_sizes_are_exactly_the_encoded_sizes():
    specs = _specs_of_every_shape() * 3
    sizes = schemas.def_sizes(specs)
    for spec, size in zip(specs, sizes):
        assert schemas.schema(IDENT, 1, 1, [spec]).schema.ByteSize() - _empty_schema() == size
    whole = schemas.schema(IDENT, 1, 1, specs).schema.ByteSize()
    assert whole - _empty_schema() == int(sizes.sum())
    for spec in specs:  # alone: columns whose largest value has few bits (the varint's
        [alone] = schemas.def_sizes([spec])  # early end) are sized exactly too
        assert schemas.schema(IDENT, 1, 1, [spec]).schema.ByteSize() - _empty_schema() == alone


def _empty_schema(schema_id: int = 1, ident: frames.Identity = IDENT, seq: int = 1) -> int:
    """Bytes of the same Schema without defs: header and schema_id."""
    return schemas.schema(ident, seq, schema_id, []).schema.ByteSize()


def test_parts_fit_the_budget_and_keep_order(monkeypatch):
    from hooks.layout import MetricSpec

    monkeypatch.setattr(schemas, "SCHEMA_PART_BYTES", 3_000)
    specs = [MetricSpec(f"m/{'n' * (i % 60)}/{i}", "mean", "m", layer=i % 5) for i in range(900)]
    wire = schemas.wire_schemas([(1, specs), (2, specs[:10])])
    parts1 = [p for p in wire if p[0] == 1 or p[0] >> 16 == 1]
    assert len(parts1) > 10 and [p[0] for p in parts1][:3] == [1, (1 << 16) | 1, (1 << 16) | 2]
    assert [s for _, part in parts1 for s in part] == specs  # cut, never reordered
    for pid, part in parts1:
        defs = schemas.schema(IDENT, 1, pid, part).schema.ByteSize() - _empty_schema(pid)
        assert defs <= 3_000  # greedy: the next def would not have fitted
        packed = schemas.schema(IDENT, 1, pid, part, packed=True).schema.ByteSize()
        assert packed - _empty_schema(pid) <= 3_000  # either form fits
    layout = schemas.wire_layout([(1, 900), (2, 10), (7, 3)], schemas.part_layouts(wire))
    assert layout[: len(parts1)] == [(pid, len(part)) for pid, part in parts1]
    assert layout[len(parts1) :] == [(2, 10), (7, 3)]  # unknown schema: one part


def test_the_default_budget_stays_under_the_message_limit():
    """A part of the longest names allowed, with the largest header, under 1 MiB."""
    from hooks.layout import MetricSpec

    specs = [MetricSpec(f"{i:06d}" + "n" * 506, "mean", "s" * 64, -1, -1, -1, "u" * 32)
             for i in range(2_500)]  # fmt: skip
    (pid, part), *_ = schemas.wire_schemas([(1, specs)])
    ident = frames.Identity("r" * 128, 65_535, 65_536)
    frame = schemas.schema(ident, 2**63, pid, part)
    defs = frame.schema.ByteSize() - _empty_schema(pid, ident, 2**63)
    # the budget keeps room for the packed form's tables (two strings) and field headers
    assert 1_000_000 - 1_000 < defs <= 1_000_000
    assert frame.ByteSize() < (1 << 20)
    packed = schemas.schema(ident, 2**63, pid, part, packed=True)
    assert packed.schema.packed.count == len(part) and packed.ByteSize() < (1 << 20)


def test_packed_form_carries_exactly_the_metric_defs():
    """PackedMetrics decoded back (schemas.columns_of) are the specs, in order, every label
    and unicode name included; converting a sent frame between forms keeps header and defs."""
    specs = _specs_of_every_shape() * 2
    specs = [dataclasses.replace(s, name=f"{s.name}/{i}") for i, s in enumerate(specs)]
    frame = schemas.schema(IDENT, 7, 3, specs, packed=True)
    assert not frame.schema.metrics and frame.schema.packed.count == len(specs)
    assert schemas.columns_of(frame.schema).specs() == specs
    defs = schemas.schema_form(frame, packed=False)
    assert defs.schema.header == frame.schema.header and defs.schema.schema_id == 3
    assert defs.schema == schemas.schema(IDENT, 7, 3, specs).schema
    assert schemas.schema_form(defs, packed=True) == frame
    assert list(schemas.SpecColumns.of(specs)[2:5]) == specs[2:5]


def test_batched_keeps_order_and_each_message_under_the_limit():
    """Three 400 KB chunks and small frames: two messages of at most 1 MiB, the frames in
    order; a frame alone goes as itself; the estimate is never below the encoded size; at
    most BATCH_FRAMES frames a message."""
    seqs = itertools.count(1)
    big = [encode(payload(s, n1=100_000), True, next(seqs), 100_000)[0] for s in range(3)]
    small = encode(payload(3), False, next(seqs))
    sent = [big[0], *small, big[1], big[2]]
    out = frames.batched(sent)
    assert all(m.ByteSize() <= frames.BATCH_BYTES for m in out)
    assert [m.WhichOneof("kind") for m in out] == ["batch", "chunk"]  # the third chunk alone
    assert out[1] == big[2]
    flat = [*out[0].batch.frames, out[1]]
    assert [frames.seq_of(f) for f in flat] == [frames.seq_of(f) for f in sent]
    assert all(frames.wire_size(f) >= len(f.SerializeToString()) + 5 for f in sent)
    assert frames.batched(big[:1]) == big[:1]  # alone: the frame itself
    many = [f for s in range(300) for f in encode(payload(s, n1=1), True, s + 1)]
    assert [len(m.batch.frames) for m in frames.batched(many)] == [frames.BATCH_FRAMES, 44]
