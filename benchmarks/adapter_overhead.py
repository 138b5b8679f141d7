"""Adapter overhead: step time of a tiny Hugging Face Mixtral or torchtitan MoE with the full
Monitor (shipped adapter picked automatically) vs without, with and without attention-logit
capture.

Three identical models (same init, same batches) train side by side: plain, monitored with every
stat group, monitored without the "attn" group. Their steps are interleaved one by one, the
order rotating every step, so machine noise hits all alike. Each Monitor streams to a real
collector process on loopback (Parquet store in a temp dir), as in production.

    python -m benchmarks.adapter_overhead --family hf-mixtral   # project venv
    python -m benchmarks.adapter_overhead --family torchtitan   # .venv-titan (make bench-adapters)

Both wall time and the training thread's CPU time are measured per step (on a shared,
oversubscribed machine the wall ratio mostly measures scheduling stalls: every extra op is one
more barrier of the intra-op thread pool). `--threads 1` is the honest setting there.

Last line: `ratio_all=<median monitored / median plain> ratio_no_attn=<...> cpu_ratio_all=...`.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.hook_overhead import machine
from collector.process import start_collector, stop_collector
from hooks import Monitor, MonitorConfig
from hooks.config import STAT_GROUPS

VOCAB = 128


def hf_mixtral(seed: int = 0) -> nn.Module:
    """The issue's new-user model: hidden 64, 3 layers, 8 experts, top-2, random weights."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    return MixtralForCausalLM(config)


def hf_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    return model(input_ids=idx, labels=idx).loss


def titan_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx)
    targets = torch.roll(idx, -1, dims=1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def family(name: str) -> tuple[nn.Module, Callable]:
    if name == "hf-mixtral":
        return hf_mixtral(), hf_loss
    if name == "torchtitan":
        from benchmarks.titan_models import deepseek_moe

        return deepseek_moe(), titan_loss
    raise ValueError(f"unknown family {name!r}")


def one_step(model, opt, idx, loss_fn, monitor, step: int) -> tuple[float, float]:
    """(wall seconds, training-thread CPU seconds) of one step."""
    t0, c0 = time.perf_counter(), time.thread_time()
    if monitor:
        monitor.step_begin(step)
    loss = loss_fn(model, idx)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if monitor:
        monitor.before_optimizer(step, gnorm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if monitor:
        monitor.step_end(step, loss=loss.detach(), lr=1e-3, tokens=idx.numel())
    return time.perf_counter() - t0, time.thread_time() - c0


def run(name: str, steps: int, warmup: int, batch: int, seq: int) -> dict:
    base, loss_fn = family(name)
    models = {k: copy.deepcopy(base) for k in ("plain", "all", "no_attn")}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = start_collector(
            f"parquet:{tmp}/store", "--insecure", log_path=f"{tmp}/collector.log"
        )
        try:
            mons = {
                "plain": None,
                "all": Monitor(models["all"], opts["all"], target=address, run=f"{name}-all"),
                "no_attn": Monitor(
                    models["no_attn"],
                    opts["no_attn"],
                    target=address,
                    run=f"{name}-no-attn",
                    config=MonitorConfig(groups=frozenset(STAT_GROUPS) - {"attn"}),
                ),
            }
            gen = torch.Generator().manual_seed(0)
            order = list(models)
            for step in range(warmup + steps):
                idx = torch.randint(0, VOCAB, (batch, seq), generator=gen)
                order = order[1:] + order[:1]  # rotate who goes first
                for k in order:
                    dt, dc = one_step(models[k], opts[k], idx, loss_fn, mons[k], step)
                    if step >= warmup:
                        times[k].append(dt)
                        cpu[k].append(dc)
            stats = {}
            for k, mon in mons.items():
                if mon is not None:
                    mon.close()
                    stats[k] = {
                        s: v for s, v in mon.stats().items() if "error" in s or s == "steps"
                    }
        finally:
            stop_collector(proc)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    cpu_med = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}

    def paired(t: dict[str, list[float]], k: str) -> float:
        """Median over rounds of (k's step / the plain step of the same round): load that
        drifts over the run cancels within a round."""
        return statistics.median(a / b for a, b in zip(t[k], t["plain"]))

    return {
        "paired_all": paired(times, "all"),
        "paired_no_attn": paired(times, "no_attn"),
        "cpu_paired_all": paired(cpu, "all"),
        "cpu_paired_no_attn": paired(cpu, "no_attn"),
        "cpu_ms": cpu_med,
        "cpu_ratio_all": cpu_med["all"] / cpu_med["plain"],
        "cpu_ratio_no_attn": cpu_med["no_attn"] / cpu_med["plain"],
        "threads": torch.get_num_threads(),
        "family": name,
        "steps": steps,
        "batch": batch,
        "seq": seq,
        "ms": med,
        "ratio_all": med["all"] / med["plain"],
        "ratio_no_attn": med["no_attn"] / med["plain"],
        "monitor_stats": stats,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--family", choices=("hf-mixtral", "torchtitan"), default="hf-mixtral")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args.family, args.steps, args.warmup, args.batch, args.seq)
    ms = r["ms"]
    print(
        "| model | steps | batch x seq | plain (ms) | monitored (ms) | ratio | no attn (ms) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {r['family']} | {r['steps']} | {r['batch']}x{r['seq']} | {ms['plain']:.1f} | "
        f"{ms['all']:.1f} | {r['ratio_all']:.3f} | {ms['no_attn']:.1f} | "
        f"{r['ratio_no_attn']:.3f} |"
    )
    c = r["cpu_ms"]
    print(
        f"| {r['family']}, training-thread CPU | {r['steps']} | {r['batch']}x{r['seq']} | "
        f"{c['plain']:.1f} | {c['all']:.1f} | {r['cpu_ratio_all']:.3f} | {c['no_attn']:.1f} | "
        f"{r['cpu_ratio_no_attn']:.3f} |"
    )
    print(
        f"paired (median per-round ratio): wall all {r['paired_all']:.3f}, no attn "
        f"{r['paired_no_attn']:.3f}; CPU all {r['cpu_paired_all']:.3f}, no attn "
        f"{r['cpu_paired_no_attn']:.3f}; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"machine: {r['machine']}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"monitor: {r['monitor_stats']}")
    print(
        f"ratio_all={r['ratio_all']:.4f} ratio_no_attn={r['ratio_no_attn']:.4f} "
        f"cpu_ratio_all={r['cpu_ratio_all']:.4f} cpu_ratio_no_attn={r['cpu_ratio_no_attn']:.4f} "
        f"plain_ms={ms['plain']:.2f} monitored_ms={ms['all']:.2f} no_attn_ms={ms['no_attn']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
