"""stepwatch against its peers on the workload every tracker benchmark uses: S steps of M scalars.

    python -m benchmarks.peers [--metrics 10000,100000,1000000] [--steps 100,20,5] [--repeats 3]
                               [--systems stepwatch,wandb,tensorboard,np.save]
                               [--out benchmarks/PEERS.md] [--json FILE]

One process logs S steps of M distinct named float scalars, then its own flush/close
(benchmarks/peers_run.py says exactly what each system does): stepwatch (the hooks Sender
streaming to a real collector child process writing Parquet, closed when every step is
acknowledged durable), wandb offline, TensorBoard's EventFileWriter, and the floor, np.save of
each step's float32 vector. Every (M, repeat) runs every system, each in its own process, one
after the other in an order rotated per repeat, so load drifts on this shared machine touch all
alike. Per run: metrics/s = M x S over the timed window (first named call to close returned);
CPU-seconds of the process tree (stepwatch: client + collector; wandb: client + wandb-core)
over that window; peak RSS of the whole tree, sampled here every 20 ms; then a separate process
(benchmarks/peers_check.py) reads every stored value back with the system's own reader and
checks names and values, and bytes on disk per logged value. Figures are medians over the
repeats and ratios to the np.save floor and to the faster peer of the same M.
A system that fails at some M is a row saying why; the benchmark goes on. Last line:

    peers M=<largest M> stepwatch=<metrics/s> fastest_peer=<name>:<metrics/s> ratio=<x> floor_ratio=<x>
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.ingest import machine
from benchmarks.peers_run import SYSTEMS

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("wandb", "tensorboard")
FLOOR = "np.save"
SAMPLE_S = 0.02  # RSS of the tree's processes this often
RELIST_EVERY = 10  # samples between listings of the tree


# ---- one run ------------------------------------------------------------------------------------
def kill_tree(proc: psutil.Process) -> None:
    for p in [*proc.children(recursive=True), proc]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def watched(cmd: list[str], log: Path, timeout_s: float) -> tuple[dict, float]:
    """Run cmd (stdout: one JSON line), sampling the RSS of its whole process tree; returns
    (its JSON or {"error": ...}, peak tree RSS in MiB)."""
    out_path = log.with_suffix(".out")
    with (
        open(log, "w") as err,
        open(out_path, "w") as out,
        subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True) as popen,
    ):
        proc, peak, deadline = psutil.Process(popen.pid), 0, time.monotonic() + timeout_s
        tree, n = [proc], 0
        while popen.poll() is None:
            if n % RELIST_EVERY == 0:  # listing children scans /proc: ~1.6 ms, not every time
                try:
                    tree = [proc, *proc.children(recursive=True)]
                except psutil.NoSuchProcess:
                    pass
            n, rss = n + 1, 0
            for p in tree:
                try:
                    rss += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass  # it left; the next listing drops it
            peak = max(peak, rss)
            if time.monotonic() > deadline:
                kill_tree(proc)
                return {"error": f"timed out after {timeout_s:.0f} s"}, peak / 2**20
            time.sleep(SAMPLE_S)
    lines = out_path.read_text(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1]), peak / 2**20
    except (IndexError, json.JSONDecodeError):
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {popen.returncode}: {tail[0][:300]}"}, peak / 2**20


def run_one(system: str, m: int, steps: int, tmp: Path, timeout_s: float) -> dict:
    out = tmp / f"{system}-{m}"
    out.mkdir(parents=True)
    args = [system, str(m), str(steps), str(out)]
    try:
        r, peak = watched(
            [sys.executable, "-m", "benchmarks.peers_run", *args], tmp / "run.log", timeout_s
        )
        r["peak_rss_mib"] = peak
        if "error" not in r:
            r["metrics_per_s"] = m * steps / (r["log_s"] + r["close_s"])
            chk, _ = watched(
                [sys.executable, "-m", "benchmarks.peers_check", *args], tmp / "check.log", 900
            )
            r.update(chk)
            r.setdefault("verified", f"failed: {chk.get('error', 'no result')}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    r.setdefault("verified", f"failed: {r.get('error')}")
    return {"system": system, "m": m, "steps": steps, **r}


# ---- the figures --------------------------------------------------------------------------------
def summarize(runs: list[dict]) -> dict:
    """Medians over a (system, M)'s repeats; verified is "yes" only if every repeat was."""
    ok = [r for r in runs if "metrics_per_s" in r]
    bad = [r["verified"] for r in runs if r["verified"] != "yes"]

    def med(key: str) -> float | None:
        xs = [r[key] for r in ok if key in r]
        return statistics.median(xs) if xs else None

    return {
        "system": runs[0]["system"],
        "m": runs[0]["m"],
        "steps": runs[0]["steps"],
        "metrics_per_s": med("metrics_per_s"),
        "cpu_us_per_value": med("cpu_s") and med("cpu_s") / (runs[0]["m"] * runs[0]["steps"]) * 1e6,
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
        "base_rss_mib": med("rss_ready_mib"),
        "bytes_per_value": med("bytes") and med("bytes") / (runs[0]["m"] * runs[0]["steps"]),
        "verified": "yes" if not bad else f"{bad[0]} ({len(bad)}/{len(runs)} runs)",
        **{k: med(k) for k in ("setup_s", "log_s", "close_s")},
    }


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "failed"
    return f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x / 1e3:.1f} k"


def ratio(x: float | None, base: float | None, digits: int = 3, missing: str = "-") -> str:
    return f"{x / base:.{digits}g}" if x and base else missing


def table(rows: list[dict]) -> list[str]:
    out = [
        "| M | system | steps | metrics/s | x floor | x faster peer | CPU us/value | "
        "peak RSS MiB | B/value | verified |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        same = {x["system"]: x for x in rows if x["m"] == r["m"]}
        floor = same.get(FLOOR, {}).get("metrics_per_s")
        peer = max((same[p]["metrics_per_s"] or 0 for p in PEERS if p in same), default=0)
        rate = r["metrics_per_s"]
        cpu, bpv = r["cpu_us_per_value"], r["bytes_per_value"]
        out.append(
            f"| {r['m']:,} | {r['system']} | {r['steps']} | {fmt_rate(rate)} | {ratio(rate, floor)} | "
            f"{ratio(rate, peer) if r['system'] not in PEERS else '-'} | "
            f"{'-' if cpu is None else f'{cpu:.3g}'} | {r['peak_rss_mib']:,.0f} | "
            f"{'-' if bpv is None else f'{bpv:.2f}'} | {r['verified']} |"
        )
    return out


def last_line(rows: list[dict]) -> str:
    m = max(r["m"] for r in rows)
    at = {r["system"]: r for r in rows if r["m"] == m}
    sw = at.get("stepwatch", {}).get("metrics_per_s")
    peers = [(at[p]["metrics_per_s"], p) for p in PEERS if at.get(p, {}).get("metrics_per_s")]
    best, name = max(peers) if peers else (None, "none")
    floor = at.get(FLOOR, {}).get("metrics_per_s")
    return (
        f"peers M={m} stepwatch={'failed' if sw is None else f'{sw:.0f}'} "
        f"fastest_peer={name}:{'n/a' if best is None else f'{best:.0f}'} "
        f"ratio={ratio(sw, best, 4, 'n/a')} floor_ratio={ratio(sw, floor, 4, 'n/a')}"
    )


# ---- the benchmark ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.peers", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--metrics", default="10000,100000,1000000", help="M values, comma-separated")
    ap.add_argument("--steps", default="100,20,5", help="S per M (one value: the same for all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--timeout", type=float, default=600, help="per run, seconds")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "PEERS.md"), help="'' = none")
    ap.add_argument("--json", help="also write every run's raw figures here")
    a = ap.parse_args(argv)
    ms = [int(x) for x in a.metrics.split(",")]
    steps = [int(x) for x in a.steps.split(",")]
    steps = steps * len(ms) if len(steps) == 1 else steps
    systems = a.systems.split(",")
    if len(steps) != len(ms) or not set(systems) <= set(SYSTEMS):
        ap.error(f"--steps needs one value or one per M; --systems from {SYSTEMS}")
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="stepwatch-peers-") as tmp:
        for m, s in zip(ms, steps):
            for rep in range(a.repeats):
                k = rep % len(systems)
                for system in systems[k:] + systems[:k]:  # rotated: nobody always goes first
                    r = run_one(system, m, s, Path(tmp), a.timeout)
                    runs.append({**r, "repeat": rep})
                    print(
                        f"  M={m:,} repeat {rep} {system}: {fmt_rate(r.get('metrics_per_s'))}"
                        f"/s, {r['verified']}",
                        file=sys.stderr,
                        flush=True,
                    )
    rows = [
        summarize([r for r in runs if r["m"] == m and r["system"] == system])
        for m in ms
        for system in systems
    ]
    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}" for p in ("torch", "wandb", "tensorboard")
    )
    head = (
        f"{time.strftime('%Y-%m-%d %H:%M')} on {machine()}; {versions}. "
        f"`python -m benchmarks.peers --metrics {a.metrics} --steps {a.steps} --repeats "
        f"{a.repeats}` took {time.perf_counter() - t0:.0f} s; load average "
        f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (shared cores)."
    )
    base = [r["base_rss_mib"] for r in rows if r["base_rss_mib"]]
    note = (
        "Medians of the repeats. metrics/s: M x S over first named call to close returned "
        "(stepwatch: durable, every step acknowledged by the collector). CPU: user + system "
        "of the whole process tree over that window, per logged value. Peak RSS: the tree "
        "(stepwatch: client + collector; wandb: client + wandb-core), each process with torch "
        f"loaded (~{statistics.median(base or [0]):.0f} MiB before logging). B/value: bytes "
        "on disk over M x S logged values, names included (stepwatch: a world-1 run's "
        "reduced values refer to its raw vectors, each value stored once). verified: every "
        "stored value read back by the "
        "system's own reader, names and values exact."
    )
    text = "\n".join(["# stepwatch vs peers", "", head, "", note, "", *table(rows), ""])
    line = last_line(rows)
    print(text)
    print(line)
    if a.out:
        Path(a.out).write_text(text + "\n" + line + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
