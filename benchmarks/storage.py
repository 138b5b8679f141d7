"""Bytes on disk per stored value, on a real run's telemetry (`make demo`'s store by default).

    python scripts/demo.py --store-dir /tmp/demo/store           # the telemetry, once
    python -m benchmarks.storage --source parquet:/tmp/demo/store --run demo

The run's stored rows are read back through the store API and written again, step by step and
one flush per step (as the collector does at the demo's rate), into a fresh Parquet store and a
fresh database on a local ClickHouse server (Debian's 18.16, started here on a free loopback
port): raw vectors as the RawBlocks they were (same ranks, ids and layout), reduced values as
ValueBatch rows. Then every value is read back and compared, and the value tables' bytes on
disk are counted (Parquet: raw_vectors/, reduced_vectors/, reduced/, layouts/; ClickHouse:
system.parts of raw_vectors, raw_layouts, reduced, reduced_vectors after OPTIMIZE ... FINAL, as
merges leave them). Two figures per backend: bytes per stored value (raw cells + reduced cells,
what benchmarks/ingest.py reports) and bytes per logged value (distinct (step, metric) a rank
sent: a world-1 run logs each value once and stores it as a raw and a reduced value).

Run it from a checkout of the code to measure (cwd first on sys.path): the same file measures an
older commit when copied into its tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from store import RawBlock, RunInfo, ValueBatch, open_store

VALUE_DIRS = ("raw_vectors", "reduced_vectors", "reduced", "layouts")
CH_TABLES = ("raw_vectors", "raw_layouts", "reduced", "reduced_vectors")


def read_source(url: str, run: str) -> dict:
    """The run as stored: info, dictionary, raw vectors (+ layouts), reduced rows per step."""
    with open_store(url) as src:
        info = src.runs().filter(pl.col("run") == run).row(0, named=True)
        metrics = src.metrics(run)
        vec, layouts = src._read_vectors(run, rank=None, start=None, stop=None)  # type: ignore[attr-defined]
        vec = vec.sort("ver").unique(["rank", "step", "layout"], keep="last", maintain_order=True)
        steps = sorted(set(vec["step"].to_list()))
        reduced = {s: src.at_step(run, s).select("metric_id", "value") for s in steps}
        n_ranks = {r["step"]: r["n_ranks"] for r in src.steps(run).iter_rows(named=True)}
    return {
        "info": info,
        "metrics": metrics,
        "vectors": vec,
        "layouts": dict(layouts),
        "reduced": reduced,
        "n_ranks": n_ranks,
    }


def replay(url: str, run: str, data: dict) -> float:
    """Write the run into `url` as the collector would; returns the seconds it took."""
    from store import MetricDict

    m = data["metrics"]
    t0 = time.perf_counter()
    with open_store(url) as st:
        st.open_run(RunInfo(run, int(data["info"]["world_size"]), data["info"]["config_json"]))
        st.write_metrics(
            run,
            MetricDict(
                m["metric_id"].to_numpy(),
                m["name"].to_list(),
                m["layer"].to_numpy(),
                m["expert"].to_numpy(),
                m["head"].to_numpy(),
                m["stat"].to_list(),
                m["unit"].to_list(),
                m["reduce"].to_list(),
            ),
        )
        by_step = data["vectors"].partition_by("step", as_dict=True)
        for (step,), rows in sorted(by_step.items()):
            for r in rows.iter_rows(named=True):
                ids = data["layouts"][r["layout"]]
                value = np.frombuffer(r["values"], "<f4").reshape(1, -1)
                st.write_raw_block(run, RawBlock(step, np.array([r["rank"]], np.int32), ids, value))
            red = data["reduced"][step]
            if red.height:
                st.write_reduced(
                    run,
                    ValueBatch(
                        np.full(red.height, step, np.int64),
                        red["metric_id"].to_numpy(),
                        red["value"].to_numpy(),
                        n_ranks=np.full(red.height, data["n_ranks"].get(step, 1), np.int32),
                    ),
                )
            st.flush()
    return time.perf_counter() - t0


def verify(url: str, run: str, data: dict) -> bool:
    """Every reduced and raw value read back equal to the source's, bit for bit."""
    with open_store(url) as st:
        for step, want in data["reduced"].items():
            got = st.at_step(run, step).select("metric_id", "value")
            if not got.equals(want):
                return False
        from store.vectors import vector_cells

        vec = data["vectors"]
        for step in sorted(data["reduced"])[::10]:
            want = vector_cells(vec.filter(pl.col("step") == step), data["layouts"])
            for rank in want["rank"].unique().to_list():
                w = want.filter(pl.col("rank") == rank).sort("metric_id")
                got = st.at_step(run, step, rank=rank)
                if not np.array_equal(
                    got["value"].to_numpy().view("<u4"), w["value"].to_numpy().view("<u4")
                ):
                    return False
    return True


def counts(data: dict) -> dict:
    vec = data["vectors"]
    per = vec.group_by("rank", "step").agg(pl.col("layout"))
    raw = sum(
        len(set(np.concatenate([data["layouts"][h] for h in hs]).tolist())) for hs in per["layout"]
    )
    reduced = sum(df.height for df in data["reduced"].values())
    return {"raw": raw, "reduced": reduced, "stored": raw + reduced, "logged": raw}


def parquet_bytes(root: Path, run: str) -> int:
    return sum(f.stat().st_size for d in VALUE_DIRS for f in (root / run / d).glob("*.parquet"))


def clickhouse_bytes(server, database: str) -> int:
    have = server.client(f"SELECT name FROM system.tables WHERE database = '{database}'").split()
    for t in CH_TABLES:
        if t in have:  # an older schema has no reduced_vectors
            server.client(f"OPTIMIZE TABLE {database}.{t} FINAL")
    out = server.client(
        "SELECT sum(bytes_on_disk) FROM system.parts WHERE active AND "
        f"database = '{database}' AND table IN ({', '.join(repr(t) for t in CH_TABLES)})"
    )
    return int(out.strip() or 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--source", default="parquet:runs/demo-store")
    ap.add_argument("--run", default="demo")
    ap.add_argument("--no-clickhouse", action="store_true")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    data = read_source(args.source, args.run)
    n = counts(data)
    out: dict = {
        "counts": n,
        "steps": len(data["reduced"]),
        "world_size": data["info"]["world_size"],
    }
    tmp = Path(tempfile.mkdtemp(prefix="stepwatch-storage-"))
    try:
        url = f"parquet:{tmp / 'pq'}"
        secs = replay(url, args.run, data)
        nbytes = parquet_bytes(tmp / "pq", args.run)
        out["parquet"] = {"bytes": nbytes, "seconds": secs, "verified": verify(url, args.run, data)}
        if not args.no_clickhouse:
            from benchmarks.clickhouse_server import ClickHouseServer, server_command

            command = server_command()
            if command is None:
                raise SystemExit("no clickhouse-server here (scripts/system-deps.sh installs it)")
            server = ClickHouseServer(command, tmp / "ch")
            server.start()
            try:
                out["clickhouse_version"] = server.client("SELECT version()").strip()
                url = server.url("storage")
                secs = replay(url, args.run, data)
                nbytes = clickhouse_bytes(server, "storage")
                out["clickhouse"] = {
                    "bytes": nbytes,
                    "seconds": secs,
                    "verified": verify(url, args.run, data),
                }
            finally:
                server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for backend in ("parquet", "clickhouse"):
        if backend in out:
            b = out[backend]
            b["bytes_per_stored_value"] = b["bytes"] / n["stored"]
            b["bytes_per_logged_value"] = b["bytes"] / n["logged"]
            print(
                f"{backend}: {b['bytes']:,} B for {n['stored']:,} stored values "
                f"({n['raw']:,} raw + {n['reduced']:,} reduced, {out['steps']} steps): "
                f"{b['bytes_per_stored_value']:.2f} B/stored value, "
                f"{b['bytes_per_logged_value']:.2f} B/logged value, verified {b['verified']}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0 if all(out[b]["verified"] for b in ("parquet", "clickhouse") if b in out) else 1


if __name__ == "__main__":
    os.environ.setdefault("POLARS_MAX_THREADS", "2")
    raise SystemExit(main())
