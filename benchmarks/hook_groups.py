"""Hook overhead by stat group: which part of the Monitor costs the training thread its CPU.

The demo model trains as several identical copies (same init, same batches), one plain, one
with every stat group, one with only the host-side `train` group, and one per group with that
group switched off. Their steps are interleaved one by one, the order rotating every step, and
each step's CPU time of the training thread is taken (`time.thread_time`: what the hooks
themselves add, not the collector or sender sharing the cores). Every Monitor streams to one
real collector process on loopback (Parquet in a temp dir).

    python -m benchmarks.hook_groups [--steps 12] [--threads 1] [--device cpu|cuda]

Prints one line per variant: `<variant> cpu <median ms> ratio <median / plain median> wall
<median ms> ratio <...>`; a group's cost is `all` minus its `-group` line. On CUDA the line
also gives the kernels (and copies) one step launches, counted by torch.profiler: a small
model's step there is bound by launches, and so is what the hooks add; the training thread's
CPU time also counts its wait in the step's final synchronize there, so read wall.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile

import torch

from benchmarks.hook_overhead import machine, timed_step
from collector.process import start_collector, stop_collector
from hooks import Monitor, MonitorConfig
from hooks.config import STAT_GROUPS
from model.config import get_preset
from model.data import get_batch, load_corpus
from model.transformer import MoETransformer


def kernels_per_step(model, opt, x, y, monitor, step: int) -> int:
    """CUDA kernels and copies one training step launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timed_step(model, opt, x, y, monitor, step, 1e-3)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def run(steps: int, warmup: int, preset: str, device: str = "cpu") -> dict[str, dict]:
    """Per variant: median training-thread CPU and wall seconds, and on CUDA kernels a step."""
    cfg = get_preset(preset)
    torch.manual_seed(0)
    base = MoETransformer(cfg).to(device)
    variants: dict[str, tuple[str, ...] | None] = {
        "plain": None,
        "all": STAT_GROUPS,
        "train": ("train",),
    }
    for g in STAT_GROUPS:
        if g != "train":
            variants["-" + g] = tuple(x for x in STAT_GROUPS if x != g)
    models = {k: copy.deepcopy(base) for k in variants}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    corpus = load_corpus()
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    kernels: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_collector(f"parquet:{tmp}/store", "--insecure")
        try:
            mons = {
                k: None
                if g is None
                else Monitor(
                    models[k],
                    opts[k],
                    target=address,
                    run="groups-" + k.lstrip("-"),
                    config=MonitorConfig(groups=g),
                )
                for k, g in variants.items()
            }
            keys = list(variants)
            for s in range(warmup + steps):
                x, y = get_batch(corpus.train, 8, cfg.max_seq_len, seed=0, step=s)
                x, y = x.to(device), y.to(device)
                for k in keys[s % len(keys) :] + keys[: s % len(keys)]:
                    dt, dc = timed_step(models[k], opts[k], x, y, mons[k], s, 1e-3)
                    if s >= warmup:
                        cpu[k].append(dc)
                        wall[k].append(dt)
            if x.is_cuda:  # one more step each, profiled (a periodic one for none of them)
                s = warmup + steps
                s += 1 if s % MonitorConfig().param_norm_every == 0 else 0
                for k in keys:
                    kernels[k] = kernels_per_step(models[k], opts[k], x, y, mons[k], s)
            for m in mons.values():
                if m is not None:
                    m.close()
        finally:
            stop_collector(proc)
    return {
        k: {
            "cpu": statistics.median(cpu[k]),
            "wall": statistics.median(wall[k]),
            "kernels": kernels.get(k),
        }
        for k in variants
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    med = run(args.steps, args.warmup, args.preset, args.device)
    print(f"machine: {machine()}; device {args.device}")
    plain = med["plain"]
    for k, v in med.items():
        line = (
            f"{k:8s} cpu {v['cpu'] * 1e3:7.1f} ms  ratio {v['cpu'] / plain['cpu']:.3f}  "
            f"wall {v['wall'] * 1e3:7.1f} ms  ratio {v['wall'] / plain['wall']:.3f}"
        )
        if v["kernels"] is not None:
            line += f"  kernels {v['kernels']} (+{v['kernels'] - plain['kernels']})"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
