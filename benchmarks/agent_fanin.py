"""Node agents vs direct streams, measured in the same run: R ranks, then the same R ranks
through A node agents (R/A ranks per host), into one real collector each time.

    python -m benchmarks.agent_fanin [--ranks 512] [--agents 64] [--metrics-per-step 102400]
                                     [--steps 12] [--warmup 2] [--store parquet:]

Both runs are benchmarks/ingest.py's pipeline (load-generator processes with the hooks sender
protocol, a collector process, a Parquet or ClickHouse store, the stored rows checked exactly);
the agent run adds agent-host processes (benchmarks/agents.py), each agent a real NodeAgent
with its own socket, upstream connection and multiplexed stream. Reported: the streams the
collector held, sustained steps/s and the collector's CPU per step, each agent-run figure as a
ratio to the direct run's. On a 2-core machine the agents share the cores with the collector
and the load generators, so their CPU is taken from the same budget (reported too). Last line:

    streams_ratio=<float> steps_per_s_ratio=<float>
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.ingest import run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.agent_fanin")
    ap.add_argument("--store", default="parquet:", help='"parquet:" = a temp dir')
    ap.add_argument("--ranks", type=int, default=512)
    ap.add_argument("--agents", type=int, default=64)
    ap.add_argument("--metrics-per-step", type=int, default=512 * 200)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--procs", type=int, default=2, help="load-generator (and agent-host) processes"
    )
    ap.add_argument("--flush-interval", type=float, default=0.5)
    a = ap.parse_args(argv)
    common = dict(
        url=a.store,
        total=a.metrics_per_step,
        steps=a.steps,
        ranks=a.ranks,
        procs=a.procs,
        warmup=a.warmup,
        flush_s=a.flush_interval,
        ceiling_steps=1,
        flat=False,
    )
    direct = run(**common)  # type: ignore[arg-type]
    agents = run(**common, agents=a.agents)  # type: ignore[arg-type]
    ok = True
    for r in (direct, agents):
        exact = r["stored"]["raw"] == r["expected_raw"]
        exact = exact and r["stored"]["reduced"] == r["expected_reduced"]
        ok = ok and exact and r["dropped_steps"] == 0
    streams = lambda r: (
        r["collector_streams"]["streams_opened"] + (r["collector_streams"]["mux_streams_opened"])
    )
    sd, sa = streams(direct), streams(agents)
    print(
        f"{a.ranks} ranks x {direct['metrics_per_rank']} metrics, {a.steps} steps "
        f"({a.warmup} warm-up), {a.agents} node agents ({-(-a.ranks // a.agents)} ranks each), "
        f"store {direct['store']}; {direct['machine']}"
    )
    print("| | direct | through agents | ratio |\n|---|---|---|---|")
    rows = (
        ("streams at the collector", sd, sa, "d"),
        ("sustained steps/s", direct["steps_per_s"], agents["steps_per_s"], ".3f"),
        (
            "collector CPU per step (ms)",
            direct["collector_step_cpu_ms"],
            agents["collector_step_cpu_ms"],
            ".1f",
        ),
        (
            "collector peak RSS (MiB)",
            direct["collector_rss_mib"],
            agents["collector_rss_mib"],
            ".0f",
        ),
        ("connect, all ranks (s)", direct["connect_s"], agents["connect_s"], ".1f"),
    )
    for label, d, g, fmt in rows:
        print(f"| {label} | {d:{fmt}} | {g:{fmt}} | {g / d:.3f} |")
    fd, fa = direct["collector_frames"], agents["collector_frames"]
    print(
        f"| frames the collector applied | {fd['frames']} | {fa['frames']} | "
        f"{fa['frames'] / fd['frames']:.3f} |"
    )
    print(f"| FrameBatch messages (agents) | - | {fa['mux_batches']} | - |")
    cpu = agents["agent_stats"].get("cpu_s", 0.0) / a.steps * 1e3
    print(f"| agents' CPU per step, all {a.agents} (ms) | - | {cpu:.1f} | - |")
    print(
        f"stored exactly (raw and reduced, both runs): {'yes' if ok else 'NO'}; "
        f"clip tables fanned out by the agents: {agents['agent_stats'].get('clips_fanned_out', 0)}"
    )
    print(
        f"streams_ratio={sa / sd:.4f} steps_per_s_ratio={agents['steps_per_s'] / direct['steps_per_s']:.4f}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
