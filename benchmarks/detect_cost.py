"""Online detection cost: ms per reduced step of the collector's DetectorSet at benchmark scale.

The collector judges every reduced step (collector/detect.py: StepFrame.from_rows ->
DetectorSet.observe); at 6M raw metrics per step the benchmark workload (benchmarks/workload.py,
45 layers x 288 experts x 5 stats + layer stats) reduces to ~65,000 metrics, and detection
shares the collector's 1 s per step with everything else. This feeds `--steps` steps of that
workload's reduced values through a default DetectorSet, frame built the way the collector
builds it (its injected blow-up starts at step 20; its dying expert is starved from ~step 17
and, with no parameter norms in the workload, reported starved after ExpertDeath's 200-step long
window: hence 240 steps), and reports per step:

  frame_ms    StepFrame.from_rows over the step's reduced rows (the baseline: touching the
              step's values once, which detection cannot avoid)
  detect_ms   DetectorSet.observe, median over the timed steps, and per detector
  ratio       detect_ms / frame_ms (machine noise hits both alike)
  first_ms    the first step's DetectorSet.observe, which also builds the MetricIndex's id
              grids (once per run, again whenever the dictionary grows)

    python -m benchmarks.detect_cost [--experts 288] [--layers 45] [--steps 240] [--warmup 5]

`--experts 2880` gives ~650,000 metrics per step (10x). The last line is
`metrics=<n> detect_ms=<> frame_ms=<> ratio=<> first_ms=<> events=<kinds>`; the events show
that the injected anomalies are still flagged.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Iterator

import numpy as np

from analytics.catalog import MetricIndex, site_of
from analytics.detectors import DetectorSet
from analytics.frame import StepFrame
from benchmarks.workload import Values, Workload


def run_index(w: Workload) -> MetricIndex:
    """The run's MetricIndex: every distinct metric, ids in Workload.global_ids order."""
    specs = w.common + w.experts
    return MetricIndex.from_columns(
        range(len(specs)),
        [s.name for s in specs],
        [s.layer for s in specs],
        [s.expert for s in specs],
        [s.head for s in specs],
        [s.stat for s in specs],
    )


def reduced_steps(w: Workload, index: MetricIndex, steps: int) -> Iterator[np.ndarray]:
    """Per step, one reduced value per distinct metric (each EP group's slice taken from one
    of its ranks: the jitter between replicas is ~1%, below anything a detector looks at)."""
    vals = Values(w)
    groups = range(min(w.world, w.n_groups))
    ids = [w.global_ids(g) for g in groups]
    # Workload.spike_site names the expert's first metric (`tokens`), which Values never
    # multiplies (it spikes act_maxabs only): apply the x40 to that expert's act_maxabs here
    spike = (
        -1
        if w.spike_site.stat == "act_maxabs"
        else index.find(site_of(w.spike_site.name) + "/act_maxabs")
    )
    for s in range(steps):
        vec = np.full(index.size, np.nan, np.float32)
        for g, gid in zip(groups, ids):
            vec[gid] = vals.step(g, s)
        if spike >= 0 and s >= w.spike_step:
            vec[spike] *= 40
        yield vec


def measure(w: Workload, steps: int, warmup: int) -> dict:
    index = run_index(w)
    ids = np.arange(index.size, dtype=np.int64)
    det = DetectorSet()
    frame_ms, detect_ms, events = [], [], []
    for s, vec in enumerate(reduced_steps(w, index, steps)):
        t0 = time.perf_counter()
        frame = StepFrame.from_rows("bench", s, ids, vec, index.size, (0,))
        t1 = time.perf_counter()
        events += det.observe(frame, index)
        t2 = time.perf_counter()
        if s == 0:  # builds the index's id grids: once per run
            first_ms = 1e3 * (t2 - t1)
        if s >= warmup:
            frame_ms.append(1e3 * (t1 - t0))
            detect_ms.append(1e3 * (t2 - t1))
    if det.errors:
        raise RuntimeError(f"detectors failed: {det.errors}")
    # per detector, on a fresh set over the same steps (observe() above is timed whole)
    fresh = DetectorSet().detectors
    per: dict[str, list[float]] = {n: [] for n in fresh}
    for s, vec in enumerate(reduced_steps(w, index, steps)):
        frame = StepFrame.from_rows("bench", s, ids, vec, index.size, (0,))
        for name, d in fresh.items():
            t0 = time.perf_counter()
            d.observe(frame, index)
            if s >= warmup:
                per[name].append(1e3 * (time.perf_counter() - t0))
    f, d = statistics.median(frame_ms), statistics.median(detect_ms)
    return {
        "metrics": index.size,
        "frame_ms": f,
        "detect_ms": d,
        "ratio": d / f,
        "first_ms": first_ms,
        "per_detector_ms": {n: statistics.median(v) for n, v in per.items()},
        "events": sorted({(e.kind, e.site, e.step) for e in events}),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.detect_cost", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--experts", type=int, default=288)
    ap.add_argument("--layers", type=int, default=45)
    ap.add_argument("--ranks", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args(argv)
    if not 0 <= a.warmup < a.steps:
        ap.error(f"--warmup must lie in [0, --steps={a.steps}), got {a.warmup}")
    seed = Workload.for_total(6_000_000, a.ranks)  # the seed's metrics per rank
    w = Workload(a.ranks, seed.metrics_per_rank, a.layers, a.experts)
    r = measure(w, a.steps, a.warmup)
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, numpy "
        f"{np.__version__}; {a.layers} layers x {a.experts} experts, {a.steps} steps "
        f"({a.warmup} warm-up)"
    )
    for name, ms in r["per_detector_ms"].items():
        print(f"  {name:<14} {ms:8.2f} ms")
    for kind, site, step in r["events"]:
        print(f"  event {kind}@{step} {site}")
    kinds = ",".join(sorted({k for k, _, _ in r["events"]})) or "none"
    print(
        f"metrics={r['metrics']} detect_ms={r['detect_ms']:.2f} frame_ms={r['frame_ms']:.2f} "
        f"ratio={r['ratio']:.1f} first_ms={r['first_ms']:.0f} events={kinds}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
