"""An expert's act_rms across data-parallel ranks: mean against mean_nonzero, on a real run.

A rank that routed an expert no token reports act_rms = 0 for it. Until mean_nonzero the
collector reduced act_rms as a plain mean over ranks, so such an expert's value was divided by
the ranks that never saw it. This trains the model with torchrun (R data-parallel ranks, each
its own batches) streaming to a real collector (Parquet), then reads every rank's raw act_rms
and token count back and compares, per (step, layer, expert):

  pooled        sqrt(sum_r tokens_r * act_rms_r^2 / sum_r tokens_r): the RMS over every row
                the expert saw on any rank, the value both reductions stand in for
  mean          sum_r act_rms_r / R (what was stored before)
  mean_nonzero  the mean over the ranks whose act_rms is not 0 (what is stored now, read back
                from the store's reduced values)

and how often each trips expert death's activation test (act_rms / its layer's median < 0.1,
analytics/detectors/expert_death.py) where the pooled value does not.

    python -m benchmarks.rank_dilution [--ranks 4] [--steps 40] [--preset demo] [--batch-size 1]

Last line: `rank_dilution cells=<n> partly_fed=<share fed on some but not all ranks>
mean_err=<median |mean/pooled - 1| over partly fed> nonzero_err=<same for mean_nonzero>
starved_mean=<cells> starved_nonzero=<cells> starved_pooled=<cells>`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from analytics.detectors.expert_death import layer_relative
from collector.process import start_collector, stop_collector
from store import open_store

ROOT = Path(__file__).resolve().parents[1]
RUN = "dilution"
RMS_THRESHOLD = 0.1  # ExpertDeath.rms_threshold


def train(address: str, ranks: int, steps: int, preset: str, batch: int, out: Path) -> None:
    """batch: sequences per rank (model.train takes the global batch)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}"]
    cmd += ["--standalone", "-m", "model.train", "--", "--preset", preset]
    cmd += ["--steps", str(steps), "--batch-size", str(batch * ranks), "--monitor", address]
    cmd += ["--run", RUN, "--out", str(out), "--threads", "1", "--log-every", "1000"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=3600)


def grids(store, steps: int, ranks: int) -> tuple[np.ndarray, ...]:
    """[steps, ranks, cells] raw act_rms and tokens, [steps, cells] stored reduced act_rms,
    and the layer of each cell."""
    red: list[np.ndarray] = []
    rms_l: list[np.ndarray] = []
    tok_l: list[np.ndarray] = []
    layer = np.zeros(0, np.int64)
    for s in range(steps):
        per_rms, per_tok = [], []
        for r in range(ranks):
            a = store.at_step(RUN, s, "moe/*/expert*/act_rms", rank=r).sort("name")
            t = store.at_step(RUN, s, "moe/*/expert*/tokens", rank=r).sort("name")
            per_rms.append(a["value"].to_numpy())
            per_tok.append(t["value"].to_numpy())
            layer = a["layer"].to_numpy()
        rms_l.append(np.stack(per_rms))
        tok_l.append(np.stack(per_tok))
        red.append(store.at_step(RUN, s, "moe/*/expert*/act_rms").sort("name")["value"].to_numpy())
    rms, tok = np.stack(rms_l).astype(np.float64), np.stack(tok_l).astype(np.float64)
    return rms, tok, np.stack(red).astype(np.float64), layer


def starved(x_SC: np.ndarray, layer_C: np.ndarray) -> np.ndarray:
    """Expert death's activation test per (step, cell): act_rms / its layer's median < 0.1."""
    out = np.zeros(x_SC.shape, bool)
    for l in np.unique(layer_C):
        cols = layer_C == l
        with np.errstate(invalid="ignore"):
            out[:, cols] = layer_relative(x_SC[:, cols]) < RMS_THRESHOLD
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch-size", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"parquet:{Path(tmp) / 'store'}"
        proc, address = start_collector(url, "--insecure", log_path=Path(tmp) / "collector.log")
        try:
            train(address, a.ranks, a.steps, a.preset, a.batch_size, Path(tmp) / "out")
        finally:
            stop_collector(proc)
        with open_store(url) as store:
            rms, tok, stored, layer = grids(store, a.steps, a.ranks)
    fed = (tok > 0).sum(axis=1)  # [steps, cells]: ranks that routed the expert a token
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.sqrt((tok * rms**2).sum(axis=1) / tok.sum(axis=1))
        pooled = np.where(fed > 0, pooled, 0.0)
        mean = rms.mean(axis=1)
        nz = (rms != 0).sum(axis=1)
        nonzero = np.where(nz > 0, rms.sum(axis=1) / np.maximum(nz, 1), 0.0)
    assert np.allclose(stored, nonzero, rtol=1e-5, atol=1e-7), "the store holds mean_nonzero"
    part = (fed > 0) & (fed < a.ranks)
    err = lambda x: float(np.median(np.abs(x[part] / pooled[part] - 1))) if part.any() else 0.0
    s_pooled = starved(pooled, layer)
    s_mean, s_nz = starved(mean, layer) & ~s_pooled, starved(nonzero, layer) & ~s_pooled
    print(
        f"# {a.ranks} ranks x {a.steps} steps of {a.preset}, batch {a.batch_size} per rank: "
        f"{fed.size} (step, expert) cells, fed on all ranks {float((fed == a.ranks).mean()):.3f}, "
        f"on some {float(part.mean()):.3f}, on none {float((fed == 0).mean()):.3f}"
    )
    print(
        f"rank_dilution cells={fed.size} partly_fed={float(part.mean()):.3f} "
        f"mean_err={err(mean):.3f} nonzero_err={err(nonzero):.3f} "
        f"starved_mean={int(s_mean.sum())} starved_nonzero={int(s_nz.sum())} "
        f"starved_pooled={int(s_pooled.sum())}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
