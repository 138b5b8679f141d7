"""ClickHouseStore on a real server: same answers as the memory store, resends leave one copy,
what it wrote is what a second client (clickhouse-client) sees, and nothing from a caller
ever becomes SQL."""

from __future__ import annotations

import socket
import uuid

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from store.base import (
    InvalidInput,
    MetricDict,
    NotFound,
    RunInfo,
    StepStatus,
    StoreError,
    ValueBatch,
)
from store.clickhouse import ClickHouseStore
from store.clickhouse.schema import raw_cells_sql
from store.memory import MemoryStore

RUN = "moe-7b.run_01"
NAMES = [
    "loss",
    "grad_norm",
    "moe/layer00/expert000/act_rms",
    "moe/layer00/expert001/act_rms",
    "moe/layer01/expert000/act_rms",
    "attn/layer01/head03/max_logit",
]
EVIL = ["evil'); DROP TABLE raw; --", 'back\\slash "dq" %(p0)s {x}']  # names are data


def metric_dict(names: list[str], first_id: int = 0) -> MetricDict:
    n = len(names)
    ids = np.arange(first_id, first_id + n, dtype=np.int32)
    return MetricDict(
        metric_id=ids,
        name=list(names),
        layer=ids % 2,
        expert=ids % 3 - 1,
        head=np.full(n, -1, np.int32),
        stat=["rms"] * n,
        unit=["1"] * n,
        reduce=["mean"] * n,
    )


def grid(steps, metrics, ranks, seed: int) -> ValueBatch:
    s, m, r = (a.ravel() for a in np.meshgrid(steps, metrics, ranks, indexing="ij"))
    value = np.random.default_rng(seed).standard_normal(s.size).astype(np.float32)
    return ValueBatch(
        step=s.astype(np.int64), metric_id=m.astype(np.int32), value=value, rank=r.astype(np.int32)
    )


def scenario(store) -> None:
    """Upserts, in-batch duplicates, resends across flushes, non-finite values, stragglers."""
    store.open_run(RunInfo(RUN, world_size=3, config_json='{"preset": "tiny"}', started_at=1.5e9))
    store.write_metrics(RUN, metric_dict(NAMES))
    store.write_metrics(RUN, metric_dict(["loss/total"], first_id=0))  # upsert id 0
    raw = grid(np.arange(6), np.arange(len(NAMES)), np.arange(3), seed=1)
    raw.value[:3] = [np.nan, np.inf, -np.inf]
    store.write_raw(RUN, raw)
    store.write_raw(RUN, raw)  # same flush: dup
    red = ValueBatch(
        step=np.repeat(np.arange(6), 6),
        metric_id=np.tile(np.arange(6), 6),
        value=np.linspace(-1, 1, 36, dtype=np.float32),
        n_ranks=np.full(36, 3),
    )
    store.write_reduced(RUN, red)
    store.write_steps(RUN, [StepStatus(s, 3, wall_time=float(s)) for s in range(6)])
    store.flush()
    store.write_raw(RUN, raw)  # resend: 2nd INSERT
    later = grid(np.arange(4, 9), np.arange(2), np.arange(3), seed=2)  # overlaps steps 4-5
    store.write_raw(RUN, later)
    store.write_reduced(
        RUN,
        ValueBatch(
            step=np.array([5, 6]),
            metric_id=np.array([1, 1]),
            value=np.array([42.0, 43.0]),
            n_ranks=np.array([2, 2]),
        ),
    )
    store.write_steps(RUN, [StepStatus(5, 2, (1,), False, 5.5), StepStatus(6, 3, (), True, 6.0)])
    store.finish_run(RUN)
    store.flush()


@pytest.fixture
def store(clickhouse_url):
    s = ClickHouseStore(clickhouse_url)
    yield s
    s.close()


def db_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def test_same_answers_as_the_memory_store(store):
    mem = MemoryStore()
    for s in (store, mem):
        scenario(s)
    keep = ["run", "world_size", "config_json", "started_at", "last_step", "status"]
    assert_frame_equal(store.runs().select(keep), mem.runs().select(keep))
    assert store.runs()["status"].to_list() == ["finished"]
    assert_frame_equal(store.metrics(RUN), mem.metrics(RUN))
    for name in ["loss/total", *NAMES[1:]]:
        assert_frame_equal(store.series(RUN, name), mem.series(RUN, name))
        for rank in range(3):
            assert_frame_equal(
                store.series(RUN, name, rank=rank, start=2, stop=8),
                mem.series(RUN, name, rank=rank, start=2, stop=8),
            )
    for step, pattern, rank in [
        (5, "*", None),
        (5, "moe/*/act_rms", 1),
        (0, "loss*", 0),
        (4, "*layer0[01]/expert00?/*", 2),
        (99, "*", None),
    ]:
        assert_frame_equal(
            store.at_step(RUN, step, pattern, rank=rank), mem.at_step(RUN, step, pattern, rank=rank)
        )
    assert_frame_equal(store.steps(RUN), mem.steps(RUN))
    assert store.series(RUN, "grad_norm")["value"].to_list()[-2:] == [42.0, 43.0]


def test_a_second_store_sees_what_the_first_flushed(store, clickhouse_url):
    scenario(store)
    with ClickHouseStore(clickhouse_url) as other:
        assert_frame_equal(other.steps(RUN), store.steps(RUN))
        assert_frame_equal(
            other.series(RUN, "loss/total", rank=2), store.series(RUN, "loss/total", rank=2)
        )
        assert other.runs()["last_step"].to_list() == [8]


def test_nothing_is_visible_before_flush(store, clickhouse_server, clickhouse_url):
    store.open_run(RunInfo(RUN, world_size=1))
    store.flush()
    store.write_metrics(RUN, metric_dict(["loss"]))
    store.write_raw(RUN, grid([0], [0], [0], seed=3))
    assert store.metrics(RUN).height == 0
    for table in ("raw_vectors", "raw_layouts"):
        assert (
            clickhouse_server.client(f"SELECT count() FROM {db_of(clickhouse_url)}.{table}")
            == "0\n"
        )


def test_resent_rows_leave_exactly_one_copy(store, clickhouse_server, clickhouse_url):
    db, q = db_of(clickhouse_url), clickhouse_server.client
    store.open_run(RunInfo(RUN, world_size=4))
    store.write_metrics(RUN, metric_dict([f"m{i:03d}" for i in range(100)]))
    store.flush()
    q(f"SYSTEM STOP MERGES {db}.raw_vectors")  # keep every insert's part apart until we look
    batch = grid(np.arange(10), np.arange(100), np.arange(4), seed=4)
    n = 10 * 4  # vectors: one per (step, rank), 100 values each
    store.write_raw(RUN, batch)
    store.flush()
    store.write_raw(RUN, batch)  # the resend after a reconnect: a second INSERT
    store.flush()
    changed = grid(np.arange(5), np.arange(10), np.arange(4), seed=5)  # then a correction
    store.write_raw(RUN, changed)
    store.flush()
    assert (
        q(
            f"SELECT count() FROM system.parts WHERE database = '{db}' "
            "AND table = 'raw_vectors' AND active"
        )
        == "3\n"
    )
    assert int(q(f"SELECT count() FROM {db}.raw_vectors")) == 2 * n + 5 * 4  # on disk
    assert q(f"SELECT count(), uniqExact(layout) FROM {db}.raw_layouts FORMAT TSV") == "2\t2\n"
    expected = pl.DataFrame(
        {"step": batch.step, "metric_id": batch.metric_id, "rank": batch.rank, "value": batch.value}
    )
    fix = pl.DataFrame(
        {
            "step": changed.step,
            "metric_id": changed.metric_id,
            "rank": changed.rank,
            "value": changed.value,
        }
    )
    expected = (
        pl.concat([expected, fix])
        .unique(["step", "metric_id", "rank"], keep="last")
        .sort("metric_id", "rank", "step")
    )

    def through_the_store() -> pl.DataFrame:
        parts = [
            store.series(RUN, f"m{m:03d}", rank=r).with_columns(
                pl.lit(m, pl.Int32).alias("metric_id"), pl.lit(r, pl.Int32).alias("rank")
            )
            for m in (0, 7, 55, 99)
            for r in range(4)
        ]
        return pl.concat(parts).select(expected.columns)

    sample = expected.filter(pl.col("metric_id").is_in([0, 7, 55, 99]))
    assert_frame_equal(through_the_store(), sample, check_dtypes=False)
    assert_frame_equal(second_client_view(q, db), expected, check_dtypes=False)
    q(f"SYSTEM START MERGES {db}.raw_vectors")
    q(f"OPTIMIZE TABLE {db}.raw_vectors FINAL")  # keeps the highest ver of each vector key:
    assert int(q(f"SELECT count() FROM {db}.raw_vectors")) == n + 5 * 4  # the correction's
    assert_frame_equal(second_client_view(q, db), expected, check_dtypes=False)  # own layout
    assert_frame_equal(through_the_store(), sample, check_dtypes=False)


def test_each_flush_inserts_only_the_new_dictionary_rows(store, clickhouse_server, clickhouse_url):
    """The dictionary grows by parts (a wide rank registers thousands of names at a time):
    each flush inserts the rows written since the last one, not the whole dictionary again."""
    db, q = db_of(clickhouse_url), clickhouse_server.client
    store.open_run(RunInfo(RUN, world_size=1))
    q(f"SYSTEM STOP MERGES {db}.metrics")  # every insert stays on disk as written
    for k in range(4):
        store.write_metrics(RUN, metric_dict([f"p{k}/m{i:03d}" for i in range(250)], 250 * k))
        store.flush()
    assert int(q(f"SELECT count() FROM {db}.metrics WHERE run = '{RUN}'")) == 1000  # not 2,500
    got = store.metrics(RUN)
    assert got["metric_id"].to_list() == list(range(1000))
    assert got["name"].to_list()[249:251] == ["p0/m249", "p1/m000"]
    q(f"SYSTEM START MERGES {db}.metrics")


def second_client_view(q, db: str) -> pl.DataFrame:
    """The logical raw table as clickhouse-client sees it (raw_cells_sql), last write per
    key, parsed from TSV."""
    out = q(
        f"SELECT step, metric_id, rank, argMax(value, ver) FROM ({raw_cells_sql(db)}) "
        "GROUP BY step, metric_id, rank ORDER BY metric_id, rank, step FORMAT TSV"
    )
    rows = [line.split("\t") for line in out.splitlines()]
    return pl.DataFrame(
        {
            "step": [int(r[0]) for r in rows],
            "metric_id": [int(r[1]) for r in rows],
            "rank": [int(r[2]) for r in rows],
            "value": np.array([r[3] for r in rows], dtype=np.float32),
        }
    )


def test_second_client_counts_and_values_match_what_was_written(
    store, clickhouse_server, clickhouse_url
):
    db, q = db_of(clickhouse_url), clickhouse_server.client
    store.open_run(RunInfo(RUN, world_size=2))
    batch = grid(np.arange(50), np.arange(40), np.arange(2), seed=6)
    store.write_raw(RUN, batch)
    store.write_reduced(
        RUN,
        ValueBatch(
            step=batch.step[::2],
            metric_id=batch.metric_id[::2],
            value=batch.value[::2],
            n_ranks=np.full(2000, 2),
        ),
    )
    store.flush()
    assert (
        q(f"SELECT count(), countDistinct(run) FROM ({raw_cells_sql(db)}) FORMAT TSV")
        == "4000\t1\n"
    )
    assert q(f"SELECT count() FROM {db}.raw_vectors") == "100\n"  # 50 steps x 2 ranks
    # reduced values as vectors (schema v3): 2,000 float32 cells, none in the v1 row table
    cells = f"SELECT sum(length(values)) / 4 FROM {db}.reduced_vectors WHERE run = '{RUN}'"
    assert q(f"{cells} FORMAT TSV") == "2000\n"
    assert q(f"SELECT count() FROM {db}.reduced") == "0\n"
    view = second_client_view(q, db)
    want = pl.DataFrame(
        {"step": batch.step, "metric_id": batch.metric_id, "rank": batch.rank, "value": batch.value}
    ).sort("metric_id", "rank", "step")
    assert_frame_equal(view, want, check_dtypes=False)
    assert (
        q(
            f"SELECT argMax(status, ver), argMax(world_size, ver) FROM {db}.runs "
            f"WHERE run = '{RUN}' FORMAT TSV"
        )
        == "live\t2\n"
    )


@pytest.mark.parametrize("bad_run", ["x'; DROP TABLE raw; --", "a b", "", 'r"q'])
def test_run_names_with_quotes_are_rejected_before_any_sql(store, bad_run):
    with pytest.raises(InvalidInput, match="run name"):
        store.open_run(RunInfo(bad_run, world_size=1))
    for read in (
        lambda: store.series(bad_run, "loss"),
        lambda: store.steps(bad_run),
        lambda: store.at_step(bad_run, 0),
        lambda: store.metrics(bad_run),
    ):
        with pytest.raises(InvalidInput):
            read()


def test_metric_names_and_patterns_with_sql_are_only_data(store, clickhouse_server, clickhouse_url):
    db, q = db_of(clickhouse_url), clickhouse_server.client
    store.open_run(RunInfo(RUN, world_size=1))
    store.write_metrics(RUN, metric_dict(["loss", *EVIL]))
    store.write_reduced(
        RUN,
        ValueBatch(
            step=np.zeros(3, np.int64),
            metric_id=np.arange(3),
            value=np.array([1.0, 2.0, 3.0]),
            n_ranks=np.ones(3, np.int32),
        ),
    )
    store.flush()
    assert store.metrics(RUN)["name"].to_list() == ["loss", *EVIL]
    assert store.series(RUN, EVIL[0])["value"].to_list() == [2.0]
    assert store.series(RUN, EVIL[1])["value"].to_list() == [3.0]
    assert store.at_step(RUN, 0, "evil'); DROP*")["name"].to_list() == [EVIL[0]]
    for pattern in ["' OR '1'='1", "*' OR 1=1 --", "%(p0)s", "loss') OR ('1'='1"]:
        assert store.at_step(RUN, 0, pattern).height == 0
    with pytest.raises(NotFound):
        store.series(RUN, "nothing' OR '1'='1")
    # nothing dropped or added: the schema's 12 tables (v4 added detector_state)
    assert int(q(f"SELECT count() FROM system.tables WHERE database = '{db}'")) == 12
    # world 1: the three reduced values are stored as vectors (schema v3), no v1 rows
    cells = f"SELECT sum(length(values)) / 4 FROM {db}.reduced_vectors WHERE run = '{RUN}'"
    assert q(f"{cells} FORMAT TSV") == "3\n"
    assert q(f"SELECT count() FROM {db}.reduced") == "0\n"


def test_credentials_from_the_url_or_the_environment(clickhouse_server):
    user, password = clickhouse_server.credentials  # password has ' : @ / and space
    db = f"t_{uuid.uuid4().hex[:12]}"
    url = clickhouse_server.url(db, user=user, password=password)
    try:
        with ClickHouseStore(url) as s:  # creates the database
            s.open_run(RunInfo(RUN, world_size=1))
        env = {
            "CLICKHOUSE_HOST": clickhouse_server.host,
            "CLICKHOUSE_PORT": str(clickhouse_server.tcp_port),
            "CLICKHOUSE_USER": user,
            "CLICKHOUSE_PASSWORD": password,
            "CLICKHOUSE_DB": db,
        }
        for spec, e in [("clickhouse://", env), ("clickhouse:", {"STEPWATCH_CLICKHOUSE_URL": url})]:
            with ClickHouseStore(spec, env=e) as s:
                assert s.runs()["run"].to_list() == [RUN]
    finally:
        clickhouse_server.client(f"DROP DATABASE IF EXISTS {db}")


def test_connection_errors_are_store_errors_without_the_password(clickhouse_server):
    user, _ = clickhouse_server.credentials
    url = clickhouse_server.url("t_badpw", user=user, password="wrong-secret-pw")
    with pytest.raises(StoreError) as e:
        ClickHouseStore(url)
    assert "wrong-secret-pw" not in str(e.value) and f"{user}@" in str(e.value)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StoreError, match="connect failed"):
        ClickHouseStore(f"clickhouse://127.0.0.1:{port}/t_nobody")


def rank_stream(address: str, token: str, steps: int, names: list[str]) -> np.ndarray:
    """One rank (world_size 1) streaming `steps` vectors over the real wire protocol; returns
    the values sent, shape (steps, metrics), once the collector has acknowledged them all."""
    import queue

    import grpc

    from proto.v1 import telemetry_pb2 as pb
    from proto.v1 import telemetry_pb2_grpc as pbg

    values = np.random.default_rng(7).standard_normal((steps, len(names))).astype(np.float32)
    seq = iter(range(1, 10_000))

    def hdr(step: int) -> pb.FrameHeader:
        return pb.FrameHeader(run=RUN, rank=0, step=step, seq=next(seq))

    frames = [
        pb.ClientFrame(hello=pb.Hello(header=hdr(-1), world_size=1, protocol_version=1)),
        pb.ClientFrame(
            schema=pb.Schema(
                header=hdr(-1),
                schema_id=1,
                metrics=[
                    pb.MetricDef(
                        name=n, layer=-1, expert=-1, head=-1, stat="s", reduce=pb.REDUCE_MEAN
                    )
                    for n in names
                ],
            )
        ),
    ]
    for step in range(steps):
        frames.append(
            pb.ClientFrame(
                chunk=pb.StepChunk(
                    header=hdr(step),
                    schema_id=1,
                    offset=0,
                    total=len(names),
                    values=values[step].astype("<f4").tobytes(),
                )
            )
        )
        frames.append(
            pb.ClientFrame(
                end_of_step=pb.EndOfStep(
                    header=hdr(step), n_values=len(names), wall_time=float(step)
                )
            )
        )
    last_seq = frames[-1].end_of_step.header.seq
    outbox: queue.Queue = queue.Queue()
    for f in frames:
        outbox.put(f)
    with grpc.insecure_channel(address) as channel:
        responses = pbg.TelemetryStub(channel).Stream(
            iter(outbox.get, None), metadata=[("authorization", f"Bearer {token}")], timeout=60
        )
        for frame in responses:  # the stream stays open until acked
            assert frame.WhichOneof("kind") != "error", frame
            if frame.WhichOneof("kind") == "ack" and frame.ack.seq >= last_seq:
                break
        outbox.put(None)
        responses.cancel()
    return values


@pytest.mark.parametrize("target", ["clickhouse_url", "clickhouse_cluster_url"])
def test_collector_process_writes_a_run_into_clickhouse(request, target):
    """`python -m collector serve --store clickhouse://...` (docker-compose's command; the
    cluster's: docker-compose.cluster.yml), fed over the wire protocol: what it acknowledged is
    in ClickHouse, read back by a second store."""

    from collector.process import start_collector, stop_collector

    clickhouse_url = request.getfixturevalue(target)
    proc, address = start_collector(
        clickhouse_url, "--flush-interval", "0.1", env={"STEPWATCH_TOKEN": "t0ken"}
    )
    try:
        names = ["loss", "moe/layer00/expert000/act_rms", "attn/layer00/head00/max_logit"]
        sent = rank_stream(address, "t0ken", steps=5, names=names)
        with ClickHouseStore(clickhouse_url) as reader:  # acked = durable in ClickHouse
            for i, name in enumerate(names):
                got = reader.series(RUN, name)
                assert got["step"].to_list() == list(range(5))
                assert got["value"].to_list() == sent[:, i].tolist()
            assert reader.steps(RUN)["complete"].to_list() == [True] * 5
    finally:
        assert stop_collector(proc) == 0
