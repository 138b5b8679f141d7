"""Dashboard reads on a long run: the loss curve and one layer x expert heatmap.

A synthetic run (default 100k steps, 2 MoE layers x 4 experts x 3 stats + 3 training curves:
the shape of tests/dashboard's scale test) is written straight through the store API, then the
dashboard's own read path is timed without Streamlit's cache - what a cold page load costs:

    loss curve   store.series(run, "train/loss") + min/max downsampling to MAX_POINTS
    heatmap      store.at_step(run, step, "moe/*/expert*/*") + pivot + token-share cells
    columns      every tokens / act_rms series of the run (what a finished run's replay reads
                 once before scrubbing from memory)

Baseline, measured in the same run and interleaved with it: the same rows read raw - pyarrow
over the same Parquet segment files with the same filter (no last-write-wins pass, no frame
shaping), or for ClickHouse the same SELECT without the argMax deduplication. Ratios are
dashboard / baseline (medians over --reps).

    python -m benchmarks.dashboard_read [--steps 100000] [--reps 7]
                                        [--clickhouse clickhouse://USER@HOST:PORT/DB]

($STEPWATCH_BENCH_CLICKHOUSE works as --clickhouse.) Prints a Markdown table, then one line per
store: `store=NAME loss_curve_s=<float> heatmap_s=<float> loss_ratio=<> heatmap_ratio=<>`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow.dataset as ds

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dashboard import data, experts  # noqa: E402
from store import open_store  # noqa: E402
from tests.dashboard.runs import write_synthetic_run  # noqa: E402  (one writer for both)

RUN = "bench"
LOSS_ID = 0  # tests/dashboard/runs.synthetic_dict puts train/loss first


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, polars {pl.__version__}"
    )


# ---- the dashboard's read path (dashboard/reads.py minus the cache) ------------------------
def loss_curve(store) -> int:
    s = store.series(RUN, "train/loss")
    return data.downsample_minmax(s).frame.height


def heatmap(store, step: int) -> int:
    wide = experts.expert_stats(store.at_step(RUN, step, experts.HEATMAP_PATTERN))
    return experts.heatmap_at(wide, "token share").height


def expert_columns(store) -> int:
    d = store.metrics(RUN)
    names = d.filter(pl.col("stat").is_in(["tokens", "act_rms"]), pl.col("expert") >= 0)[
        "name"
    ].to_list()
    return sum(store.series(RUN, n).height for n in names)


# ---- baselines: the same rows, read raw ----------------------------------------------------
def parquet_baselines(root: Path) -> tuple[Callable[[], int], Callable[[int], int]]:
    # Reduced values are vectors (store/reduced.py): the raw read is every vector's bytes.
    files = sorted(str(p) for p in (root / RUN / "reduced_vectors").glob("*.parquet"))
    dataset = ds.dataset(files, format="parquet")

    def loss() -> int:
        return dataset.to_table(columns=["step", "values"]).num_rows

    def at(step: int) -> int:
        return dataset.to_table(
            columns=["layout", "values"], filter=ds.field("step") == step
        ).num_rows

    return loss, at


def clickhouse_baselines(url: str) -> tuple[Callable[[], int], Callable[[int], int]]:
    from clickhouse_driver import Client

    from store.clickhouse.config import ClickHouseConfig

    c = ClickHouseConfig.from_url(url)
    client = Client(
        c.host, port=c.port, user=c.user, password=c.password, database=c.database, secure=c.secure
    )
    table = f"`{c.database}`.`reduced_vectors`"  # fixed names, not user input

    def rows(sql: str, params: dict) -> int:  # the vectors' bytes are binary, not UTF-8
        cols = client.execute(sql, params, columnar=True, settings={"strings_as_bytes": True})
        return len(cols[0]) if cols else 0

    def loss() -> int:  # one metric's 4 bytes of every vector, cut on the server
        return rows(
            f"SELECT step, substring(`values`, 1, 4) FROM {table} WHERE run = %(r)s", {"r": RUN}
        )

    def at(step: int) -> int:
        return rows(
            f"SELECT layout, `values` FROM {table} WHERE run = %(r)s AND step = %(s)s",
            {"r": RUN, "s": step},
        )

    return loss, at


# ---- measurement -----------------------------------------------------------------------------
def timed(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    rows = fn()
    dt = time.perf_counter() - t0
    if rows <= 0:
        raise RuntimeError(f"{fn} read nothing: the benchmark run is not where it should be")
    return dt


def measure(url: str, baselines, steps: int, reps: int) -> dict[str, float]:
    base_loss, base_at = baselines
    t: dict[str, list[float]] = {
        k: [] for k in ("loss", "heat", "base_loss", "base_heat", "columns")
    }
    with open_store(url) as store:
        loss_curve(store), heatmap(store, steps // 2), base_loss(), base_at(steps // 2)  # warm
        for rep in range(reps):
            step = steps // 2 + 1 + rep  # a step not read before
            pairs = [
                ("loss", lambda: loss_curve(store)),
                ("base_loss", base_loss),
                ("heat", lambda s=step: heatmap(store, s)),
                ("base_heat", lambda s=step: base_at(s)),
            ]
            if rep % 2:  # alternate who goes first
                pairs = [pairs[1], pairs[0], pairs[3], pairs[2]]
            for key, fn in pairs:
                t[key].append(timed(fn))
        t["columns"].append(timed(lambda: expert_columns(store)))
    m = {k: statistics.median(v) for k, v in t.items()}
    m["loss_ratio"] = m["loss"] / m["base_loss"]
    m["heat_ratio"] = m["heat"] / m["base_heat"]
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.dashboard_read", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument(
        "--clickhouse",
        default=os.environ.get("STEPWATCH_BENCH_CLICKHOUSE"),
        help="also measure a ClickHouse store at this URL (the run is written there)",
    )
    args = ap.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        url = f"parquet:{root}"
        t0 = time.perf_counter()
        write_synthetic_run(url, RUN, args.steps)
        print(
            f"wrote {args.steps:,} steps to {url} in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        results["parquet"] = measure(url, parquet_baselines(root), args.steps, args.reps)
    if args.clickhouse:
        write_synthetic_run(args.clickhouse, RUN, args.steps)
        results["clickhouse"] = measure(
            args.clickhouse, clickhouse_baselines(args.clickhouse), args.steps, args.reps
        )

    print(f"Dashboard reads, {args.steps:,}-step run, median of {args.reps} ({machine()})\n")
    print(
        "| store | loss curve s | raw read s | ratio | heatmap s | raw read s | ratio "
        "| expert columns s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, m in results.items():
        print(
            f"| {name} | {m['loss']:.4f} | {m['base_loss']:.4f} | {m['loss_ratio']:.2f} "
            f"| {m['heat']:.4f} | {m['base_heat']:.4f} | {m['heat_ratio']:.2f} "
            f"| {m['columns']:.3f} |"
        )
    print()
    for name, m in results.items():
        print(
            f"store={name} loss_curve_s={m['loss']:.6f} heatmap_s={m['heat']:.6f} "
            f"loss_ratio={m['loss_ratio']:.3f} heatmap_ratio={m['heat_ratio']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
