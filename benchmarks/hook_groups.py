"""Hook overhead by stat group: which part of the Monitor costs the training thread its CPU.

The demo model trains as several identical copies (same init, same batches), one plain, one
with every stat group, one with only the host-side `train` group, and one per group with that
group switched off. Their steps are interleaved one by one, the order rotating every step, and
each step's CPU time of the training thread is taken (`time.thread_time`: what the hooks
themselves add, not the collector or sender sharing the cores). Every Monitor streams to one
real collector process on loopback (Parquet in a temp dir).

    python -m benchmarks.hook_groups [--steps 12] [--threads 1]

Prints one line per variant: `<variant> cpu <median ms> ratio <median / plain median>`; a
group's cost is `all` minus its `-group` line.
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


def run(steps: int, warmup: int, preset: str) -> dict[str, float]:
    cfg = get_preset(preset)
    torch.manual_seed(0)
    base = MoETransformer(cfg)
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
                for k in keys[s % len(keys) :] + keys[: s % len(keys)]:
                    _, dc = timed_step(models[k], opts[k], x, y, mons[k], s, 1e-3)
                    if s >= warmup:
                        cpu[k].append(dc)
            for m in mons.values():
                if m is not None:
                    m.close()
        finally:
            stop_collector(proc)
    return {k: statistics.median(v) for k, v in cpu.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    med = run(args.steps, args.warmup, args.preset)
    print(f"machine: {machine()}")
    for k, v in med.items():
        print(f"{k:8s} cpu {v * 1e3:7.1f} ms  ratio {v / med['plain']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
