"""registry.py and acks.py: metric identity by name across ranks, schema conflicts, identical
schemas registered once per run, Hello checks, and cumulative ack bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from collector.acks import RankAcks
from collector.errors import InvalidArgument, ResourceExhausted
from collector.registry import RunMetrics, check_hello
from proto.v1 import telemetry_pb2 as pb
from store.base import MetricDict


def reg(**kw) -> RunMetrics:
    return RunMetrics(
        "run",
        max_metrics=kw.get("max_metrics", 1000),
        max_schemas_per_rank=kw.get("max_schemas", 8),
    )


def register(r: RunMetrics, rank: int, schema_id: int, metrics) -> MetricDict | None:
    """A list of defs registered as a bare Schema message (no header)."""
    return r.register_schema(rank, pb.Schema(schema_id=schema_id, metrics=metrics))


def m(name, reduce=pb.REDUCE_SUM, **labels) -> pb.MetricDef:
    base = dict(layer=-1, expert=-1, head=-1, stat="x", unit="")
    base.update(labels)
    return pb.MetricDef(name=name, reduce=reduce, **base)


def test_same_name_same_id_across_ranks_and_dictionary_rows_once():
    r = reg()
    rows0 = register(r, 0, 1, [m("a"), m("b", pb.REDUCE_MAX, layer=3)])
    rows1 = register(r, 1, 5, [m("c", pb.REDUCE_MIN), m("b", pb.REDUCE_MAX, layer=3), m("a")])
    np.testing.assert_array_equal(r.schema(0, 1), [0, 1])
    np.testing.assert_array_equal(r.schema(1, 5), [2, 1, 0])
    assert list(rows0.name) == ["a", "b"] and list(rows0.reduce) == ["sum", "max"]
    assert list(rows1.name) == ["c"] and rows1.metric_id.tolist() == [2]
    assert r.ops.tolist() == [1, 3, 4]
    assert register(r, 0, 1, [m("a"), m("b", pb.REDUCE_MAX, layer=3)]) is None  # resend


@pytest.mark.parametrize(
    "change",
    [
        dict(reduce=pb.REDUCE_MEAN),
        dict(layer=4),
        dict(unit="s"),
        dict(stat="y"),
        dict(expert=2),
        dict(head=1),
    ],
)
def test_a_name_with_other_labels_or_op_is_rejected_and_changes_nothing(change):
    r = reg()
    register(r, 0, 1, [m("a", pb.REDUCE_SUM, layer=3)])
    kw = dict(reduce=pb.REDUCE_SUM, layer=3)
    kw.update(change)
    with pytest.raises(InvalidArgument, match="conflicts"):
        register(r, 1, 1, [m("new"), m("a", **kw)])
    assert "new" not in r.ids and not r.has_schema(1, 1)


@pytest.mark.parametrize(
    "metrics,match",
    [
        ([m("a", pb.REDUCE_UNSPECIFIED)], "reduce op"),
        ([m("a"), m("a")], "twice"),
        ([], "no metrics"),
        ([m("")], "name"),
        ([m("a", layer=-2)], ">= -1"),
    ],
)
def test_bad_schemas(metrics, match):
    with pytest.raises(InvalidArgument, match=match):
        register(reg(), 0, 1, metrics)


def test_schema_id_reuse_with_other_metrics_and_metric_in_two_schemas_of_a_rank():
    r = reg()
    register(r, 0, 1, [m("a")])
    with pytest.raises(InvalidArgument, match="unique per"):
        register(r, 0, 1, [m("b")])
    with pytest.raises(InvalidArgument, match="already in another schema"):
        register(r, 0, 2, [m("b"), m("a")])
    with pytest.raises(InvalidArgument, match="unknown schema_id 9"):
        r.schema(0, 9)


def test_bounds():
    r = reg(max_metrics=3, max_schemas=2)
    register(r, 0, 1, [m("a"), m("b")])
    with pytest.raises(ResourceExhausted, match="max_metrics_per_run"):
        register(r, 0, 2, [m("c"), m("d")])
    register(r, 0, 2, [m("c")])
    with pytest.raises(ResourceExhausted, match="max_schemas_per_rank"):
        register(r, 0, 3, [m("a")])


def msg(rank, schema_id, metrics, seq=1) -> pb.Schema:
    return pb.Schema(
        header=pb.FrameHeader(run="run", rank=rank, seq=seq), schema_id=schema_id, metrics=metrics
    )


# a bare message of the defs (register), and the message as it arrives (register_schema): the same
# registry behind both, so every cache test runs through each.
VIA = {
    "list": lambda r, rank, sid, ms, seq=1: register(r, rank, sid, ms),
    "message": lambda r, rank, sid, ms, seq=1: r.register_schema(rank, msg(rank, sid, ms, seq)),
}


@pytest.mark.parametrize("via", VIA)
def test_identical_defs_on_other_ranks_reuse_the_id_array_and_create_no_rows(via):
    r, call = reg(), VIA[via]
    defs = [m("a"), m("b", pb.REDUCE_MAX, layer=3)]
    assert list(call(r, 0, 1, defs).name) == ["a", "b"]
    assert call(r, 1, 7, [m("a"), m("b", pb.REDUCE_MAX, layer=3)]) is None  # other rank, id
    assert r.schema(1, 7) is r.schema(0, 1)
    np.testing.assert_array_equal(r.schema(1, 7), [0, 1])
    assert call(r, 2, 1, defs[::-1]) is None  # other order: other layout
    np.testing.assert_array_equal(r.schema(2, 1), [1, 0])
    assert call(r, 3, 1, defs, seq=9) is None and r.schema(3, 1) is r.schema(0, 1)
    assert r.ops.tolist() == [1, 3] and len(r.ids) == 2


def test_a_list_and_a_message_with_the_same_defs_share_the_array():
    r = reg()
    register(r, 0, 1, [m("a"), m("b")])
    assert r.register_schema(1, msg(1, 4, [m("a"), m("b")])) is None
    assert r.schema(1, 4) is r.schema(0, 1)


@pytest.mark.parametrize("via", VIA)
def test_resend_ignores_the_header_and_other_defs_under_a_used_id_are_rejected(via):
    r, call = reg(), VIA[via]
    call(r, 0, 1, [m("a"), m("b")])
    assert call(r, 0, 1, [m("a"), m("b")], seq=5) is None  # reconnect: new seq
    with pytest.raises(InvalidArgument, match="unique per"):
        call(r, 0, 1, [m("b"), m("a")])
    with pytest.raises(InvalidArgument, match="unique per"):
        call(r, 0, 1, [m("a"), m("b", unit="s")])


@pytest.mark.parametrize("via", VIA)
def test_a_known_layout_still_gets_the_per_rank_checks(via):
    r, call = reg(max_schemas=2), VIA[via]
    call(r, 0, 1, [m("a"), m("b")])
    call(r, 0, 2, [m("c")])
    call(r, 1, 1, [m("c")])  # known layouts, rank 1
    with pytest.raises(InvalidArgument, match="'c' is already in another schema of rank 1"):
        call(r, 1, 2, [m("c")])
    call(r, 1, 2, [m("a"), m("b")])
    with pytest.raises(ResourceExhausted, match="max_schemas_per_rank"):
        call(r, 1, 3, [m("a"), m("b")])
    assert not r.has_schema(1, 3) and r.schema(1, 2) is r.schema(0, 1)


@pytest.mark.parametrize("via", VIA)
def test_a_rejected_schema_leaves_no_names_and_no_layout_behind(via):
    r, call = reg(), VIA[via]
    call(r, 0, 1, [m("a")])
    with pytest.raises(InvalidArgument, match="already in another schema"):
        call(r, 0, 2, [m("c"), m("a")])  # c resolved, then the clash
    assert "c" not in r.ids and r.ops.tolist() == [1]
    rows = call(r, 1, 1, [m("c"), m("a")])  # the same defs are fine here
    assert list(rows.name) == ["c"] and rows.metric_id.tolist() == [1]
    np.testing.assert_array_equal(r.schema(1, 1), [1, 0])
    with pytest.raises(InvalidArgument, match="conflicts"):
        call(r, 2, 1, [m("a", pb.REDUCE_MAX)])
    with pytest.raises(InvalidArgument, match="conflicts"):  # not cached by the failure
        call(r, 3, 1, [m("a", pb.REDUCE_MAX)])


@pytest.mark.parametrize(
    "metrics,match",
    [
        ([m("a"), m("b", layer=-2), m("c", pb.REDUCE_UNSPECIFIED)], "'b': layer/expert/head"),
        (
            [m("a"), m("b", pb.REDUCE_UNSPECIFIED), m("", layer=-2)],
            r"metric 1 \('b'\).*reduce op 0",
        ),
        ([m("a"), m("b", head=-5, reduce=7)], r"metric 1 \('b'\).*reduce op 7"),
        ([m("a"), m("x" * 513)], "metric 1 of schema 1: name must have 1..512"),
        ([m("b"), m("c"), m("a"), m("a"), m("c")], "'c' appears twice"),
    ],
)
def test_bad_schemas_name_the_first_bad_def(metrics, match):
    for call in VIA.values():
        r = reg()
        with pytest.raises(InvalidArgument, match=match):
            call(r, 0, 1, metrics)
        assert not r.ids and not r.has_schema(0, 1)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(run="bad name"), "run name"),
        (dict(run=""), "run name"),
        (dict(rank=2), "outside"),
        (dict(rank=-1), "outside"),
        (dict(world_size=0), "world_size"),
        (dict(protocol_version=0), "protocol_version"),
    ],
)
def test_hello_checks(kw, match):
    args = dict(run="ok-run_1.x", rank=0, world_size=2, protocol_version=1)
    args.update(kw)
    h = pb.Hello(
        header=pb.FrameHeader(run=args["run"], rank=args["rank"]),
        world_size=args["world_size"],
        protocol_version=args["protocol_version"],
    )
    with pytest.raises(InvalidArgument, match=match):
        check_hello(h, max_world_size=1024)


def test_acks_are_cumulative_and_wait_for_the_lowest_pending_seq():
    a = RankAcks()
    a.in_job(1, job=1)  # schema -> metrics write
    a.in_step(2, step=0)
    a.in_step(3, step=0)
    a.in_step(4, step=1)
    assert not a.advance() and a.acked == 0
    assert a.flushed(1, set()) and a.acked == 1  # only the schema is durable
    a.step_submitted(0, job=2)
    assert not a.flushed(1, set())  # job 2 not flushed yet
    assert a.flushed(2, set()) and a.acked == 3 and a.durable_step == 0
    a.received(5)  # e.g. a ClipAck: needs no write
    assert not a.advance()  # step 1 (seq 4) still pending
    a.step_submitted(1, job=3)
    assert a.flushed(3, set()) and a.acked == 5 and a.settled
    assert a.is_duplicate(5) and not a.is_duplicate(6)


class RecomputedAcks(RankAcks):
    """The definition advance()'s kept minimum must agree with: every seq scanned each time."""

    def advance(self) -> bool:
        self._low = None
        return super().advance()


def test_the_kept_lowest_seq_gives_the_ack_a_full_scan_gives():
    """A random history of frames into steps and jobs, steps released, flushes (some jobs
    failing) and frames that need no write: the same ack after every operation."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        made, seq, job, open_steps = (RankAcks(), RecomputedAcks()), 0, 0, set()
        for _ in range(60):
            op = rng.random()
            if op < 0.35:
                seq, step = seq + 1, int(rng.integers(4))
                open_steps.add(step)
                for a in made:
                    a.in_step(seq, step)
            elif op < 0.5:
                seq, job = seq + 1, job + 1
                for a in made:
                    a.in_job(seq, job)
            elif op < 0.6:
                seq += 1
                for a in made:
                    a.received(seq)
            elif op < 0.8 and open_steps:
                step, job = open_steps.pop(), job + 1
                for a in made:
                    a.step_submitted(step, job)
            else:
                through = int(rng.integers(job + 1))
                failed = {through} if rng.random() < 0.1 else set()
                moved = [a.flushed(through, failed) for a in made]
                assert moved[0] == moved[1]
            assert made[0].advance() == made[1].advance()
            assert made[0].acked == made[1].acked


def test_a_failed_write_is_never_acked():
    a = RankAcks()
    a.in_job(1, job=1)
    a.in_job(2, job=2)
    a.flushed(2, failed={1})
    a.received(3)
    a.advance()
    assert a.acked == 0 and not a.settled


# ---- the packed form (Schema.packed): the same registry, columns in place of MetricDefs
def packed(metrics: list[pb.MetricDef]) -> pb.PackedMetrics:
    from hooks import schemas
    from hooks.layout import MetricSpec

    ops = {pb.REDUCE_SUM: "sum", pb.REDUCE_MEAN: "mean", pb.REDUCE_MAX: "max", pb.REDUCE_MIN: "min"}
    specs = [
        MetricSpec(d.name, ops[d.reduce], d.stat, d.layer, d.expert, d.head, d.unit)
        for d in metrics
    ]
    return schemas.SpecColumns.of(specs).packed()


def register_packed(r: RunMetrics, rank: int, schema_id: int, p: pb.PackedMetrics):
    return r.register_schema(rank, pb.Schema(schema_id=schema_id, packed=p))


def test_packed_and_metric_def_forms_resolve_to_the_same_ids_and_rows():
    defs = [m("a", layer=1, stat="s", unit="tokens"), m("ü/名", pb.REDUCE_MAX, head=3), m("c")]
    r = reg()
    rows = register_packed(r, 0, 1, packed(defs))
    assert list(rows.name) == ["a", "ü/名", "c"] and list(rows.reduce) == ["sum", "max", "sum"]
    assert list(rows.stat) == ["s", "x", "x"] and list(rows.unit) == ["tokens", "", ""]
    assert rows.layer.tolist() == [1, -1, -1] and rows.head.tolist() == [-1, 3, -1]
    # another rank sends the MetricDef form of the same metrics, in another order
    assert register(r, 1, 1, [defs[2], defs[0], defs[1]]) is None
    np.testing.assert_array_equal(r.schema(1, 1), [2, 0, 1])
    with pytest.raises(InvalidArgument, match="conflicts"):  # labels compared across forms
        register_packed(r, 2, 1, packed([m("a", layer=1, stat="s", unit="s")]))
    assert register_packed(r, 0, 1, packed(defs)) is None  # a resend
    assert r.ops.tolist() == [1, 3, 1] and len(r.ids) == 3 and "ü/名" in r.ids


def test_a_part_of_many_metrics_resolves_against_earlier_parts_exactly():
    """20,000 names in four overlapping parts: every name keeps the id it got first."""
    r = reg(max_metrics=100_000)
    names = [f"moe/layer{i // 1280:03d}/expert{(i // 5) % 256:03d}/s{i % 5}" for i in range(20_000)]
    for k, (a, b) in enumerate([(0, 8_000), (4_000, 12_000), (10_000, 20_000), (0, 20_000)]):
        register_packed(r, k, 1, packed([m(n) for n in names[a:b]]))
    np.testing.assert_array_equal(r.schema(3, 1), np.arange(20_000))
    np.testing.assert_array_equal(r.schema(1, 1), np.arange(4_000, 12_000))


@pytest.mark.parametrize(
    "spoil,match",
    [
        (lambda p: setattr(p, "layer", p.layer[:-4]), "packed.layer holds 8 bytes, not 3"),
        (lambda p: setattr(p, "reduce", b"\x01\x00\x01"), r"metric 1 \('b'\).*reduce op 0"),
        (lambda p: setattr(p, "names", b"a\xffc"), "not valid UTF-8"),
        (lambda p: setattr(p, "stat_index", np.array([0, 5, 0], "<u4").tobytes()), "index"),
        (lambda p: setattr(p, "name_ends", np.array([2, 1, 3], "<u4").tobytes()), "ascend"),
        (lambda p: setattr(p, "name_ends", np.array([1, 2, 2], "<u4").tobytes()), "ascend"),
        (lambda p: setattr(p, "name_ends", np.array([1, 1, 3], "<u4").tobytes()), "name must"),
        (lambda p: setattr(p, "names", b"aab"), "'a' appears twice"),
        (lambda p: setattr(p, "count", 0), "holds 12 bytes, not 0"),
    ],
)
def test_bad_packed_schemas_are_refused_and_change_nothing(spoil, match):
    p = packed([m("a"), m("b"), m("c")])
    spoil(p)
    r = reg()
    with pytest.raises(InvalidArgument, match=match):
        register_packed(r, 0, 1, p)
    assert not r.ids and not r.has_schema(0, 1)


def test_both_forms_in_one_schema_are_refused():
    with pytest.raises(InvalidArgument, match="both"):
        reg().register_schema(0, pb.Schema(schema_id=1, metrics=[m("a")], packed=packed([m("a")])))


def test_registered_rows_survive_the_spool_encoding():
    """The registry hands the writer polars string columns; a spooled WriteMetrics (store
    away) encodes and decodes back to the same dictionary rows."""
    from collector.jobs import METRICS, WriteMetrics, decode

    rows = register_packed(reg(), 0, 1, packed([m("a", unit="s"), m("ü", pb.REDUCE_MIN, head=2)]))
    job = decode(METRICS, b"".join(bytes(p) for p in WriteMetrics("run", rows).encode()))
    assert isinstance(job, WriteMetrics) and job.run == "run"
    back = job.metrics
    assert back.name == ["a", "ü"] and back.unit == ["s", ""] and back.reduce == ["sum", "min"]
    assert back.metric_id.tolist() == [0, 1] and back.head.tolist() == [-1, 2]
