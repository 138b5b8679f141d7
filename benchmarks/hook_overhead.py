"""Hook overhead: the demo model's training-step time with the full Monitor vs without.

Two identical models (same init, same batches) train side by side; their steps are interleaved
one by one, alternating which goes first, so machine noise hits both alike. The Monitor streams
to a real collector process on loopback (Parquet store in a temp dir), as in production.

    python -m benchmarks.hook_overhead [--preset demo] [--steps 60] [--device cpu|cuda]
                                       [--threads N]

Wall time and the training thread's CPU time are both measured per step. On a machine whose cores
the collector and the sender share with training (this 2-core VM), the wall ratio at torch's default
thread count mostly measures scheduling stalls of the intra-op pool (an OpenMP barrier waits for a
descheduled thread); `--threads 1` leaves a core for the collector and measures the hooks.

Last line: `overhead_ratio=<median monitored / median plain> plain_ms=<> monitored_ms=<>
cpu_ratio=<median training-thread CPU, monitored / plain>`.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time

import torch

from collector.process import start_collector, stop_collector
from hooks import Monitor
from model.config import get_preset
from model.data import get_batch, load_corpus
from model.transformer import MoETransformer


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.node()} {cpu} {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def timed_step(model, opt, x, y, monitor, step: int, lr: float) -> tuple[float, float]:
    """One training step; returns (wall seconds, this thread's CPU seconds), synchronised on
    CUDA."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.thread_time()
    if monitor:
        monitor.step_begin(step)
    out = model(x, y)
    out.loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if monitor:
        monitor.before_optimizer(step, gnorm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if monitor:
        monitor.step_end(
            step,
            loss=out.main_loss.detach(),
            mtp_losses=[m.detach() for m in out.mtp_losses],
            lr=lr,
            tokens=x.numel(),
        )
    sync()
    return time.perf_counter() - t0, time.thread_time() - c0


def run(preset: str, steps: int, warmup: int, batch: int, device: str) -> dict:
    cfg = get_preset(preset)
    torch.manual_seed(0)
    plain = MoETransformer(cfg).to(device)
    monitored = copy.deepcopy(plain)
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    opt_m = torch.optim.AdamW(monitored.parameters(), lr=1e-3)
    corpus = load_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_collector(
            f"parquet:{tmp}/store", "--insecure", log_path=f"{tmp}/collector.log"
        )
        try:
            mon = Monitor(monitored, opt_m, target=address, run="hook-overhead")
            times: dict[str, list[float]] = {"plain": [], "monitored": []}
            cpu: dict[str, list[float]] = {"plain": [], "monitored": []}
            for step in range(warmup + steps):
                x, y = get_batch(corpus.train, batch, cfg.max_seq_len, seed=0, step=step)
                x, y = x.to(device), y.to(device)
                order = [("plain", plain, opt_p, None), ("monitored", monitored, opt_m, mon)]
                if step % 2:
                    order.reverse()
                for name, model, opt, m in order:
                    dt, dc = timed_step(model, opt, x, y, m, step, 1e-3)
                    if step >= warmup:
                        times[name].append(dt)
                        cpu[name].append(dc)
            mon.close()
            stats = mon.stats()
        finally:
            stop_collector(proc)
    plain_ms = statistics.median(times["plain"]) * 1e3
    mon_ms = statistics.median(times["monitored"]) * 1e3
    cpu_ratio = statistics.median(cpu["monitored"]) / statistics.median(cpu["plain"])
    return {
        "threads": torch.get_num_threads(),
        "cpu_ratio": cpu_ratio,
        "preset": preset,
        "device": device,
        "steps": steps,
        "batch": batch,
        "plain_ms": plain_ms,
        "monitored_ms": mon_ms,
        "ratio": mon_ms / plain_ms,
        "monitor_stats": stats,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args.preset, args.steps, args.warmup, args.batch, args.device)
    print("| preset | device | threads | steps | plain (ms) | monitored (ms) | ratio | CPU ratio |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {r['preset']} | {r['device']} | {r['threads']} | {r['steps']} | {r['plain_ms']:.1f} | "
        f"{r['monitored_ms']:.1f} | {r['ratio']:.3f} | {r['cpu_ratio']:.3f} |"
    )
    print(f"machine: {r['machine']}; {time.strftime('%Y-%m-%d')}")
    print(f"monitor: {r['monitor_stats']}")
    print(
        f"overhead_ratio={r['ratio']:.4f} plain_ms={r['plain_ms']:.2f} "
        f"monitored_ms={r['monitored_ms']:.2f} cpu_ratio={r['cpu_ratio']:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
