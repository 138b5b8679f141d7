"""Recorded training runs for the detection benchmark: train once, replay the detectors often.

A run is recorded the way a user would run it - model/ trains with a hooks `Monitor` streaming
to a real collector (in-process here, with detection off: the recording is what an
observe-only run stores) - and kept as one compressed .npz of its reduced steps (dense
[steps x metrics] values, a "sent" mask, the metric dictionary). Replaying builds exactly the
StepFrames the collector builds online (analytics/frame.py), so the detector classes see the
same inputs they would see live.

Faults start at a fixed step (`fork`). Training is bit-identical up to it whatever is injected
later (model/faults.py acts only from its step on), so each (preset, seed) trains its first
`fork` steps once, checkpoints, and every case of that seed resumes from the checkpoint:

    clean   prefix [0, fork) + clean continuation [fork, steps)
    fault   prefix [0, fork) + the faulted continuation [fork, fork + length)

    python -m benchmarks.detection_runs --preset demo --seeds 0-7 [--cache DIR]

records (or finds in the cache) every case of benchmarks/detection.py for those seeds.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analytics.catalog import MetricIndex
from analytics.frame import StepFrame

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "detection-cache"
STEPS = 300  # the schedule of every recorded run (warmup + cosine over 300 steps)
FORK = 100  # faults start here

log = logging.getLogger("benchmarks.detection_runs")


# ---- a recorded run ----------------------------------------------------------------------
@dataclass
class Recording:
    """The reduced steps of one run: what the collector's detectors were (or would be) fed."""

    name: str
    steps: np.ndarray  # int64 [S]
    values: np.ndarray  # float32 [S, M]; NaN where not sent (or sent as NaN)
    sent: np.ndarray  # bool [S, M]
    metrics: dict[str, list]  # metric dictionary columns: name, layer, expert, head, stat

    def index(self) -> MetricIndex:
        m = self.metrics
        return MetricIndex.from_columns(
            range(len(m["name"])), m["name"], m["layer"], m["expert"], m["head"], m["stat"]
        )

    def frames(self, run: str | None = None):
        """StepFrames in step order, as collector/detect.py builds them for a one-rank run."""
        run = run or self.name
        for i, step in enumerate(self.steps.tolist()):
            vals = self.values[i].astype(np.float64)
            present = self.sent[i].copy()
            yield StepFrame(run, int(step), vals, present, (0,), lambda v=vals: {0: v})

    def column(self, name: str) -> np.ndarray:
        i = self.metrics["name"].index(name)
        return self.values[:, i].astype(np.float64)

    def then(self, other: Recording, name: str) -> Recording:
        """This run's steps before `other` starts, followed by `other`."""
        if other.metrics["name"] != self.metrics["name"]:
            raise ValueError(f"{other.name}: metric dictionary differs from {self.name}'s")
        keep = self.steps < other.steps[0]
        return Recording(
            name,
            np.concatenate([self.steps[keep], other.steps]),
            np.concatenate([self.values[keep], other.values]),
            np.concatenate([self.sent[keep], other.sent]),
            self.metrics,
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
        np.savez_compressed(
            tmp,
            steps=self.steps,
            values=self.values,
            sent=self.sent,
            **{f"m_{k}": np.asarray(v) for k, v in self.metrics.items()},
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, name: str | None = None) -> Recording:
        path = Path(path)
        with np.load(path) as z:
            metrics = {k: z[f"m_{k}"].tolist() for k in ("name", "layer", "expert", "head", "stat")}
            return cls(name or path.stem, z["steps"], z["values"], z["sent"], metrics)

    @classmethod
    def from_store(cls, store, run: str, name: str | None = None) -> Recording:
        from analytics.offline import iter_frames

        m = store.metrics(run)
        index = MetricIndex.from_frame(m)
        steps, vals, sent = [], [], []
        for f in iter_frames(store, run, index):
            steps.append(f.step)
            vals.append(np.where(f.present, f.values, np.nan).astype(np.float32))
            sent.append(f.present)
        cols = {k: m[k].to_list() for k in ("name", "layer", "expert", "head", "stat")}
        return cls(name or run, np.asarray(steps, np.int64), np.vstack(vals), np.vstack(sent), cols)


# ---- recording --------------------------------------------------------------------------
class Recorder:
    """One in-process collector (memory store, detection off) that training runs stream to."""

    def __init__(self, cache: Path = CACHE) -> None:
        from collector import Collector, CollectorConfig
        from store import open_store

        self.cache = Path(cache)
        self.store = open_store("memory:")
        self.collector = Collector(
            self.store, CollectorConfig(flush_interval_s=0.05, detect=False, insecure=True)
        )
        self.address = f"127.0.0.1:{self.collector.start()}"
        self._n = 0

    def close(self) -> None:
        self.collector.stop()
        self.store.close()

    def segment(
        self,
        preset: str,
        seed: int,
        injects: list[str],
        start: int,
        stop: int,
        checkpoint_out: Path | None = None,
        resume: Path | None = None,
    ) -> Recording:
        """Train steps [start, stop) of the seed's STEPS-step schedule with `injects`."""
        import torch

        from hooks import Monitor
        from model.monitoring import DeferredMonitor
        from model.run_config import TrainConfig
        from model.train import train

        torch.set_num_threads(1)  # deterministic numerics; the other core runs the collector
        self._n += 1
        run = f"seg{os.getpid()}-{self._n}"
        cfg = TrainConfig(
            preset=preset,
            steps=STEPS,
            stop_at=stop,
            seed=seed,
            batch_size=8,
            injects=list(injects),
            checkpoint=str(checkpoint_out) if checkpoint_out else None,
            resume=str(_retarget(resume, injects, preset, seed)) if resume else None,
        )
        monitor = DeferredMonitor(
            lambda model, opt: Monitor(model, opt, target=self.address, run=run)
        )
        result = train(cfg, monitor=monitor)
        if result.monitor_errors or result.start_step != start:
            raise RuntimeError(f"{run}: monitor errors {result.monitor_errors}, start {start}")
        return Recording.from_store(self.store, run)


def _retarget(checkpoint: Path, injects: list[str], preset: str, seed: int) -> Path:
    """The clean prefix's checkpoint, re-labelled with the faulted run's settings: the state at
    `fork` is the same for both (faults act only from their step on)."""
    import torch

    from model.run_config import TrainConfig

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = TrainConfig(preset=preset, steps=STEPS, seed=seed, batch_size=8, injects=list(injects))
    state["trajectory"] = cfg.trajectory()
    out = checkpoint.with_name(checkpoint.stem + f".as{os.getpid()}.pt")
    torch.save(state, out)
    return out


def cache_path(cache: Path, preset: str, seed: int, name: str) -> Path:
    return Path(cache) / f"{preset}-s{seed}-{name}.npz"


def prefix(rec: Recorder, preset: str, seed: int) -> tuple[Recording, Path]:
    """Steps [0, FORK) of the seed (cached) and the checkpoint to fork from."""
    path = cache_path(rec.cache, preset, seed, "prefix")
    ckpt = path.with_suffix(".pt")
    if path.exists() and ckpt.exists():
        return Recording.load(path), ckpt
    t0 = time.perf_counter()
    r = rec.segment(preset, seed, [], 0, FORK, checkpoint_out=ckpt)
    r.save(path)
    log.info("recorded %s in %.0f s", path.name, time.perf_counter() - t0)
    return Recording.load(path), ckpt


def recording(
    rec: Recorder, preset: str, seed: int, name: str, injects: list[str], stop: int
) -> Recording:
    """prefix + the continuation [FORK, stop) with `injects` (cached under `name`)."""
    path = cache_path(rec.cache, preset, seed, name)
    pre, ckpt = prefix(rec, preset, seed)
    if not path.exists():
        t0 = time.perf_counter()
        seg = rec.segment(preset, seed, injects, FORK, stop, resume=ckpt)
        seg.save(path)
        log.info("recorded %s in %.0f s", path.name, time.perf_counter() - t0)
    return pre.then(Recording.load(path), f"{preset}-s{seed}-{name}")


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main(argv: list[str] | None = None) -> None:
    from benchmarks.detection import cases_for

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo", choices=("tiny", "demo"))
    ap.add_argument("--seeds", default="0-1", help="e.g. 0-7")
    ap.add_argument("--cache", default=str(CACHE))
    ap.add_argument("--clean-only", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("model.train").setLevel(logging.WARNING)
    rec = Recorder(Path(args.cache))
    try:
        for seed in _seeds(args.seeds):
            for case in cases_for(rec, args.preset, seed, clean_only=args.clean_only):
                recording(rec, args.preset, seed, case.name, list(case.injects), case.stop)
    finally:
        rec.close()


if __name__ == "__main__":
    main()
