"""Durability against real processes: a collector (`python -m collector serve`, with its spool),
a ClickHouse server of the test's own (it is killed and restarted), monitored tiny-model ranks
(benchmarks/monitored_rank.py, a real Monitor each). Every (run, rank, step) a rank trained is
looked for in the store: counted stored, missing, duplicated, and its loss compared bit for
bit (benchmarks/reliability.py's scenarios, shorter here; the 60 s outage is the benchmark).

Each of these failed before the spool: a run first seen while ClickHouse was down stored
nothing; a collector restarted while its store was down could not start; a SIGTERM with a dead
store took minutes; a second collector on a Parquet directory failed its writes."""

from __future__ import annotations

import os
import random
import re
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks import reliability as rel
from benchmarks.clickhouse_server import server_command
from collector.process import start_collector, stop_collector
from collector.spool import scan
from store import open_store
from tests.collector.conftest import RawClient, mdef

pytestmark = pytest.mark.skipif(server_command() is None, reason="needs clickhouse-server")
WAIT_S = 120.0


def assert_complete(row: rel.Row) -> None:
    t = row.tally
    assert (t.lost, t.duplicated, t.wrong) == (0, 0, 0), (row.scenario, t.missing[:10])
    assert t.expected > 0 and t.unreduced == 0


def test_a_run_first_seen_while_clickhouse_is_down_is_stored_whole(tmp_path):
    """Before: OpenRun was tried 3 times in 0.15 s, then failed for good: 0 of 200 steps."""
    row = rel.store_outage(tmp_path, outage_s=8, before_run=True, steps=80, step_sleep=0.1)
    assert_complete(row)


def test_clickhouse_down_while_two_ranks_stream_and_the_collector_dies_in_the_outage(tmp_path):
    """ClickHouse down 12 s mid-run, the collector kill -9'd and restarted in the middle of it:
    what it acked then was only in its spool. 0 gaps, 0 duplicates, and the training thread
    never waited on telemetry beyond its bound (block policy: block_timeout_s = 1 s)."""
    row = rel.store_outage(
        tmp_path, outage_s=12, before_run=False, steps=150, step_sleep=0.1, kill_collector=True
    )
    assert_complete(row)
    assert row.tally.longest_wait_s < 1.0 + 4.0  # generous margin over the bound


@pytest.mark.slow
def test_collector_kill_9_at_random_moments_with_clickhouse_killed_once(tmp_path):
    row = rel.collector_kills(tmp_path, kills=4, steps=250, step_sleep=0.1, seed=7)
    assert_complete(row)


@pytest.mark.slow
def test_a_full_spool_refuses_instead_of_acking_and_recovers(tmp_path):
    row = rel.spool_full(tmp_path, steps=200, step_sleep=0.05, outage_s=5)
    assert_complete(row)
    log = (tmp_path / "collector.log").read_text()
    assert "spool full" in log and "reconnect with backoff" in log


def test_sigterm_with_a_dead_store_exits_within_its_bound(tmp_path):
    """Before: > 120 s with a dead store (and 2.76 GB RSS while shutting down)."""
    row = rel.sigterm_dead_store(tmp_path, steps=120)
    assert row.extra["rc"] == 0 and row.extra["exit_s"] < 10 + 20  # bound 10 s, margin
    assert_complete(row)


def test_sigterm_without_a_spool_exits_within_its_bound_and_says_what_was_not_durable(
    tmp_path,
):
    server = rel.clickhouse(tmp_path)
    try:
        proc, address = start_collector(
            server.url("t"),
            "--insecure",
            "--no-spool",
            "--stop-timeout",
            "5",
            log_path=tmp_path / "c.log",
        )
        c = RawClient(address, "nospool", 0, 1)
        c.schema(1, [mdef("x")])
        c.step(0, 1, [1.0])
        c.wait_ack(timeout=WAIT_S)
        server.kill()
        for step in range(1, 20):
            c.step(step, 1, [float(step)])
        time.sleep(2.0)
        t0 = time.monotonic()
        rc = stop_collector(proc, timeout_s=60)
        assert time.monotonic() - t0 < 5 + 20
        assert rc == 1  # not everything received became durable (and none of it was acked)
        assert max(a.seq for a in c.acks) == 3
        assert "never acknowledged" in (tmp_path / "c.log").read_text()
        c.channel.close()
    finally:
        server.stop()


def test_a_second_collector_on_a_parquet_store_waits_for_the_lock_or_refuses(tmp_path):
    """Before: a restart overlapping a draining collector failed its writes ("being written
    by another store instance") and lost data."""
    row = rel.parquet_overlap(tmp_path, steps=150)
    assert re.search(r"held by another process \(pid \d+\)", row.extra["refused"])
    assert_complete(row)


def test_a_damaged_spool_record_loses_only_itself_and_is_reported(tmp_path):
    server = rel.clickhouse(tmp_path)
    url = server.url("t")
    col = rel.CollectorProc(url, tmp_path)
    try:
        server.kill()
        c = RawClient(col.address, "damaged", 0, 1)
        c.schema(1, [mdef("x")])
        for step in range(30):
            c.step(step, 1, [float(step)])
        c.wait_ack(timeout=WAIT_S)  # all acked: in the spool only
        col.kill()
        c.cancel()
        segs = sorted((tmp_path / "spool").glob("*.spool"))
        data = bytearray(segs[-1].read_bytes())
        records = [r for r in scan(bytes(data)) if len(r) == 4]
        lo, hi = records[12][:2]  # a step's record, in the middle
        data[(lo + hi) // 2] ^= 0x5A
        segs[-1].write_bytes(bytes(data[: len(data) - 7]))  # and the last one torn
        server.start_again()
        col.start()
        col.wait_log(r"store back after")
        assert col.stop() == 0
        log = col.log_text()
        assert "damaged bytes skipped" in log and "torn last record" in log
        with open_store(url) as store:
            got = store.series("damaged", "x")["step"].to_list()
        lost = sorted(set(range(30)) - set(got))
        assert len(lost) == 2 and lost[-1] == 29  # the damaged record's step and the torn one
        assert len(got) == 28
    finally:
        if col.proc is not None and col.proc.poll() is None:
            col.kill()
        server.stop()


def test_kill_9_during_parquet_writes_leaves_no_partial_file_under_a_final_name(tmp_path):
    url = f"parquet:{tmp_path / 'store'}"
    col = rel.CollectorProc(url, tmp_path, "--flush-interval", "0.05")
    rng = random.Random(3)
    n = 200_000  # ~800 KB per step: a flush is mid-write much of the time
    names = [mdef(f"v/{i}") for i in range(n)]
    schema_parts = [names[i : i + 8000] for i in range(0, n, 8000)]
    values = np.arange(8000, dtype=np.float32)
    try:
        for round_ in range(5):
            c = RawClient(col.address, "big", 0, 1, seq=0 if round_ == 0 else 10**6 * round_)
            for sid, part in enumerate(schema_parts, start=1):
                c.schema(sid, part)
            stop = time.monotonic() + rng.uniform(1.0, 2.5)
            step = 0
            while time.monotonic() < stop:
                for sid in range(1, len(schema_parts) + 1):
                    c.chunk(step, sid, values)
                c.end_of_step(step, n)
                step += 1
                time.sleep(0.01)
            col.kill()
            c.cancel()
            for dirpath, _, files in os.walk(tmp_path / "store"):
                for f in files:
                    path = Path(dirpath) / f
                    if f.endswith(".parquet"):
                        pq.read_metadata(path)  # complete: its footer is there
                    else:
                        assert f.endswith((".tmp", ".lock")), path
            col.start()
        c = RawClient(col.address, "big", 0, 1, seq=10**7)  # the next writer of the run ...
        c.schema(1, schema_parts[0])
        c.wait_ack(timeout=WAIT_S)
        c.cancel()
        assert col.stop() == 0
        leftovers = [f for _, _, fs in os.walk(tmp_path / "store") for f in fs if ".tmp" in f]
        assert leftovers == []  # ... removed what the killed ones left being written
    finally:
        if col.proc is not None and col.proc.poll() is None:
            col.kill()


@pytest.mark.slow
def test_1030_streams_cut_without_goodbye_then_real_trainers_store_everything(tmp_path):
    """Before: after 1,030 streams cut without goodbye every new run was refused (max_runs
    1024), and two real trainers ran to rc 0 with 0 steps stored."""
    url = f"parquet:{tmp_path / 'store'}"
    col = rel.CollectorProc(url, tmp_path)
    try:

        def junk(k: int) -> None:
            for i in range(k, 1030, 8):
                c = RawClient(col.address, f"junk{i}", 0, 1)
                c.schema(1, [mdef("x")])
                c.step(0, 1, [1.0])
                c.expect("welcome")
                c.cancel()

        threads = [threading.Thread(target=junk, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        ranks = rel.Ranks(col.address, "after-junk", 2, 30, tmp_path)
        results = ranks.wait()
        assert col.stop() == 0
        assert_complete(rel.Row("junk", rel.count(url, "after-junk", results), None))
    finally:
        if col.proc is not None and col.proc.poll() is None:
            col.kill()


def test_metric_dictionaries_stay_inside_their_byte_budget(tmp_path):
    """Before: 4.8 M names took the collector to 1.76 GiB, outside every bound. With a
    64 MiB dictionary budget the names that fit register, the rest are refused, and the
    collector's memory grows by about the budget, not by the names sent."""
    url = f"parquet:{tmp_path / 'store'}"
    proc, address = start_collector(
        url, "--insecure", "--no-spool", "--max-dictionary-mb", "64", log_path=tmp_path / "c.log"
    )
    try:
        c = RawClient(address, "names", 0, 1)
        c.expect("welcome")
        before = _rss(proc.pid)
        refused = None
        for part in range(40):  # 320,000 names offered, ~60,000 fit
            c.schema(part + 1, [mdef(f"m/{part:03d}/{i:05d}/x") for i in range(8000)])
            c.sent.clear()
            try:
                c.wait_ack(timeout=WAIT_S)
            except Exception as e:  # noqa: BLE001 - the refusal ends the stream
                refused = e
                break
        assert refused is not None and "max_dictionary_bytes" in str(refused)
        grown = _rss(proc.pid) - before
        assert grown < 3 * (64 << 20), grown  # margin: allocator slack, transient copies
    finally:
        assert stop_collector(proc) == 0


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
