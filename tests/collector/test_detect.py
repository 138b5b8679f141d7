"""Online detection and the clip control loop inside a real Collector, driven frame by frame
over gRPC: events are stored, a blow-up pushes a versioned clip to the rank, its ack is stored
with the step, observe-only detects without acting, and operators set/freeze/clear thresholds
with `python -m collector clip` against the running collector."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from proto.v1 import telemetry_pb2 as pb

from .conftest import mdef

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.analytics.synthetic import PARAM_EVERY, SyntheticRun, blowup, catalogue  # noqa: E402

REDUCE = {"tokens": pb.REDUCE_SUM, "act_maxabs": pb.REDUCE_MAX, "max_logit": pb.REDUCE_MAX}
ROWS = catalogue()
STEP_ROWS = [r for r in ROWS if not r[0].startswith("params/")]
PARAM_ROWS = [r for r in ROWS if r[0].startswith("params/")]


def defs(rows):
    return [
        mdef(n, REDUCE.get(s, pb.REDUCE_MEAN), layer=l, expert=e, head=h, stat=s)
        for n, l, e, h, s in rows
    ]


def stream_steps(client, syn: SyntheticRun, steps, *, until_clip: bool = False):
    """Send steps like the hooks do (schema 2 every PARAM_EVERY steps); returns the first
    ClipUpdate seen when until_clip (None if none came)."""
    for s in steps:
        v = syn.values(s)
        vec = np.array([v[r[0]] for r in STEP_ROWS], np.float32)
        client.chunk(s, 1, vec)
        n = vec.size
        if s % PARAM_EVERY == 0:
            pv = np.array([v[r[0]] for r in PARAM_ROWS], np.float32)
            client.chunk(s, 2, pv)
            n += pv.size
        client.end_of_step(s, n)
        client.wait_ack()
        if until_clip and client.clips:
            return client.clips[0]
    return client.clips[0] if client.clips else None


def open_client(client_factory, addr, run):
    c = client_factory(addr, run, 0, 1)
    c.expect("welcome")
    c.schema(1, defs(STEP_ROWS))
    c.schema(2, defs(PARAM_ROWS))
    c.wait_ack()
    return c


def blowing_run(run: str) -> SyntheticRun:
    syn = SyntheticRun(seed=3, run=run)
    syn.faults.append(blowup(2, 3, start=40))
    syn.nan_at[25] = ["resid/layer01/rms", "train/loss"]
    return syn


def test_events_are_stored_and_a_blowup_is_clipped_and_acked(start_collector, client_factory):
    collector, addr, store = start_collector()
    c = open_client(client_factory, addr, "loop")
    syn = blowing_run("loop")
    update = stream_steps(c, syn, range(70), until_clip=True)
    assert update is not None, "no clip update reached the rank"
    events = collector.events("loop")
    nan = events[0]
    assert (nan.kind, nan.step, nan.site, nan.severity) == (
        "nonfinite",
        25,
        "resid/layer01",
        "critical",
    )
    trigger = next(e for e in events if e.decision == "clamp")
    assert trigger.site == "moe/layer02/expert003" and 40 <= trigger.onset_step <= trigger.step
    assert update.version == 1 and update.reason == f"{trigger.kind}@{trigger.step} {trigger.site}"
    (setting,) = update.settings
    assert (setting.layer, setting.site) == (2, "routed") and setting.limit >= 1.0
    assert c.seq and collector.clip_latency_ms("loop")[1] >= 0.0
    c.clip_ack(update.version, step=trigger.step + 1)  # the hooks' ClipAck
    c.wait_ack()
    store.flush()
    clips = store.clips("loop")
    assert clips.select("version", "step", "layer", "site", "acked_step").rows() == [
        (1, trigger.step, 2, "routed", trigger.step + 1)
    ]
    assert clips["limit"][0] == pytest.approx(setting.limit)
    stored = store.events("loop")
    assert stored.select("step", "kind", "site").rows()[:1] == [(25, "nonfinite", "resid/layer01")]
    assert stored.height == len(collector.events("loop"))
    assert collector.stats()["events"] == stored.height


def test_observe_only_detects_but_sends_nothing(start_collector, client_factory):
    collector, addr, store = start_collector(observe_only=True)
    c = open_client(client_factory, addr, "watch")
    assert stream_steps(c, blowing_run("watch"), range(70)) is None
    assert any(e.kind == "maxabs_spike" for e in collector.events("watch"))
    store.flush()
    assert store.clips("watch").height == 0 and store.events("watch").height >= 2
    stats = collector.stats()
    assert stats["clip_updates"] == 0 and stats["clip_decisions_observed"] >= 1


def clip_cli(addr, *args, token=None):
    """`collector clip` with the token in $STEPWATCH_TOKEN (never on argv)."""
    cmd = [sys.executable, "-m", "collector", "clip", *args, "--target", addr]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPWATCH_TOKEN")}
    if token:
        env["STEPWATCH_TOKEN"] = token
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


def table(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if not line.startswith("#")]


def test_operator_set_freeze_clear_over_the_wire(start_collector, client_factory):
    collector, addr, store = start_collector()
    c = open_client(client_factory, addr, "ops")
    syn = blowing_run("ops")
    stream_steps(c, syn, range(5))

    out = clip_cli(
        addr,
        "set",
        "--run",
        "ops",
        "--layer",
        "2",
        "--layer",
        "3",
        "--site",
        "routed",
        "--limit",
        "2.5",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "# version 1"
    assert table(out.stdout) == [
        "layer,site,limit,frozen",
        "2,routed,2.5,true",
        "3,routed,2.5,true",
    ]
    update = c.expect("clip")  # the rank got it on its stream
    assert update.reason == "operator set" and {(s.layer, s.limit) for s in update.settings} == {
        (2, 2.5),
        (3, 2.5),
    }

    # frozen: the blow-up in layer 2 is detected, but the policy leaves layer 2 alone
    stream_steps(c, syn, range(5, 70))
    assert any(e.kind == "maxabs_spike" for e in collector.events("ops"))
    assert collector.stats()["clip_updates"] == 1

    out = clip_cli(addr, "clear", "--run", "ops", "--layer", "3")
    assert out.returncode == 0, out.stderr
    assert table(out.stdout)[1:] == ["2,routed,2.5,true", "3,routed,inf,false"]
    assert c.expect("clip").version == 2
    out = clip_cli(addr, "unfreeze", "--run", "ops", "--layer", "2")
    assert table(out.stdout)[1:] == ["2,routed,2.5,false", "3,routed,inf,false"]
    out = clip_cli(addr, "freeze", "--run", "ops", "--layer", "7", "--site", "shared")
    assert "7,shared,inf,true" in table(out.stdout)
    out = clip_cli(addr, "list", "--run", "ops")
    assert out.returncode == 0 and out.stdout.startswith("# version 2")
    store.flush()
    assert store.clips("ops").select("version", "layer", "limit", "reason").rows() == [
        (1, 2, 2.5, "operator set"),
        (1, 3, 2.5, "operator set"),
        (2, 3, math.inf, "operator clear"),
    ]


def test_operator_errors(start_collector):
    collector, addr, _ = start_collector(token="s3cret", operator_token="0p3r")
    out = clip_cli(addr, "set", "--run", "r", "--layer", "1", "--limit", "-1", token="0p3r")
    assert out.returncode == 2 and "INVALID_ARGUMENT" in out.stderr and "limit" in out.stderr
    out = clip_cli(addr, "list", "--run", "r")
    assert out.returncode == 2 and "UNAUTHENTICATED" in out.stderr
    out = clip_cli(addr, "list", "--run", "r", token="s3cret")  # the ranks' token: no operator
    assert out.returncode == 2 and "PERMISSION_DENIED" in out.stderr
    out = clip_cli(addr, "set", "--run", "r", "--layer", "1", token="0p3r")
    assert out.returncode == 2 and "--limit" in out.stderr  # argparse: usage error
    out = clip_cli(addr, "list", "--run", "bad name!", token="0p3r")
    assert out.returncode == 2 and "run name" in out.stderr
    out = clip_cli(addr, "list", "--run", "r", token="0p3r")
    assert out.returncode == 0 and out.stdout == "# version 0\nlayer,site,limit,frozen\n"
    assert collector.stats()["operator_commands"] == 1


def test_rank_vectors_are_built_on_access_and_equal_the_eager_ones():
    from analytics.frame import rank_vectors
    from collector.detect import RankVectors

    rng = np.random.default_rng(0)
    n, size = 400, 30
    ids = rng.integers(-2, size + 3, n)  # out-of-range ids are ignored
    rank = rng.choice([7, 3, 11, 5], n)
    value = rng.normal(size=n).astype(np.float32)
    value[::17] = np.nan
    ids[-1], rank[-1] = ids[0], rank[0]  # a repeated (rank, id): the last one wins
    ranks = (3, 5, 7, 11, 12)  # 12 sent nothing: all NaN
    eager = rank_vectors(ids, rank, value, size, ranks)
    lazy = RankVectors.from_rows(ids, rank, value, size, ranks)
    assert list(lazy) == list(ranks) and len(lazy) == 5
    for r in ranks:
        np.testing.assert_array_equal(lazy[r], eager[r])
    assert np.isnan(lazy[12]).all()
    with pytest.raises(KeyError):
        lazy[4]


def test_rank_vectors_from_blocks_and_rows_equal_the_eager_ones_and_matrix_gathers_them():
    """The collector's per-rank values come from the step's RawBlocks (one matrix per layout)
    and flat rows; a vector and a gather of a few ids must equal the flat rows' dense vectors
    (blocks expanded first, then the rows: the later write wins)."""
    from analytics.frame import StepFrame, rank_vectors
    from collector.detect import RankVectors
    from store.base import RawBlock, ValueBatch

    rng = np.random.default_rng(1)
    size = 40
    blocks = [
        RawBlock(
            3,
            np.array([5, 2, 9], np.int32),
            np.array([0, 4, 7, 11], np.int32),
            rng.normal(size=(3, 4)).astype(np.float32),
        ),
        RawBlock(
            3,
            np.array([2, 7], np.int32),
            np.arange(20, 30, dtype=np.int32),
            rng.normal(size=(2, 10)).astype(np.float32),
        ),
    ]
    n = 60
    rest = ValueBatch(
        step=np.full(n, 3, np.int64),
        metric_id=rng.integers(-1, size + 2, n).astype(np.int32),
        value=rng.normal(size=n).astype(np.float32),
        rank=rng.choice([2, 5, 7, 9, 13], n).astype(np.int32),  # 13 not in the step's ranks
    )
    rest.metric_id[:2] = [4, 22]  # rows that override block cells
    rest.rank[:2] = [2, 7]
    ranks = (2, 5, 7, 9, 12)  # 12 sent nothing
    parts = [b.cells() for b in blocks] + [rest]
    flat = {
        k: np.concatenate([getattr(p, k) for p in parts]) for k in ("metric_id", "rank", "value")
    }
    eager = rank_vectors(flat["metric_id"], flat["rank"], flat["value"], size, ranks)
    lazy = RankVectors(blocks, rest, size, ranks)
    for r in ranks:
        np.testing.assert_array_equal(lazy[r], eager[r])
    want = np.array([22, -1, 4, 0, 39, 22, 11, 29])
    expect = np.array(
        [[eager[r][i] if i >= 0 else np.nan for i in want] for r in ranks], dtype=np.float64
    )
    np.testing.assert_array_equal(lazy.matrix(want), expect)
    frame = StepFrame.from_rows("r", 3, np.arange(size), np.zeros(size), size, ranks, lambda: lazy)
    got_ranks, m = frame.rank_matrix(want)
    assert got_ranks == ranks
    np.testing.assert_array_equal(m, expect)
    generic = StepFrame.from_rows(
        "r", 3, np.arange(size), np.zeros(size), size, ranks, lambda: eager
    )
    np.testing.assert_array_equal(generic.rank_matrix(want)[1], expect)
