"""The collector tier end to end, real processes on loopback: `python -m collector coordinate`
(Parquet) and two `python -m collector serve --coordinator` (each its own Parquet store), and
four real Monitor ranks given the address list (rank r prefers collector r % 2).

  blow-up run  the tiny model, 4 ranks in lockstep, a blow-up injected at step 30: every
               raw value is stored exactly once over the two collectors' stores; the
               coordinator's reduced rows equal, bit for bit, what a single collector's
               reduction (reduction.reduce_step) gives on those same stored values; the
               clip the coordinator decides is in force on all four ranks from the step
               after its event.
  failover     4 ranks, collector 1 is SIGKILLed mid-run: its ranks (1, 3) move to
               collector 0 and resend; every (rank, step) is stored and every reduced step
               is complete (4 ranks) - 0 gaps; the steps stored twice (flushed by the
               killed collector, never acked, so resent) hold the same values.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import polars as pl
import pytest
import torch

from analytics.events import CLAMP, from_frame
from collector.process import start_collector, stop_collector, terminate
from collector.reduction import OP_NAMES, reduce_step
from hooks import Monitor
from model.monitoring import DeferredMonitor
from model.train import TrainConfig, train
from store import open_store
from store.base import StepStatus
from tests.integration.lockstep import Lockstep
from tests.integration.monitored import Trainer, free_port

pytestmark = pytest.mark.timeout(600)
WORLD = 4
BLOWUP_AT, SITE = 30, "moe/layer01/expert005"  # as in test_closed_loop.py (seed 0)
BLOWUP = f"blowup@{BLOWUP_AT}:layer=1,expert=5"
STEPS = 46  # the event comes by step 42 (test_closed_loop.py's bound), its clip one after
OPS = {name: code for code, name in OP_NAMES.items()}  # store's reduce column -> op code


def start_tier(tmp, *, straggler_s: float = 30.0):
    """coordinator + 2 tier collectors; returns (coordinator, [collectors], address list)."""
    co, co_addr = start_collector(
        f"parquet:{tmp / 'co'}",
        "--insecure",
        "--straggler-timeout",
        str(straggler_s),
        command="coordinate",
        log_path=tmp / "co.log",
    )
    try:
        procs, addrs = tier_collectors(co_addr, tmp, "--straggler-timeout", str(straggler_s))
    except BaseException:
        terminate(co)
        raise
    return co, procs, ",".join(addrs)


def tier_collectors(co_addr: str, tmp, *args: str, url: str | None = None, n: int = 2):
    """n tier collectors in front of co_addr, flushing every 50 ms, logging to tmp/w{i}.log:
    each with its own Parquet store tmp/w{i}, or all on `url` (one shared store, e.g. a
    ClickHouse cluster), then each with its own spool tmp/w{i}.spool. -> (procs, addresses)"""
    procs, addrs = [], []
    try:
        for i in range(n):
            store = url or f"parquet:{tmp / f'w{i}'}"
            spool = ("--spool", str(tmp / f"w{i}.spool")) if url else ()
            p, a = start_collector(
                store,
                "--insecure",
                "--coordinator",
                co_addr,
                "--flush-interval",
                "0.05",
                *spool,
                *args,
                log_path=tmp / f"w{i}.log",
            )
            procs.append(p)
            addrs.append(a)
    except BaseException:
        for p in procs:
            terminate(p)
        raise
    return procs, addrs


def train_ranks(rank_main, world: int, errors: list, co, procs: list, threads: int) -> None:
    """`world` ranks, `rank_main(rank)` each on its own thread, then every tier collector and the
    coordinator stopped cleanly (exit 0); whatever happens, every process is terminated and
    torch's thread count is restored."""
    try:
        ts = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(500)
        assert not errors, errors
        for p in procs:
            assert stop_collector(p) == 0
        assert stop_collector(co) == 0
    finally:
        for p in [*procs, co]:
            terminate(p)
        torch.set_num_threads(threads)


def raw_of(url: str, run: str) -> pl.DataFrame:
    """Every logical raw row (rank, step, metric_id, value) one collector's store holds."""
    with open_store(url) as st:
        return st._read_raw(run, rank=None, start=None, stop=None)  # every row, one call


class Recording(Lockstep):
    """Lockstep, and the step each clip version first trained on this rank."""

    def __init__(self, monitor) -> None:
        super().__init__(monitor)
        self.applied: dict[int, int] = {}

    def step_begin(self, step: int) -> None:
        super().step_begin(step)
        clips = self.monitor.clips
        if clips is not None and clips.version and clips.version not in self.applied:
            self.applied[clips.version] = clips.step


@pytest.fixture(scope="module")
def blowup_tier(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tier")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    co, procs, address = start_tier(tmp)
    recs: dict[int, Recording] = {}
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        def make(model, optimizer):
            mon = Monitor(model, optimizer, target=address, run="tier", rank=rank, world_size=WORLD)
            recs[rank] = Recording(mon)
            return recs[rank]

        try:
            cfg = TrainConfig(preset="tiny", steps=STEPS, batch_size=8, seed=0, injects=[BLOWUP])
            assert train(cfg, monitor=DeferredMonitor(make)).monitor_errors == 0
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    train_ranks(rank_main, WORLD, errors, co, procs, threads)
    return tmp, recs


def test_every_value_is_stored_exactly_once_over_the_collectors(blowup_tier):
    tmp, _ = blowup_tier
    parts = [
        raw_of(f"parquet:{tmp / f'w{i}'}", "tier").with_columns(shard=pl.lit(i)) for i in (0, 1)
    ]
    raw = pl.concat(parts)
    with open_store(f"parquet:{tmp / 'co'}") as st:
        n_metrics = st.metrics("tier").height
        per_rank = raw.group_by("rank").agg(pl.col("metric_id").n_unique())
    # each rank's rows are on the collector it prefers (rank % 2), and only there
    assert sorted(raw.filter(pl.col("shard") == 0)["rank"].unique()) == [0, 2]
    assert sorted(raw.filter(pl.col("shard") == 1)["rank"].unique()) == [1, 3]
    dup = raw.group_by("rank", "step", "metric_id").len().filter(pl.col("len") > 1)
    assert dup.height == 0
    cells = raw.group_by("rank", "step").len()
    assert cells.height == WORLD * STEPS  # every (rank, step)
    m = per_rank["metric_id"].to_list()
    assert len(set(m)) == 1 and 0 < m[0] <= n_metrics  # every rank the same metrics
    # at each step every rank holds the same number of values (some steps carry more)
    assert cells.group_by("step").agg(pl.col("len").n_unique())["len"].max() == 1


def test_reduced_rows_equal_a_single_collectors_reduction_of_the_same_values(blowup_tier):
    tmp, _ = blowup_tier
    raw = pl.concat([raw_of(f"parquet:{tmp / f'w{i}'}", "tier") for i in (0, 1)])
    with open_store(f"parquet:{tmp / 'co'}") as st:
        md = st.metrics("tier")
        steps = st.steps("tier")
        runs = st.runs().filter(run="tier")
        reduced = {s: st.at_step("tier", s) for s in range(STEPS)}
    assert runs["status"].to_list() == ["finished"]
    assert steps["step"].to_list() == list(range(STEPS))
    assert steps["complete"].all() and set(steps["n_ranks"].to_list()) == {WORLD}
    ops_M = np.zeros(int(md["metric_id"].max()) + 1, np.int8)
    ops_M[md["metric_id"].to_numpy()] = [OPS[r] for r in md["reduce"].to_list()]
    layouts: dict[bytes, np.ndarray] = {}
    checked = 0
    for (step,), g in raw.sort("rank", "metric_id").group_by("step", maintain_order=True):
        step_parts = []
        for (rank,), gr in g.group_by("rank", maintain_order=True):
            ids = gr["metric_id"].to_numpy().astype(np.int32)
            ids = layouts.setdefault(ids.tobytes(), ids)  # one id-map object per layout
            v = gr["value"].to_numpy().astype(np.float32)
            step_parts.append((int(rank), ids, v, np.ones(v.size, bool)))
        status = StepStatus(int(step), WORLD, (), True, 0.0)
        single = reduce_step(int(step), step_parts, set(range(WORLD)), ops_M, status).reduced
        got = reduced[int(step)]
        assert got["metric_id"].to_list() == single.metric_id.tolist()
        want = single.value
        have = got["value"].to_numpy().astype(np.float32)
        assert np.array_equal(have, want, equal_nan=True)
        assert have[~np.isnan(have)].tobytes() == want[~np.isnan(want)].tobytes()  # bitwise
        checked += 1
    assert checked == STEPS


def test_the_blowup_clip_is_in_force_on_all_four_ranks_from_the_next_step(blowup_tier):
    tmp, recs = blowup_tier
    with open_store(f"parquet:{tmp / 'co'}") as st:
        events = from_frame(st.events("tier"), "tier")
        clips = st.clips("tier")
    ev = next(e for e in events if e.decision == CLAMP and e.site == SITE)
    assert BLOWUP_AT <= ev.step <= BLOWUP_AT + 12
    first = clips.row(0, named=True)
    assert (first["version"], first["layer"], first["site"]) == (1, 1, "routed")
    assert first["step"] == ev.step and 1.0 <= first["limit"] < 10
    assert first["acked_step"] == ev.step + 1  # the ranks' acks reached the coordinator
    assert sorted(recs) == list(range(WORLD))
    for rank, rec in recs.items():
        assert rec.applied.get(1) == ev.step + 1, (rank, rec.applied)


@pytest.mark.parametrize("how", ["kill", "term"])
def test_losing_a_collector_mid_run_its_ranks_fail_over_with_no_gaps(tmp_path, how):
    """kill: SIGKILL, no drain. term: SIGTERM, the collector drains (its steps confirmed by
    the coordinator once the ranks it now refuses resend them through collector 0) and exits
    0, everything it took durable."""
    steps = 40
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    co, procs, address = start_tier(tmp_path)
    trainers = [
        Trainer(address, "fo", steps, rank=r, world_size=WORLD).start() for r in range(WORLD)
    ]
    try:
        deadline = time.monotonic() + 120
        while min(t.progress for t in trainers) < 12:
            assert time.monotonic() < deadline and not any(t.error for t in trainers)
            time.sleep(0.01)
        if how == "kill":
            procs[1].kill()  # mid-run: no drain, no goodbye
            procs[1].wait(30)
        else:
            assert stop_collector(procs[1]) == 0  # drained: all it took became durable
        for t in trainers:
            assert t.done.wait(300) and t.error is None, t.error
        stats = [t.stats() for t in trainers]
        assert stop_collector(procs[0]) == 0
        assert stop_collector(co) == 0
    finally:
        for p in [*procs, co]:
            terminate(p)
        torch.set_num_threads(threads)
    for r, s in enumerate(stats):  # nothing was dropped by the clients
        assert s.get("dropped_steps", 0) == 0, (r, s)
    w0 = raw_of(f"parquet:{tmp_path / 'w0'}", "fo")
    w1 = raw_of(f"parquet:{tmp_path / 'w1'}", "fo")
    assert set(w0["rank"].unique().to_list()) == {0, 1, 2, 3}  # 1 and 3 moved to collector 0
    both = pl.concat([w0, w1])
    cells = both.unique(["rank", "step", "metric_id"]).group_by("rank", "step").len()
    assert cells.height == WORLD * steps  # 0 gaps: every (rank, step) is stored
    assert cells.group_by("step").agg(pl.col("len").n_unique())["len"].max() == 1  # all ranks
    # what both hold (flushed by the killed collector, never acked, resent) is the same data
    twice = w0.join(w1, on=["rank", "step", "metric_id"], suffix="_w1")
    assert np.array_equal(twice["value"].to_numpy(), twice["value_w1"].to_numpy(), equal_nan=True)
    with open_store(f"parquet:{tmp_path / 'co'}") as st:
        done = st.steps("fo")
        assert st.runs().filter(run="fo")["status"].to_list() == ["finished"]
    assert done["step"].to_list() == list(range(steps))
    assert done["complete"].all() and set(done["n_ranks"].to_list()) == {WORLD}
    print(
        f"\nfailover: {twice.select('rank', 'step').unique().height} (rank, step) pairs were "
        f"stored by both collectors ({how}: resent after it went), {cells.height} stored in all"
    )


def test_a_coordinator_killed_and_restarted_mid_run_loses_nothing(tmp_path):
    """SIGKILL the coordinator mid-run and start it again on its port: the collectors hold
    their acks meanwhile (the ranks buffer), resend their unconfirmed partials to the new
    one, which reloads the run's dictionary and last stored step; every step is reduced
    once, complete."""
    steps = 30
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    port = free_port()
    co_args = ("--insecure", "--port", str(port), "--straggler-timeout", "30")
    co_url = f"parquet:{tmp_path / 'co'}"
    co, co_addr = start_collector(co_url, *co_args, command="coordinate")
    procs, addrs = tier_collectors(co_addr, tmp_path)
    trainers = [
        Trainer(",".join(addrs), "re", steps, rank=r, world_size=WORLD).start()
        for r in range(WORLD)
    ]
    try:
        deadline = time.monotonic() + 120
        while min(t.progress for t in trainers) < 8:
            assert time.monotonic() < deadline and not any(t.error for t in trainers)
            time.sleep(0.01)
        co.kill()
        co.wait(30)
        time.sleep(1.0)  # the ranks train on while nothing reduces
        co, _ = start_collector(co_url, *co_args, command="coordinate")
        for t in trainers:
            assert t.done.wait(300) and t.error is None, t.error
        stats = [t.stats() for t in trainers]
        for p in procs:
            assert stop_collector(p) == 0
        assert stop_collector(co) == 0
    finally:
        for p in [*procs, co]:
            terminate(p)
        torch.set_num_threads(threads)
    for r, s in enumerate(stats):
        assert s.get("dropped_steps", 0) == 0, (r, s)
    logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
    assert "retrying" in logs  # the collectors did find it gone (and held their acks)
    with open_store(co_url) as st:
        done = st.steps("re")
        assert st.runs().filter(run="re")["status"].to_list() == ["finished"]
        loss = st.series("re", "train/loss")
    assert done["step"].to_list() == list(range(steps))  # each step once (the natural key)
    assert done["complete"].all() and set(done["n_ranks"].to_list()) == {WORLD}
    assert loss["step"].to_list() == list(range(steps))


def test_serve_workers_runs_a_tier_on_one_host(tmp_path):
    """`serve --workers 2 --token-file F`: two collector processes on PORT and PORT+1 and the
    coordinator in the serving process, all with the token; 4 ranks given both addresses;
    SIGTERM stops it all cleanly."""
    steps, port = 12, free_port()
    url = f"parquet:{tmp_path / 'tier'}"
    token = tmp_path / "token"
    token.write_text("s3cret-tier-token\n")  # from a file: the workers get it, not via argv
    args = ("--token-file", str(token), "--workers", "2", "--port", str(port))
    env = {"STEPWATCH_TOKEN": None, "STEPWATCH_TOKEN_FILE": None}
    proc, first = start_collector(
        url, *args, "--flush-interval", "0.05", log_path=tmp_path / "tier.log", env=env
    )
    address = f"127.0.0.1:{port},127.0.0.1:{port + 1}"
    assert first == f"127.0.0.1:{port}"
    auth = {"token": "s3cret-tier-token"}
    trainers = [
        Trainer(address, "wk", steps, rank=r, world_size=WORLD, monitor_kwargs=auth).start()
        for r in range(WORLD)
    ]
    try:
        for t in trainers:
            assert t.done.wait(300) and t.error is None, t.error
        assert stop_collector(proc) == 0
    finally:
        terminate(proc)
    assert f"collector tier addresses {address}" in (tmp_path / "tier.log").read_text()
    with open_store(url) as st:
        done = st.steps("wk")
    assert done["step"].to_list() == list(range(steps))
    assert done["complete"].all() and set(done["n_ranks"].to_list()) == {WORLD}
    for i, ranks in ((0, [0, 2]), (1, [1, 3])):  # rank r on worker r % 2, stored there
        raw = raw_of(f"{url}/workers/{i}", "wk")
        assert sorted(raw["rank"].unique().to_list()) == ranks
        assert raw.select("rank", "step").unique().height == len(ranks) * steps


def test_on_a_two_shard_clickhouse_cluster(clickhouse_cluster, clickhouse_cluster_url, tmp_path):
    """The same tier with every process on one ClickHouse cluster (2 Debian 18.16 shards):
    each raw vector is one physical row on the shard of its rank, every step is complete,
    and the run's row is the coordinator's (finished; the collectors never rewrite it)."""
    from tests.integration.test_clickhouse_cluster import db_of, rows

    url, steps = clickhouse_cluster_url, 15
    with open_store(url):  # migrations on every node, once, before three writers start
        pass
    co, co_addr = start_collector(url, "--insecure", command="coordinate")
    procs: list = []
    try:
        procs, addrs = tier_collectors(co_addr, tmp_path, url=url)
        trainers = [
            Trainer(",".join(addrs), "ck", steps, rank=r, world_size=WORLD).start()
            for r in range(WORLD)
        ]
        for t in trainers:
            assert t.done.wait(300) and t.error is None, t.error
        for p in procs:
            assert stop_collector(p) == 0
        assert stop_collector(co) == 0
    finally:
        for p in [*procs, co]:
            terminate(p)
    db = db_of(url)
    shard_ranks = []
    n_pairs = 0
    for shard in range(len(clickhouse_cluster.servers)):
        got = rows(
            clickhouse_cluster,
            shard,
            f"SELECT rank, step, layout, count() FROM {db}.raw_vectors_local "
            "WHERE run = %(run)s GROUP BY rank, step, layout",
            {"run": "ck"},
        )
        assert {c for *_, c in got} == {1}  # one physical row per vector: nothing resent
        shard_ranks.append({r for r, *_ in got})
        n_pairs += len({(r, s) for r, s, *_ in got})
    assert not shard_ranks[0] & shard_ranks[1]  # a rank's vectors live on one shard
    assert shard_ranks[0] | shard_ranks[1] == set(range(WORLD))
    assert n_pairs == WORLD * steps
    with open_store(url) as st:
        done = st.steps("ck")
        assert st.runs().filter(run="ck")["status"].to_list() == ["finished"]
    assert done["step"].to_list() == list(range(steps))
    assert done["complete"].all() and set(done["n_ranks"].to_list()) == {WORLD}


def test_clip_commands_go_to_the_coordinator_through_any_collector(tmp_path):
    """`collector clip` against a tier collector: the command is the coordinator's (it holds
    the tier's clip table), through either collector; the rank gets the new table with its
    next step's answer; a refused command says why; the coordinator stores the version."""
    from collector.operator import OperatorError, operate
    from proto.v1 import telemetry_pb2 as pb
    from tests.collector.conftest import RawClient, mdef

    co, procs, address = start_tier(tmp_path)
    first, second = address.split(",")
    rank = RawClient(first, "optier", 0, 1)
    try:
        rank.expect("welcome")
        rank.schema(1, [mdef("train/loss", pb.REDUCE_MEAN)])
        rank.step(0, 1, [1.0], fold=True)
        rank.wait_ack()  # step 0 reduced and stored at the coordinator: the run is there
        table = operate(second, "optier", "set", [[1, "routed", 5.0]])
        assert table.version == 1 and table.limits == {(1, "routed"): 5.0}
        listed = operate(first, "optier", "list")
        assert (listed.version, listed.limits) == (1, {(1, "routed"): 5.0})
        with pytest.raises(OperatorError, match="finite limit > 0"):
            operate(first, "optier", "set", [[1, "routed", -1.0]])
        rank.step(1, 1, [2.0], fold=True)
        clip = rank.expect("clip")  # with step 1's answer
        assert clip.version == 1 and [(s.layer, s.site, s.limit) for s in clip.settings] == [
            (1, "routed", 5.0)
        ]
        assert rank.close().code.name == "OK"
    finally:
        rank.channel.close()
        for p in [*procs, co]:
            stop_collector(p)
    with open_store(f"parquet:{tmp_path / 'co'}") as st:
        clips = st.clips("optier")
    assert clips.filter(pl.col("version") == 1)["limit"].to_list() == [5.0]
