"""`make bench`: every benchmark once, in a bounded time on 2 cores, into benchmarks/RESULTS.md.

    python -m benchmarks.suite [--metrics-per-step 6000000] [--ranks 4096,512] [--steps 30]
                               [--dashboard-steps 100000] [--out benchmarks/RESULTS.md]

Starts its own ClickHouse server (benchmarks/clickhouse_server.py, as the tests do; without the
binary the ClickHouse rows are skipped and say so), then runs, each as its own process:
  ingest          benchmarks/ingest.py into Parquet and into ClickHouse, once per rank count
                  (4,096 ranks x 1,460 = the seed's shape; 512 x 11,715 = the same metrics
                  with 8 ranks' vectors per stream, as a node-level agent would send them)
  hook overhead   benchmarks/hook_overhead.py on CPU, and on CUDA when there is one
  dashboard read  benchmarks/dashboard_read.py on both stores
and writes the tables with the date and the machine. Every figure is a ratio to a baseline
measured in the same run as well as absolute.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import ingest
from benchmarks.clickhouse_server import ClickHouseServer, server_command

ROOT = Path(__file__).resolve().parents[1]


INGEST_NOTE = (
    "Rates are end to end: load generators -> gRPC -> collector (barrier, reduction, online "
    "detectors) -> store, until acknowledged durable. The raw ceiling is the same stored rows "
    "(one float32 vector per rank and step) written straight to the backend; the reference row "
    "writes one row per value, the layout of per-key trackers. Stage rows are CPU time of the "
    "collector's threads per step. The collector flushes (and acks every stream) every 2 s at "
    "4,096 streams, every 1 s at 512 (`flush_interval`): a flush's acks are one write per "
    "stream, and a shorter interval is a shorter wait for them; each rank keeps up to "
    f"{ingest.DEPTH} steps unacknowledged."
)


def flush_interval(streams: int) -> float:
    """The collector's --flush-interval the suite runs `streams` streams with (INGEST_NOTE)."""
    return 2.0 if streams > 1024 else 1.0


def run_module(args: list[str], timeout: float) -> str:
    print("$ python -m " + " ".join(args), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    print(f"  ({time.perf_counter() - t0:.0f} s, exit {out.returncode})", file=sys.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def table_lines(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith("|")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.suite", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--metrics-per-step", type=int, default=6_000_000)
    ap.add_argument("--ranks", default="4096,512", help="comma-separated rank counts")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hook-steps", type=int, default=12)  # demo model: ~2 s a step on CPU
    ap.add_argument("--dashboard-steps", type=int, default=100_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    sections: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = None
        command = server_command()
        if command is not None:
            server = ClickHouseServer(command, tmp / "clickhouse")
            server.start()
        try:
            stores = ["parquet:{tmp}/ingest-{ranks}"]  # a fresh store per run
            if server is not None:
                stores.append(server.url("bench_ingest_") + "{ranks}")
            ingest_rows, heads = [], []
            for ranks in [int(x) for x in a.ranks.split(",")]:
                for url in (u.format(tmp=tmp, ranks=ranks) for u in stores):
                    js = tmp / "ingest.json"
                    out = run_module(
                        [
                            "benchmarks.ingest",
                            "--store",
                            url,
                            "--metrics-per-step",
                            str(a.metrics_per_step),
                            "--ranks",
                            str(ranks),
                            "--steps",
                            str(a.steps),
                            "--flush-interval",
                            str(flush_interval(ranks)),
                            "--json",
                            str(js),
                        ],
                        timeout=1200,
                    )
                    r = json.loads(js.read_text())
                    if out.splitlines()[0] not in heads:
                        heads.append(out.splitlines()[0])
                    ingest_rows.append(
                        ingest.report(r).replace(
                            f"| {r['store']} |", f"| {r['store']}, {ranks:,} ranks |"
                        )
                    )
                    ingest_rows.append(
                        f"| {r['store']}, {ranks:,} ranks | stored rows (exact) | raw "
                        f"{r['stored']['raw']:,}, reduced {r['stored']['reduced']:,} | "
                        f"expected {r['expected_raw']:,}, {r['expected_reduced']:,} |"
                    )
            sections.append(
                "## Ingest end to end\n\n"
                + "\n".join(f"- {h}" for h in heads)
                + "\n\n"
                + INGEST_NOTE
                + "\n\n"
                + ingest.HEADER
                + "\n"
                + "\n".join(ingest_rows)
                + ("" if server else "\n\n(ClickHouse skipped: no server binary)")
            )
            hook = []
            devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
            for dev in devices:
                out = run_module(
                    ["benchmarks.hook_overhead", "--device", dev, "--steps", str(a.hook_steps)],
                    timeout=900,
                )
                hook.append(out)
            rows = [ln for out in hook for ln in table_lines(out)[2:]]
            sections.append(
                "## Hook overhead (demo model, interleaved, median)\n\n"
                + "\n".join(table_lines(hook[0])[:2] + rows)
                + ("" if "cuda" in devices else "\n\n(CUDA: no GPU here, skipped)")
            )

            dash = ["benchmarks.dashboard_read", "--steps", str(a.dashboard_steps)]
            if server is not None:
                dash += ["--clickhouse", server.url("bench_dashboard")]
            out = run_module(dash, timeout=900)
            sections.append(
                "## Dashboard reads (cold, no Streamlit cache)\n\n" + "\n".join(table_lines(out))
            )
        finally:
            if server is not None:
                server.stop()
    ch = f", ClickHouse {server.version}" if server is not None else ""
    text = (
        f"# Benchmark results\n\n{time.strftime('%Y-%m-%d %H:%M')} on {ingest.machine()}"
        f"{ch}; `make bench` took {time.perf_counter() - t_start:.0f} s. Collector, "
        f"ClickHouse server and load generators share the machine.\n\n"
        + "\n\n".join(sections)
        + "\n"
    )
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
