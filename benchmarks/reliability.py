"""Reliability benchmark: real failures against real processes, every (run, rank, step) counted.

    python -m benchmarks.reliability [--outage 60] [--only NAME ...]

Each scenario runs monitored tiny-model ranks (benchmarks/monitored_rank.py, one process per
rank, a real Monitor), a real collector process (`python -m collector serve`, with its spool)
and, where it says so, a real ClickHouse server (benchmarks/clickhouse_server.py), breaks
something on purpose, lets the run finish, and reads the store back: every step a rank
trained must be there once, with the exact loss the rank computed (float32 bits). It prints a
table (scenario, steps expected / stored / lost, wrong values, recovery time, the longest the
training thread waited on telemetry); README.md's reliability table is this output.

Recovery time: from the store coming back (or the collector restarting) until the collector's
spool was drained into the store ("store back after ..." in its log), or, for collector kills,
until the restarted collector listened again.

tests/integration/test_durability.py runs the same scenarios, shorter, as tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from collector.process import ROOT, CollectorStartError, start_collector, stop_collector

WAIT_S = 300.0  # fail-safe bound on any wait here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- ranks --------------------------------------------------------------------------------------
class Ranks:
    """W monitored ranks of one run, each its own process (benchmarks.monitored_rank)."""

    def __init__(
        self,
        target: str,
        run: str,
        world: int,
        steps: int,
        tmp: Path,
        *,
        step_sleep: float = 0.0,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.run, self.world, self.tmp = run, world, tmp
        self.outs = [tmp / f"{run}.rank{r}.json" for r in range(world)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.monitored_rank",
                    "--target",
                    target,
                    "--run",
                    run,
                    "--rank",
                    str(r),
                    "--world",
                    str(world),
                    "--steps",
                    str(steps),
                    "--step-sleep",
                    str(step_sleep),
                    "--out",
                    str(self.outs[r]),
                    *extra,
                ],
                cwd=ROOT,
                env=env,
                stdout=open(tmp / f"{run}.rank{r}.log", "w"),
                stderr=subprocess.STDOUT,
            )
            for r in range(world)
        ]

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait(self, timeout: float = WAIT_S) -> list[dict]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                raise
        for r, p in enumerate(self.procs):
            if p.returncode != 0:
                log = (self.tmp / f"{self.run}.rank{r}.log").read_text()[-3000:]
                raise RuntimeError(f"rank {r} exited {p.returncode}:\n{log}")
        return [json.loads(o.read_text()) for o in self.outs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# ---- counting ------------------------------------------------------------------------------------
@dataclass
class Tally:
    expected: int = 0  # (rank, step) pairs the ranks trained
    stored: int = 0  # of those, found in the store (raw train/loss of that rank)
    duplicated: int = 0  # rows beyond one per (rank, step) that a read returned
    wrong: int = 0  # stored, but not the loss the rank computed (bit for bit)
    unreduced: int = 0  # steps with no reduced train/loss
    longest_wait_s: float = 0.0  # longest step_end() of any rank
    missing: list[tuple[int, int]] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.expected - self.stored

    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.wrong == 0


def count(store_url: str, run: str, results: list[dict]) -> Tally:
    """Read the run back and compare it with what every rank trained."""
    import numpy as np

    from store import open_store

    t = Tally()
    with open_store(store_url) as store:
        for rank, res in enumerate(results):
            losses = np.asarray(res["losses"], dtype=np.float32)
            t.expected += losses.size
            t.longest_wait_s = max(t.longest_wait_s, res["longest_step_end_s"])
            df = store.series(run, "train/loss", rank=rank)
            steps = df["step"].to_numpy()
            t.duplicated += steps.size - np.unique(steps).size
            got = dict(zip(steps.tolist(), df["value"].to_numpy().tolist()))
            for step, loss in enumerate(losses.tolist()):
                if step not in got:
                    t.missing.append((rank, step))
                    continue
                t.stored += 1
                t.wrong += int(np.float32(got[step]).tobytes() != np.float32(loss).tobytes())
        reduced = set(store.series(run, "train/loss")["step"].to_list())
        n = max((len(r["losses"]) for r in results), default=0)
        t.unreduced = sum(1 for s in range(n) if s not in reduced)
    return t


# ---- the collector -------------------------------------------------------------------------------
class CollectorProc:
    """`python -m collector serve` on a fixed port (so it can be killed and restarted under
    the ranks' feet), with its spool in tmp; the log of every incarnation goes to one file."""

    def __init__(self, store_url: str, tmp: Path, *args: str) -> None:
        self.url, self.tmp, self.args = store_url, tmp, args
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = tmp / "collector.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        spool = ("--spool", str(self.tmp / "spool"))
        self.proc, _ = start_collector(
            self.url,
            "--insecure",
            "--port",
            str(self.port),
            *spool,
            "--flush-interval",
            "0.2",
            *self.args,
            log_path=self.log,
            timeout_s=120,
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        return stop_collector(self.proc, timeout_s=120)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, pattern: str, after: int = 0, timeout: float = WAIT_S) -> float:
        """Monotonic time when `pattern` first appears in the log past offset `after`."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            if rx.search(self.log_text()[after:]):
                return time.monotonic()
            time.sleep(0.1)
        raise TimeoutError(f"{pattern!r} not in the collector log within {timeout:.0f} s")


def clickhouse(tmp: Path):
    from benchmarks.clickhouse_server import ClickHouseServer, server_command

    command = server_command()
    if command is None:
        raise RuntimeError("clickhouse-server not found (scripts/system-deps.sh installs it)")
    server = ClickHouseServer(command, tmp / "clickhouse")
    server.start()
    return server


# ---- scenarios ------------------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    tally: Tally
    recovery_s: float | None
    note: str = ""
    extra: dict = field(default_factory=dict)


def store_outage(
    tmp: Path,
    *,
    outage_s: float,
    before_run: bool,
    steps: int,
    step_sleep: float,
    kill_collector: bool = False,
) -> Row:
    """ClickHouse killed (SIGKILL) for outage_s while a 2-rank run streams, then restarted on
    the same port. before_run: it is already down when the run starts (the run's first
    write, OpenRun, happens during the outage). kill_collector: the collector is killed -9
    in the middle of the outage and restarted, so what it acked then was only in its spool
    (the ranks never resend it): nothing acked may be missing afterwards."""
    server = clickhouse(tmp)
    url = server.url("reliability")
    col = CollectorProc(url, tmp)
    try:
        mark = len(col.log_text())
        if before_run:
            server.kill()
        ranks = Ranks(col.address, "outage", 2, steps, tmp, step_sleep=step_sleep)
        if not before_run:
            time.sleep(min(10.0, outage_s / 3))
            server.kill()
        if kill_collector:
            time.sleep(outage_s / 2)
            col.wait_log(r"spooling to", after=mark)
            col.kill()
            col.start()  # its store still down: it spools, replaying what the first one left
            mark = len(col.log_text())
            time.sleep(outage_s / 2)
        else:
            # the outage counts from the first write it refused: on a loaded machine the ranks
            # can take longer to start than the outage lasts, which would test nothing
            col.wait_log(r"spooling to", after=mark)
            time.sleep(outage_s)
        server.start_again()
        back = time.monotonic()
        drained = col.wait_log(r"store back after", after=mark)
        results = ranks.wait()
        assert col.stop() == 0
        tally = count(url, "outage", results)
    finally:
        if col.proc is not None and col.proc.poll() is None:
            col.kill()
        server.stop()
    when = "before the run starts" if before_run else "while the run streams"
    also = ", collector kill -9 in the middle" if kill_collector else ""
    return Row(f"ClickHouse down {outage_s:.0f} s {when}{also}", tally, drained - back)


def collector_kills(tmp: Path, *, kills: int, steps: int, step_sleep: float, seed: int = 0) -> Row:
    """kill -9 of the collector at random moments, `kills` times, during a 2-rank run with
    ClickHouse also killed and restarted once in the middle."""
    rng = random.Random(seed)
    server = clickhouse(tmp)
    url = server.url("reliability")
    col = CollectorProc(url, tmp)
    recoveries = []
    try:
        ranks = Ranks(col.address, "kills", 2, steps, tmp, step_sleep=step_sleep)
        for i in range(kills):
            time.sleep(rng.uniform(2.0, 6.0))
            if not ranks.running():
                break
            col.kill()
            if i == kills // 2:  # the store dies too, while the collector is down
                server.kill()
                time.sleep(rng.uniform(0.5, 2.0))
                t0 = time.monotonic()
                col.start()  # starts with its store down: spools
                recoveries.append(time.monotonic() - t0)
                time.sleep(rng.uniform(2.0, 4.0))
                server.start_again()
                continue
            time.sleep(rng.uniform(0.0, 1.0))
            t0 = time.monotonic()
            col.start()
            recoveries.append(time.monotonic() - t0)
        results = ranks.wait()
        col.wait_log(r"store back after")
        assert col.stop() == 0
        tally = count(url, "kills", results)
    finally:
        if col.proc is not None and col.proc.poll() is None:
            col.kill()
        server.stop()
    worst = max(recoveries) if recoveries else None
    return Row(
        f"collector kill -9 x{len(recoveries)}, ClickHouse killed once in the middle",
        tally,
        worst,
        "recovery: restart until listening (worst)",
    )


def spool_full(tmp: Path, *, steps: int, step_sleep: float, outage_s: float) -> Row:
    """ClickHouse down with a 1 MiB spool: the collector fills it, then refuses (UNAVAILABLE)
    instead of acking; the ranks hold their steps and resend once the store is back."""
    server = clickhouse(tmp)
    url = server.url("reliability")
    col = CollectorProc(url, tmp, "--spool-max-mb", "1")
    try:
        ranks = Ranks(col.address, "full", 2, steps, tmp, step_sleep=step_sleep)
        time.sleep(3.0)
        server.kill()
        mark = len(col.log_text())
        col.wait_log(r"spool full", after=mark)
        time.sleep(outage_s)
        server.start_again()
        back = time.monotonic()
        drained = col.wait_log(r"store back after", after=mark)
        results = ranks.wait()
        assert col.stop() == 0
        tally = count(url, "full", results)
        refused = col.log_text().count("spool full")
    finally:
        if col.proc is not None and col.proc.poll() is None:
            col.kill()
        server.stop()
    return Row(
        "spool full (1 MiB) while ClickHouse is down",
        tally,
        drained - back,
        f"refused at the bound ({refused} log line(s)), nothing acked beyond it",
    )


def sigterm_dead_store(tmp: Path, *, steps: int) -> Row:
    """SIGTERM while ClickHouse is dead and a run streams: the collector spools what it holds
    and exits within its stop bound; the next collector drains it."""
    server = clickhouse(tmp)
    url = server.url("reliability")
    col = CollectorProc(url, tmp, "--stop-timeout", "10")
    try:
        ranks = Ranks(col.address, "term", 2, steps, tmp, step_sleep=0.05)
        time.sleep(3.0)
        server.kill()
        time.sleep(3.0)
        t0 = time.monotonic()
        rc = col.stop()
        exit_s = time.monotonic() - t0
        server.start_again()
        col.start()
        results = ranks.wait()
        col.wait_log(r"store back after")
        assert col.stop() == 0
        tally = count(url, "term", results)
    finally:
        if col.proc is not None and col.proc.poll() is None:
            col.kill()
        server.stop()
    return Row(
        "SIGTERM with ClickHouse dead (stop bound 10 s)",
        tally,
        None,
        f"exited rc={rc} in {exit_s:.1f} s",
        {"rc": rc, "exit_s": exit_s},
    )


def parquet_overlap(tmp: Path, *, steps: int) -> Row:
    """A second collector on the same Parquet directory while the first still runs: with a
    short --lock-timeout it refuses to start, naming the holder; with a long one it waits for
    the lock, the first is SIGTERMed, and the second takes over its port and the ranks."""
    url = f"parquet:{tmp / 'store'}"
    col = CollectorProc(url, tmp)
    ranks = Ranks(col.address, "overlap", 2, steps, tmp, step_sleep=0.05)
    try:
        time.sleep(3.0)
        try:
            start_collector(
                url, "--insecure", "--spool", str(tmp / "other-spool"), "--lock-timeout", "1"
            )
            refused = ""
        except CollectorStartError as e:
            refused = str(e)
        started: list = []
        log = tmp / "next.log"
        nxt = threading.Thread(
            target=lambda: started.append(
                start_collector(
                    url,
                    "--insecure",
                    "--port",
                    str(col.port),
                    "--spool",
                    str(tmp / "spool"),
                    "--lock-timeout",
                    "60",
                    log_path=log,
                    timeout_s=120,
                )
            )
        )
        nxt.start()
        deadline = time.monotonic() + WAIT_S
        while "waiting up to 60 s" not in (log.read_text() if log.exists() else ""):
            if time.monotonic() > deadline:
                raise TimeoutError("the second collector never waited for the lock")
            time.sleep(0.1)
        assert col.stop() == 0  # the first one goes ...
        gone = time.monotonic()
        nxt.join(WAIT_S)
        waited = time.monotonic() - gone  # ... and the second one listens
        col.proc = started[0][0]
        results = ranks.wait()
        assert col.stop() == 0
        tally = count(url, "overlap", results)
    finally:
        ranks.kill()
        if col.proc is not None and col.proc.poll() is None:
            col.kill()
    return Row(
        "second collector on one Parquet store: refused, then waits for the lock",
        tally,
        waited,
        "recovery: first exits until second listens",
        {"refused": refused},
    )


SCENARIOS: dict[str, Callable[[Path, argparse.Namespace], Row]] = {
    "outage": lambda tmp, a: store_outage(
        tmp, outage_s=a.outage, before_run=False, steps=int((a.outage + 30) / 0.25), step_sleep=0.2
    ),
    "first-seen": lambda tmp, a: store_outage(
        tmp, outage_s=15, before_run=True, steps=200, step_sleep=0.1
    ),
    "outage-kill": lambda tmp, a: store_outage(
        tmp, outage_s=20, before_run=False, steps=240, step_sleep=0.1, kill_collector=True
    ),
    "kills": lambda tmp, a: collector_kills(tmp, kills=5, steps=400, step_sleep=0.1),
    "spool-full": lambda tmp, a: spool_full(tmp, steps=300, step_sleep=0.05, outage_s=10),
    "sigterm": lambda tmp, a: sigterm_dead_store(tmp, steps=200),
    "overlap": lambda tmp, a: parquet_overlap(tmp, steps=200),
}


def table(rows: list[Row]) -> str:
    out = [
        "| scenario | steps expected | stored | lost | wrong | recovery | longest wait |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.tally
        rec = "-" if r.recovery_s is None else f"{r.recovery_s:.1f} s"
        note = f" ({r.note})" if r.note else ""
        out.append(
            f"| {r.scenario}{note} | {t.expected} | {t.stored} | {t.lost} | {t.wrong} | "
            f"{rec} | {t.longest_wait_s:.2f} s |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--outage", type=float, default=60.0, help="seconds ClickHouse stays down")
    ap.add_argument("--only", nargs="*", choices=list(SCENARIOS), default=list(SCENARIOS))
    args = ap.parse_args(argv)
    import logging

    logging.getLogger("clickhouse_driver").setLevel(logging.ERROR)  # restart polls: refused
    rows = []
    for name in args.only:
        with tempfile.TemporaryDirectory(prefix=f"reliability-{name}-") as d:
            t0 = time.monotonic()
            row = SCENARIOS[name](Path(d), args)
            rows.append(row)
            print(
                f"{name}: lost {row.tally.lost} of {row.tally.expected}, "
                f"{time.monotonic() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    print(table(rows))
    return 0 if all(r.tally.ok() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
