"""Ingest end to end: R simulated ranks -> real collector -> store, against the raw ceiling.

    python -m benchmarks.ingest --store URL [--metrics-per-step 6000000] [--steps 16]
                                [--ranks 4096] [--procs 2] [--warmup 2] [--depth 32]
                                [--flush-interval 2.0] [--no-flat] [--agents N]
                                [--max-stream-messages PER_S]

P load-generator processes (benchmarks/loadgen.py) play R ranks, each rank with the real hooks
sender protocol (on asyncio: benchmarks/channel_sender.py) and its own gRPC stream, sending
benchmarks/workload.py's per-(layer, expert, stat) vectors; the collector is the real one
(`collector.process.start_collector`: barrier, reduction, online detectors, store writes, acks
after flush); with --agents N the ranks stream through N real node agents
(benchmarks/agents.py, collector/agent.py): N streams at the collector. Sustained rate: steps
after the warm-up (which pays for connections and schema registration) over the time until the last of
them is acknowledged, i.e. durable.

Measured in the same run, after the pipeline: the raw ceiling, the same rows the store keeps for
the same number of steps (one float32 vector per rank and step, plus the reduced rows) written
straight to the backend - one clickhouse-driver columnar numpy INSERT per table and step into
tables of the same DDL, or one pyarrow Parquet file per step (zstd). Every rate is printed
absolute and as a ratio to it. As a reference, one step is also written as one row per value
(rank, step, metric_id, value), the layout of per-key trackers (`--no-flat` skips it). The
collector's CPU is split into connect (streams opened, schemas registered: once per run) and
per step after that. The store is then checked to hold exactly the expected rows (distinct natural keys). Last line:

    metrics/s=<float> ratio_to_raw=<float>
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks.workload import Values, Workload
from collector.process import start_collector, stop_collector

ROOT = Path(__file__).resolve().parents[1]
# A rank's unacknowledged steps (the load generator's flow control). A real rank's buffer is
# 1,024 steps / 256 MiB (hooks/config.py), so it never waits at these rates; 32 steps of 1,460
# or 11,715 float32 are 0.2-1.5 MB. With 8 the window was the limit, not the collector: at
# 512 streams acks arrive once a flush, and a rank with 8 steps in flight waited for them
# (ClickHouse 2.33 -> 2.94 steps/s at 32); at 4,096 a deeper window also lets the senders
# batch what waits (FrameBatch), 1.0 -> 1.7 steps/s (2026-12-01, 30 steps).
DEPTH = 32
RUN = "bench-ingest"
STAGE_RE = re.compile(r"writer stage seconds: (.*)")
RECEIVE_RE = re.compile(r"ingest seconds: receive=([\d.]+)(?: schemas=([\d.]+))?")
CLIP_RE = re.compile(r"clip update v1 on the wire ([\d.]+) ms")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        model = cpu
    return f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def proc_mem_cpu(pid: int) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds) of a live process, from /proc."""
    hwm = 0.0
    for ln in open(f"/proc/{pid}/status"):
        if ln.startswith("VmHWM:"):
            hwm = int(ln.split()[1]) / 1024
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return hwm, cpu


# ---- the pipeline ------------------------------------------------------------------------------
def start_agents(upstream: str, agents: int, procs: int, tmp: Path) -> tuple[list, list[str]]:
    """`agents` node agents in `procs` agent-host processes (benchmarks/agents.py), each a
    real NodeAgent on a unix socket; returns (processes, the agents' targets in order)."""
    hosts, targets = [], []
    bounds = np.linspace(0, agents, procs + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        args = dict(upstream=upstream, dir=str(tmp), first=int(lo), count=int(hi - lo))
        hosts.append(
            subprocess.Popen(
                [sys.executable, "-m", "benchmarks.agents", json.dumps(args)],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    for h in hosts:
        line = json.loads(h.stdout.readline() or '{"error": "agent host died"}')
        if "ready" not in line:
            raise RuntimeError(f"agent host: {line}")
        targets += line["ready"]
    return hosts, targets


def stop_agents(hosts: list) -> dict:
    """Stop the agent hosts; their counters summed, and their CPU seconds after ready."""
    out: dict = {"cpu_s": 0.0}
    for h in hosts:
        h.stdin.write("stop\n")
        h.stdin.flush()
        line = json.loads(h.stdout.readline() or '{"error": "agent host died"}')
        if "result" not in line:
            raise RuntimeError(f"agent host: {line}")
        out["cpu_s"] += line["cpu_s"]
        for k, v in line["result"].items():
            out[k] = out.get(k, 0) + v
        h.wait(timeout=60)
    return out


def play(
    url: str,
    w: Workload,
    steps: int,
    procs: int,
    depth: int,
    flush_s: float,
    tmp: Path,
    agents: int = 0,
    max_messages: float | None = None,
) -> dict:
    log_path = tmp / "collector.log"
    collector, address = start_collector(
        url,
        "--insecure",
        "--flush-interval",
        str(flush_s),
        *([] if max_messages is None else ["--max-stream-messages", str(max_messages)]),
        log_path=log_path,
    )
    gens: list[subprocess.Popen] = []
    hosts: list[subprocess.Popen] = []
    agent_stats: dict = {}
    try:
        via: dict = {}
        if agents:
            hosts, targets = start_agents(address, agents, procs, tmp)
            via = dict(agent_targets=targets, ranks_per_agent=-(-w.world // agents))
        bounds = np.linspace(0, w.world, procs + 1).astype(int)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            args = dict(
                target=address,
                run=RUN,
                world=w.world,
                metrics_per_rank=w.metrics_per_rank,
                n_layers=w.n_layers,
                n_experts=w.n_experts,
                spike_step=w.spike_step,
                death_step=w.death_step,
                rank_lo=int(lo),
                rank_hi=int(hi),
                steps=steps,
                depth=depth,
                connect_timeout_s=600,
                **via,
            )
            gens.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.loadgen", json.dumps(args)],
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        t0 = time.perf_counter()
        for g in gens:
            line = json.loads(g.stdout.readline() or '{"error": "load generator died"}')
            if "ready" not in line:
                raise RuntimeError(f"load generator: {line}")
        connect_s = time.perf_counter() - t0
        _, connect_cpu_s = proc_mem_cpu(collector.pid)  # schema registration, streams
        for g in gens:
            g.stdin.write("go\n")
            g.stdin.flush()
        results = []
        for g in gens:
            line = json.loads(g.stdout.readline() or '{"error": "load generator died"}')
            if "result" not in line:
                raise RuntimeError(f"load generator: {line}")
            results.append(line["result"])
            g.wait(timeout=120)
        rss_mib, cpu_s = proc_mem_cpu(collector.pid)
        if hosts:
            agent_stats = stop_agents(hosts)
    finally:
        for g in gens + hosts:
            if g.poll() is None:
                g.kill()
        stop_collector(collector, timeout_s=300)
    text = log_path.read_text()
    stages = dict(
        (k, float(v)) for k, v in (kv.split("=") for kv in STAGE_RE.findall(text)[-1].split())
    )
    receive, schemas = RECEIVE_RE.findall(text)[-1]
    stages["receive"], stages["schemas"] = float(receive), float(schemas or 0.0)
    return {
        "results": results,
        "collector_rss_mib": rss_mib,
        "collector_cpu_s": cpu_s,
        "collector_connect_cpu_s": connect_cpu_s,
        "stages": stages,
        "connect_s": connect_s,
        "clip_wire_ms": [float(x) for x in CLIP_RE.findall(text)],
        "collector_streams": streams_seen(text),
        "collector_frames": frames_seen(text),
        "agents": agent_stats,
    }


def streams_seen(log: str) -> dict[str, int]:
    """Streams the collector opened, by kind, from its last `stats` line (logged at stop)."""
    lines = [ln for ln in log.splitlines() if " stats " in ln]
    kv = dict(re.findall(r"(\w+)=(\d+)", lines[-1].split(" stats ", 1)[1])) if lines else {}
    return {k: int(kv.get(k, 0)) for k in ("streams_opened", "mux_streams_opened")}


def frames_seen(log: str) -> dict[str, int]:
    """Frames in and acks out, from the collector's last `stats` line."""
    lines = [ln for ln in log.splitlines() if " stats " in ln]
    kv = dict(re.findall(r"(\w+)=(\d+)", lines[-1].split(" stats ", 1)[1])) if lines else {}
    keys = ("frames", "frames_duplicate", "acks_sent", "batches", "mux_batches")
    return {k: int(kv.get(k, 0)) for k in keys}


# ---- what the store holds --------------------------------------------------------------------
def clickhouse_client(url: str, database: str | None = None):
    from clickhouse_driver import Client

    from store.clickhouse.config import ClickHouseConfig

    c = ClickHouseConfig.from_url(url)
    return Client(
        c.host,
        port=c.port,
        user=c.user,
        password=c.password,
        database=database or c.database,
        secure=c.secure,
        send_receive_timeout=600,
    ), c


def stored(url: str, tmp: Path) -> dict:
    """Distinct natural keys in raw (cells: (rank, step, metric_id) over every stored vector
    and its layout) and reduced, and bytes on disk per stored value."""
    if url.startswith("clickhouse"):
        client, c = clickhouse_client(url)
        db = f"`{c.database}`"
        steps = [
            s
            for (s,) in client.execute(
                f"SELECT DISTINCT step FROM {db}.raw_vectors WHERE run = %(r)s", {"r": RUN}
            )
        ]
        out = {
            "raw": sum(  # distinct ids over the layouts of a rank-step; a step at a time (one
                # query over 30 steps of 512 x 11,715 went past the server's 3.7 GiB a query)
                client.execute(
                    f"SELECT sum(n) FROM (SELECT uniqExactArray(ids) AS n FROM (SELECT DISTINCT "
                    f"run, rank, step, layout FROM {db}.raw_vectors WHERE run = %(r)s AND "
                    f"step = %(s)s) ANY INNER JOIN (SELECT run, layout, any(ids) AS ids FROM "
                    f"{db}.raw_layouts GROUP BY run, layout) USING (run, layout) GROUP BY rank)",
                    {"r": RUN, "s": s},
                )[0][0]
                or 0
                for s in steps
            ),
            "reduced": client.execute(  # distinct ids over the layouts of a step
                f"SELECT sum(n) FROM (SELECT uniqExactArray(ids) AS n FROM (SELECT DISTINCT run, "
                f"step, layout FROM {db}.reduced_vectors WHERE run = %(r)s) ANY INNER JOIN "
                f"(SELECT run, layout, any(ids) AS ids FROM {db}.raw_layouts GROUP BY run, layout) "
                f"USING (run, layout) GROUP BY step)",
                {"r": RUN},
            )[0][0]
            or 0,
        }
        nbytes = client.execute(
            "SELECT sum(bytes_on_disk) FROM system.parts WHERE active AND "
            "database = %(d)s AND table IN ('raw_vectors', 'raw_layouts', "
            "'reduced_vectors')",
            {"d": c.database},
        )[0][0]
        client.disconnect()
    else:
        import polars as pl

        root = Path(url.split(":", 1)[1]) / RUN
        files = {
            t: [str(f) for f in sorted((root / t).glob("*.parquet"))]
            for t in ("raw_vectors", "layouts", "reduced_vectors")
        }
        nbytes = sum(os.path.getsize(f) for fs in files.values() for f in fs)
        ids = {
            h: np.frombuffer(b, "<i4")
            for f in files["layouts"]
            for h, b in pl.read_parquet(f).select("layout", "ids").iter_rows()
        }

        def distinct(table: str, by: list[str]) -> int:
            """Distinct ids over the layouts of each `by` group of the table's vectors."""
            if not files[table]:
                return 0
            keys = pl.scan_parquet(files[table]).select(*by, "layout").unique().collect()
            return sum(
                len(set(np.concatenate([ids[h] for h in hs]).tolist()))
                if len(hs) > 1
                else ids[hs[0]].size
                for hs in keys.group_by(*by).agg(pl.col("layout"))["layout"]
            )

        out = {
            "raw": distinct("raw_vectors", ["rank", "step"]),
            "reduced": distinct("reduced_vectors", ["step"]),
        }
    out["bytes_per_value"] = nbytes / max(1, out["raw"] + out["reduced"])
    return out


# ---- the raw ceiling ----------------------------------------------------------------------------
def step_rows(w: Workload, values: Values, s: int) -> tuple[dict, dict]:
    """The raw and reduced rows of step s as the store keeps them (ids by workload order): one
    raw vector row per rank (float32 bytes, layout = hash of the rank's ids; the layouts
    themselves are written once per run, so they are not part of a step's rows)."""
    from store.vectors import layout_hash

    ids = [w.global_ids(r).astype(np.int32) for r in range(w.world)]
    blobs = np.empty(w.world, object)
    blobs[:] = [values.step(r, s).astype("<f4").tobytes() for r in range(w.world)]
    raw = {
        "rank": np.arange(w.world, dtype=np.int32),
        "step": np.full(w.world, s, np.int64),
        "layout": np.array([layout_hash(i) for i in ids], np.uint64),
        "values": blobs,
    }
    uniq = np.unique(np.concatenate(ids))
    red_blob = np.empty(1, object)
    red_blob[0] = np.ones(uniq.size, "<f4").tobytes()
    red = {  # one reduced vector (store/reduced.py): every id reduced over every rank
        "step": np.full(1, s, np.int64),
        "layout": np.array([layout_hash(uniq)], np.uint64),
        "n_ranks": np.full(1, w.world, np.int32),
        "source": np.full(1, -1, np.int32),
        "values": red_blob,
    }
    return raw, red


def ceiling(url: str, w: Workload, steps: int, tmp: Path) -> float:
    """Seconds to write `steps` steps of rows straight to the backend: one columnar numpy
    INSERT per table and step into tables of the store's DDL, or one zstd Parquet file."""
    values, elapsed = Values(w), 0.0
    if url.startswith("clickhouse"):
        from store.clickhouse import ClickHouseStore

        _, c = clickhouse_client(url)
        db = f"{c.database}_ceiling_{uuid.uuid4().hex[:6]}"
        ClickHouseStore(url.rsplit("/", 1)[0] + "/" + db).close()  # same DDL, fresh tables
        client, _ = clickhouse_client(url, db)
        try:
            for s in range(steps):
                for table, cols in zip(("raw_vectors", "reduced_vectors"), step_rows(w, values, s)):
                    n = cols["step"].size
                    cols = {
                        **cols,
                        "run": np.full(n, RUN, object),
                        "ver": np.full(n, time.time_ns(), np.uint64),
                    }
                    names = list(cols)
                    t0 = time.perf_counter()
                    client.execute(
                        f"INSERT INTO `{db}`.`{table}` "
                        f"({', '.join(f'`{k}`' for k in names)}) VALUES",
                        [cols[k] for k in names],
                        columnar=True,
                        settings={"use_numpy": True},
                    )
                    elapsed += time.perf_counter() - t0
        finally:
            client.execute(f"DROP DATABASE IF EXISTS `{db}`")
            client.disconnect()
        return elapsed
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp / "ceiling"
    out.mkdir()
    for s in range(steps):
        for table, cols in zip(("raw_vectors", "reduced_vectors"), step_rows(w, values, s)):
            t0 = time.perf_counter()
            pq.write_table(
                pa.table(cols),
                out / f"{table}-{s}.parquet",
                compression="zstd",
                row_group_size=65_536,
            )
            elapsed += time.perf_counter() - t0
    return elapsed


def flat_ceiling(url: str, w: Workload, tmp: Path) -> float:
    """Seconds to write ONE step as one row per value (rank, step, metric_id, value): the
    layout of per-key trackers and of this store before raw values became vectors. A
    reference for what the vector layout buys, printed beside the real ceiling."""
    values = Values(w)
    ids = np.concatenate([w.global_ids(r).astype(np.int32) for r in range(w.world)])
    vals = values.steps(np.arange(w.world), 0).astype(np.float32).reshape(-1)
    ranks = np.repeat(np.arange(w.world, dtype=np.int32), w.values_per_rank)
    cols = {"step": np.zeros(ids.size, np.int64), "metric_id": ids, "rank": ranks, "value": vals}
    if url.startswith("clickhouse"):
        from store.clickhouse import ClickHouseStore

        _, c = clickhouse_client(url)
        db = f"{c.database}_flat_{uuid.uuid4().hex[:6]}"
        ClickHouseStore(url.rsplit("/", 1)[0] + "/" + db).close()  # its v1 `raw` table
        client, _ = clickhouse_client(url, db)
        try:
            cols = {
                "run": np.full(ids.size, RUN, object),
                **cols,
                "ver": np.full(ids.size, time.time_ns(), np.uint64),
            }
            t0 = time.perf_counter()
            client.execute(
                f"INSERT INTO `{db}`.`raw` ({', '.join(f'`{k}`' for k in cols)}) VALUES",
                list(cols.values()),
                columnar=True,
                settings={"use_numpy": True},
            )
            return time.perf_counter() - t0
        finally:
            client.execute(f"DROP DATABASE IF EXISTS `{db}`")
            client.disconnect()
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    pq.write_table(pa.table(cols), tmp / "flat.parquet", compression="zstd", row_group_size=1 << 20)
    return time.perf_counter() - t0


# ---- the benchmark ------------------------------------------------------------------------------
def run(
    url: str,
    total: int,
    steps: int,
    ranks: int,
    procs: int = 2,
    warmup: int = 2,
    depth: int = DEPTH,
    flush_s: float = 2.0,
    ceiling_steps: int | None = None,
    flat: bool = True,
    agents: int = 0,
    max_messages: float | None = None,
) -> dict:
    """max_messages: the collector's --max-stream-messages (pacing); None: its default."""
    if steps <= warmup:
        raise SystemExit(f"--steps ({steps}) must exceed --warmup ({warmup})")
    spike = 12 if steps >= 16 else 10**9  # MaxAbsSpike needs 10 of history
    w = Workload.for_total(total, ranks, spike_step=spike, death_step=steps // 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if url.startswith("parquet:") and not url[8:]:
            url = f"parquet:{tmp / 'store'}"
        p = play(url, w, steps, min(procs, ranks), depth, flush_s, tmp, agents, max_messages)
        held = stored(url, tmp)
        c_steps = ceiling_steps or min(steps, 5)
        ceil_s = ceiling(url, w, c_steps, tmp)
        flat_s = flat_ceiling(url, w, tmp) if flat else None
    res = p["results"]
    per_step = w.values_per_rank * w.world
    t_w = min(r["submitted_at"][warmup] for r in res)
    t_end = max(r["t_end"] for r in res)
    sps = (steps - warmup) / (t_end - t_w)
    ceil_mps = c_steps * per_step / ceil_s
    rank_steps = steps * w.world
    client_cpu = sum(r["cpu_s"] - r["gen_s"] for r in res) / rank_steps
    steady_cpu = p["collector_cpu_s"] - p["collector_connect_cpu_s"]
    out = {
        "store": url.split(":", 1)[0],
        "metrics_per_step": per_step,
        "ranks": w.world,
        "metrics_per_rank": w.values_per_rank,
        "reduced_per_step": w.distinct_metrics(),
        "steps": steps,
        "warmup": warmup,
        "procs": len(res),
        "steps_per_s": sps,
        "metrics_per_s": sps * per_step,
        "ceiling_metrics_per_s": ceil_mps,
        "ratio_to_raw": sps * per_step / ceil_mps,
        "ceiling_steps_per_s": ceil_mps / per_step,
        "collector_rss_mib": p["collector_rss_mib"],
        "collector_cpu_s": p["collector_cpu_s"],
        "collector_connect_cpu_s": p["collector_connect_cpu_s"],
        "collector_step_cpu_ms": steady_cpu / steps * 1e3,
        "flat_ceiling_metrics_per_s": per_step / flat_s if flat_s else None,
        "stages_s": p["stages"],
        "connect_s": p["connect_s"],
        "client_submit_us": sum(r["submit_s"] for r in res) / rank_steps * 1e6,
        "client_serialize_us": sum(r["serialize_s"] for r in res) / rank_steps * 1e6,
        "client_telemetry_cpu_us": client_cpu * 1e6,
        # the load generators' whole CPU per step (value generation included): they share
        # the cores with the collector, so this is what the collector did not get
        "loadgen_cpu_ms": sum(r["cpu_s"] for r in res) / steps * 1e3,
        "loadgen_gen_ms": sum(r["gen_s"] for r in res) / steps * 1e3,
        "client_telemetry_share_of_1s_step": client_cpu,
        "dropped_steps": sum(r["dropped_steps"] for r in res),
        "stored": held,
        "expected_raw": steps * per_step,
        "expected_reduced": steps * w.distinct_metrics(),
        "clip_wire_ms": p["clip_wire_ms"],
        "collector_streams": p["collector_streams"],
        "collector_frames": p["collector_frames"],
        "agents": agents,
        "agent_stats": p["agents"],
        "machine": machine(),
    }
    clips = sorted(c for r in res for c in r["clips"])
    if clips and spike < steps:
        arrival, at_step, _ = clips[0]
        t_spike = min(r["submitted_at"][spike] for r in res)
        out["detect_steps"] = at_step + 1 - spike  # staged, applied at the next boundary
        out["detect_ms"] = (arrival - t_spike) * 1e3
    return out


ONCE = ("schemas", "dictionary")  # stages paid when ranks connect, not per step


def report(r: dict) -> str:
    """Markdown rows for one store (RESULTS.md and stdout)."""
    st, ceil = r["stages_s"], r["ceiling_metrics_per_s"]
    n, name = r["steps"], r["store"]
    per = lambda k: st.get(k, 0.0) / n * 1e3
    staged = sum(per(k) for k in st if k not in ONCE)
    lines = [
        f"| {name} | sustained | {r['steps_per_s']:.3f} steps/s, "
        f"{r['metrics_per_s']:,.0f} metrics/s | ratio {r['ratio_to_raw']:.3f} |",
        f"| {name} | raw ceiling (same rows: one vector per rank, direct write) | "
        f"{r['ceiling_steps_per_s']:.3f} steps/s, {ceil:,.0f} metrics/s | 1.000 |",
    ]
    flat = r.get("flat_ceiling_metrics_per_s")
    if flat:
        lines.append(
            f"| {name} | reference: one row per value, direct write (1 step) | "
            f"{flat / r['metrics_per_step']:.3f} steps/s, {flat:,.0f} metrics/s | "
            f"sustained = {r['metrics_per_s'] / flat:.2f} x this |"
        )
    for key, label in (
        ("receive", "event loop: frame checks + barrier copy"),
        ("reduce", "writer: reduce across ranks (a matrix per layout)"),
        ("write", "writer: store writes (raw vectors + reduced rows)"),
        ("detect", "writer: online detectors"),
        ("flush", "writer: store flush (commit)"),
    ):
        lines.append(
            f"| {name} | {label} | {per(key):.1f} ms/step | "
            f"{per(key) / 1e3 * r['steps_per_s']:.3f} of wall |"
        )
    step_cpu = r["collector_step_cpu_ms"]
    lines += [
        f"| {name} | collector CPU outside those (gRPC, protobuf, acks) | "
        f"{max(step_cpu - staged, 0):.1f} ms/step | "
        f"{max(step_cpu - staged, 0) / 1e3 * r['steps_per_s']:.3f} of wall |",
        f"| {name} | collector CPU per step, all threads (after connect) | {step_cpu:.1f} ms | "
        f"{step_cpu / 1e3 * r['steps_per_s']:.3f} cores |",
        f"| {name} | connect: {r['ranks']:,} streams, schemas registered | "
        f"{r['connect_s']:.1f} s wall, collector {r['collector_connect_cpu_s']:.1f} CPU-s "
        f"(schemas {st.get('schemas', 0.0):.1f} s, dictionary writes "
        f"{st.get('dictionary', 0.0):.1f} s) | once per run |",
        f"| {name} | collector peak RSS | {r['collector_rss_mib']:.0f} MiB | "
        f"{r['collector_rss_mib'] / 2048:.3f} of 2 GiB |",
        f"| {name} | client telemetry CPU per rank-step (serialize "
        f"{r['client_serialize_us']:.0f} us, submit {r['client_submit_us']:.1f} us) | "
        f"{r['client_telemetry_cpu_us']:.0f} us | "
        f"{r['client_telemetry_share_of_1s_step']:.4f} of a 1 s step |",
        f"| {name} | load generators' CPU per step, all processes (value generation "
        f"{r['loadgen_gen_ms']:.0f} ms) | {r['loadgen_cpu_ms']:.0f} ms | "
        f"{r['loadgen_cpu_ms'] * r['steps_per_s'] / 1e3:.3f} cores |",
        f"| {name} | bytes per stored value | {r['stored']['bytes_per_value']:.2f} B | "
        f"{r['stored']['bytes_per_value'] / 4:.2f} of a float32 |",
    ]
    if "detect_ms" in r:
        lines.append(
            f"| {name} | injected max-abs spike to clip applied | "
            f"{r['detect_steps']} steps, {r['detect_ms']:.0f} ms | "
            f"collector: {', '.join(f'{x:.1f}' for x in r['clip_wire_ms'])} ms "
            f"barrier to wire |"
        )
    return "\n".join(lines)


HEADER = "| store | stage | absolute | ratio |\n|---|---|---|---|"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.ingest", description=__doc__.splitlines()[0]
    )
    ap.add_argument(
        "--store", required=True, help='"parquet:DIR" ("parquet:" = a temp dir) or clickhouse://...'
    )
    ap.add_argument("--metrics-per-step", type=int, default=6_000_000)
    ap.add_argument("--steps", type=int, default=16, help=">= 16 injects the max-abs spike")
    ap.add_argument("--ranks", type=int, default=4096)
    ap.add_argument("--procs", type=int, default=2, help="load-generator processes")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the rate")
    ap.add_argument(
        "--depth",
        type=int,
        default=DEPTH,
        help="steps a rank may have unacknowledged (its buffer, block policy)",
    )
    ap.add_argument(
        "--flush-interval",
        type=float,
        default=2.0,
        help="collector store flush (= ack) interval, s; every flush acks every "
        "rank, i.e. thousands of stream writes at thousands of ranks",
    )
    ap.add_argument(
        "--agents",
        type=int,
        default=0,
        help="node agents the ranks stream through (collector/agent.py; 0 = direct)",
    )
    ap.add_argument(
        "--max-stream-messages",
        type=float,
        default=None,
        metavar="PER_S",
        help="the collector's pacing (collector serve --max-stream-messages; default its "
        "own); 1e9 turns it off",
    )
    ap.add_argument("--json", help="also write the full result here")
    ap.add_argument(
        "--no-flat",
        action="store_true",
        help="skip the one-row-per-value reference write (slow: ~1 M rows/s)",
    )
    a = ap.parse_args(argv)
    r = run(
        a.store,
        a.metrics_per_step,
        a.steps,
        a.ranks,
        a.procs,
        a.warmup,
        a.depth,
        a.flush_interval,
        flat=not a.no_flat,
        agents=a.agents,
        max_messages=a.max_stream_messages,
    )
    print(
        f"{r['metrics_per_step']:,} metrics/step = {r['ranks']:,} ranks x "
        f"{r['metrics_per_rank']:,} ({r['reduced_per_step']:,} reduced), {r['steps']} steps "
        f"({r['warmup']} warm-up), {r['procs']} load-generator processes; {r['machine']}"
    )
    print(HEADER)
    print(report(r))
    ok = r["stored"]["raw"] == r["expected_raw"] and r["stored"]["reduced"] == r["expected_reduced"]
    print(
        f"stored raw={r['stored']['raw']} (expected {r['expected_raw']}) "
        f"reduced={r['stored']['reduced']} (expected {r['expected_reduced']})"
        f"{'' if ok else ' MISMATCH'}"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    print(f"metrics/s={r['metrics_per_s']:.1f} ratio_to_raw={r['ratio_to_raw']:.4f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
