"""push_clip: versioned, whole-table ClipUpdates reach every rank's stream (and late joiners);
ClipAcks are recorded per rank and idempotent."""

from __future__ import annotations

import math

import pytest

from collector import ClipAckRecord, InvalidArgument

from .conftest import mdef


def table(update) -> dict[tuple[int, str], float]:
    return {(s.layer, s.site): s.limit for s in update.settings}


def test_push_clip_reaches_both_ranks_and_acks_are_recorded(start_collector, client_factory):
    collector, addr, _ = start_collector()
    c0 = client_factory(addr, "clip", 0, 2)
    c1 = client_factory(addr, "clip", 1, 2, session="rank1")
    for c in (c0, c1):
        c.expect("welcome")
        c.schema(1, [mdef("x")])
        c.wait_ack()  # both streams are registered with the run

    v1 = collector.push_clip("clip", [(3, "routed", 7.0)], reason="blowup layer 3")
    for c in (c0, c1):
        u = c.expect("clip")
        assert (u.version, u.reason, table(u)) == (v1, "blowup layer 3", {(3, "routed"): 7.0})
    c0.clip_ack(v1, step=12)
    c1.clip_ack(v1, step=12)
    c1.clip_ack(v1, step=12)  # a resend replaces, never adds
    c0.wait_ack()
    c1.wait_ack()
    assert collector.clip_acks("clip") == [ClipAckRecord(0, v1, 12), ClipAckRecord(1, v1, 12)]

    v2 = collector.push_clip("clip", [(1, "shared", math.inf)], reason="operator")
    assert v2 == v1 + 1
    u = c0.expect("clip")
    assert table(u) == {(1, "shared"): math.inf, (3, "routed"): 7.0}  # the whole table

    late = client_factory(addr, "clip", 1, 2, seq=c1.seq, session="rank1")  # rank 1 reconnects
    assert late.expect("welcome").acked_seq == c1.seq
    u = late.expect("clip")  # only the latest version
    assert u.version == v2 and len(u.settings) == 2
    late.clip_ack(v2, step=20)
    late.wait_ack()
    assert ClipAckRecord(1, v2, 20) in collector.clip_acks("clip")
    assert collector.stats()["clip_updates"] == 2 and collector.stats()["clip_acks"] == 4


@pytest.mark.parametrize(
    "settings,match",
    [
        ([], "at least one"),
        ([(1, "nowhere", 7.0)], "site"),
        ([(-1, "routed", 7.0)], "layer"),
        ([(1, "routed", float("nan"))], "limit"),
        ([(1, "routed")], "(layer, site, limit)"),
    ],
)
def test_push_clip_validates(settings, match, start_collector):
    collector, _, _ = start_collector()
    with pytest.raises(InvalidArgument, match=match):
        collector.push_clip("clip", settings)
    with pytest.raises(InvalidArgument, match="run name"):
        collector.push_clip("not a run", [(1, "routed", 7.0)])
