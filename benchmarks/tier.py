"""A collector tier against one collector, same workload, same run of this script.

    python -m benchmarks.tier [--metrics-per-step 1000000] [--ranks 64] [--steps 12]
                              [--collectors 2] [--warmup 2] [--depth 4] [--flush-interval 0.5]
                              [--agents N]

Baseline: benchmarks/ingest.py's pipeline (P load-generator processes, each its share of the
ranks with the real sender protocol, against one real `python -m collector serve`, Parquet).
Tier: the same load generators against K `serve --coordinator` processes (load generator i
plays ranks [lo_i, hi_i) against collector i; any rank may use any collector), each with its
own Parquet store, and one `python -m collector coordinate`. With --agents N the ranks stream
through N real node agents in both setups (benchmarks/agents.py, as ingest.py --agents): N
streams into the single collector, and N / K into each tier collector (collector i's agents
forward ranks [lo_i, hi_i), in K agent-host processes). Sustained rate as in ingest.py:
steps after the warm-up over the time until the last of them is acknowledged, which in the
tier means stored raw at the collector AND reduced and stored at the coordinator.

Printed: both rates and their ratio (tier / single), and per process its CPU seconds per
step and peak RSS, the figures the README's capacity model uses. On a 2-core machine the
tier's processes share the cores with the load generators, so the ratio says what the tier
costs in CPU here, not what it gains on K hosts. Last line:

    tier_metrics/s=<float> single_metrics/s=<float> ratio=<float>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.ingest import RUN, machine, play, proc_mem_cpu, start_agents, stop_agents
from benchmarks.workload import Workload
from collector.process import start_collector, stop_collector

ROOT = Path(__file__).resolve().parents[1]


def play_tier(
    w: Workload, steps: int, k: int, depth: int, flush_s: float, tmp: Path, agents: int = 0
) -> dict:
    co, co_addr = start_collector(
        f"parquet:{tmp / 'co'}", "--insecure", command="coordinate", log_path=tmp / "co.log"
    )
    cols, addrs = [], []
    gens: list[subprocess.Popen] = []
    hosts: list[subprocess.Popen] = []
    agent_stats: dict = {}
    try:
        for i in range(k):
            p, a = start_collector(
                f"parquet:{tmp / f'w{i}'}",
                "--insecure",
                "--coordinator",
                co_addr,
                "--flush-interval",
                str(flush_s),
                log_path=tmp / f"w{i}.log",
            )
            cols.append(p)
            addrs.append(a)
        via: dict = {}
        if agents:  # collector i's share of the agents, in an agent-host process of its own
            if agents % k or w.world % agents:
                raise ValueError("--agents must divide --ranks and be a multiple of --collectors")
            targets: list[str] = []
            for i, a in enumerate(addrs):
                (tmp / f"a{i}").mkdir()
                h, t = start_agents(a, agents // k, 1, tmp / f"a{i}")
                hosts += h
                targets += t
            via = dict(agent_targets=targets, ranks_per_agent=w.world // agents)
        bounds = np.linspace(0, w.world, k + 1).astype(int)
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            args = dict(
                target=addrs[i],
                run=RUN,
                world=w.world,
                metrics_per_rank=w.metrics_per_rank,
                n_layers=w.n_layers,
                n_experts=w.n_experts,
                spike_step=w.spike_step,
                death_step=w.death_step,
                rank_lo=int(lo),
                rank_hi=int(hi),
                collectors=k,  # each tier collector paces for its share of the ranks
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
        for g in gens:
            assert g.stdout is not None and g.stdin is not None
            if "ready" not in json.loads(g.stdout.readline() or "{}"):
                raise RuntimeError("load generator died")
        before = {p.pid: proc_mem_cpu(p.pid)[1] for p in [co, *cols]}
        for g in gens:
            assert g.stdin is not None
            g.stdin.write("go\n")
            g.stdin.flush()
        results = []
        for g in gens:
            assert g.stdout is not None
            line = json.loads(g.stdout.readline() or '{"error": "load generator died"}')
            if "result" not in line:
                raise RuntimeError(f"load generator: {line}")
            results.append(line["result"])
            g.wait(timeout=120)
        procs = {"coordinator": co, **{f"collector{i}": p for i, p in enumerate(cols)}}
        cpu = {}
        for name, p in procs.items():
            rss, c = proc_mem_cpu(p.pid)
            cpu[name] = {"cpu_s": c - before[p.pid], "rss_mib": rss}
        if hosts:
            agent_stats = stop_agents(hosts)
    finally:
        for g in gens + hosts:
            if g.poll() is None:
                g.kill()
        for p in cols:
            stop_collector(p, timeout_s=300)
        stop_collector(co, timeout_s=300)
    return {"results": results, "procs": cpu, "agents": agent_stats}


def rate(results: list[dict], steps: int, warmup: int) -> float:
    t_w = min(r["submitted_at"][warmup] for r in results)
    t_end = max(r["t_end"] for r in results)
    return (steps - warmup) / (t_end - t_w)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.tier", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--metrics-per-step", type=int, default=1_000_000)
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--collectors", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--flush-interval", type=float, default=0.5)
    ap.add_argument(
        "--agents", type=int, default=0, help="node agents the ranks stream through (0 = direct)"
    )
    a = ap.parse_args(argv)
    w = Workload.for_total(a.metrics_per_step, a.ranks, spike_step=10**9, death_step=10**9)
    per_step = w.values_per_rank * w.world
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "single").mkdir()
        (t / "tier").mkdir()
        t0 = time.perf_counter()
        single = play(
            f"parquet:{t / 'single' / 'store'}",
            w,
            a.steps,
            a.collectors,
            a.depth,
            a.flush_interval,
            t / "single",
            a.agents,
        )
        tier = play_tier(w, a.steps, a.collectors, a.depth, a.flush_interval, t / "tier", a.agents)
        wall = time.perf_counter() - t0
    s_sps = rate(single["results"], a.steps, a.warmup)
    t_sps = rate(tier["results"], a.steps, a.warmup)
    print(
        f"{per_step:,} metrics/step = {w.world} ranks x {w.values_per_rank:,}, {a.steps} steps "
        f"({a.warmup} warm-up), {a.collectors} load generators, "
        f"{f'{a.agents} node agents' if a.agents else 'direct'}; {machine()}; {wall:.0f} s"
    )
    print("| setup | process | CPU per step | peak RSS |\n|---|---|---|---|")
    s_cpu = single["collector_cpu_s"] - single["collector_connect_cpu_s"]
    print(
        f"| single collector | collector | {s_cpu / a.steps * 1e3:.1f} ms | "
        f"{single['collector_rss_mib']:.0f} MiB |"
    )
    total = 0.0
    for name, p in tier["procs"].items():
        total += p["cpu_s"]
        print(
            f"| tier ({a.collectors} + coordinator) | {name} | {p['cpu_s'] / a.steps * 1e3:.1f} ms "
            f"| {p['rss_mib']:.0f} MiB |"
        )
    print(f"| tier | all tier processes | {total / a.steps * 1e3:.1f} ms | |")
    if a.agents:  # the agent hosts' CPU from ready to stop (connect-up excluded)
        for name, d in (("single", single["agents"]), ("tier", tier["agents"])):
            streams = f"{a.agents} agents ({d.get('local_streams', 0)} rank streams)"
            print(f"| {name} | {streams} | {d['cpu_s'] / a.steps * 1e3:.1f} ms | |")
    dropped = sum(r["dropped_steps"] for r in single["results"] + tier["results"])
    print(
        f"single: {s_sps:.3f} steps/s ({s_sps * per_step:,.0f} metrics/s); tier: {t_sps:.3f} "
        f"steps/s ({t_sps * per_step:,.0f} metrics/s); ratio tier/single {t_sps / s_sps:.3f}; "
        f"dropped steps {dropped}"
    )
    print(
        f"tier_metrics/s={t_sps * per_step:.1f} single_metrics/s={s_sps * per_step:.1f} "
        f"ratio={t_sps / s_sps:.4f}"
    )
    return 0 if dropped == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
