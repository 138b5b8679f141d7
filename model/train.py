"""Training loop for the MoE transformer: AdamW, warmup + cosine LR, gradient clipping, fault
injection, bit-identical checkpoint/resume, DDP (gloo) on CPU under torchrun.

    python -m model.train --preset tiny --steps 200 [--seed 0] [--inject blowup@50 ...]
        [--monitor HOST:PORT --run NAME [--token-file F] [--tls | --tls-ca PEM]]
        [--checkpoint PATH] [--resume PATH] [--out DIR]
    torchrun --nproc_per_node=2 -m model.train --preset tiny --steps 50

Monitor call points (an optional `monitor` object, model/monitoring.py's `TrainingMonitor`;
telemetry builds against these):

    monitor.attach(model, optimizer)           once, before the first step; model is the
                                               unwrapped MoETransformer (never the DDP wrapper)
    monitor.step_begin(step)                   before anything of `step` runs: staged clip
                                               updates applied here take effect for this step
    monitor.before_optimizer(step, grad_norm)  after backward and the DDP all-reduce, before
                                               clipping and optimizer.step(); grad_norm is the
                                               0-dim total-norm tensor (unclipped)
    monitor.step_end(step, loss=..., mtp_losses=[...], lr=float, tokens=int)
                                               after the optimizer and expert-bias updates; loss
                                               is the detached 0-dim main next-token loss of this
                                               rank, the very tensor whose float() is recorded in
                                               TrainResult.losses; tokens = tokens this rank
                                               processed this step
    monitor.close()                            at the end, also when training raises

`step` counts optimizer steps from 0 and continues across resumes. Exceptions from the per-step
call points and close are logged and counted (TrainResult.monitor_errors), never raised into
training; an exception from attach (before step 0) is a configuration error and is raised.
--monitor's token comes from $STEPWATCH_TOKEN, the file $STEPWATCH_TOKEN_FILE names, or
--token-file (never the command line); TLS from --tls (system roots) or --tls-ca / $STEPWATCH_TLS_CA. A step whose
gradient norm is not finite is skipped (no optimizer update) and listed in skipped_steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import PRESETS
from model.data import get_batch, load_corpus, val_batches
from model.faults import apply_faults, lr_multiplier
from model.monitoring import DeferredMonitor, SafeMonitor, TrainingMonitor
from model.run_config import TrainConfig, TrainResult
from model.transformer import MoETransformer

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "main"]

log = logging.getLogger("model.train")


# ---------------------------------------------------------------------------- helpers


def _setup_distributed() -> tuple[int, int, bool]:
    """(rank, world_size, we_initialized_it). torchrun sets WORLD_SIZE/RANK/MASTER_*."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _make_optimizer(model: MoETransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norm gains
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)


@torch.no_grad()
def evaluate(model: MoETransformer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean main next-token loss over fixed batches (eval mode: no expert-count updates)."""
    was_training = model.training
    model.eval()
    try:
        return sum(float(model(x, y).main_loss) for x, y in batches) / len(batches)
    finally:
        model.train(was_training)


def _all_reduce_expert_counts(model: MoETransformer) -> None:
    """Sum the step's per-expert token counts over ranks so every rank applies the same
    bias update (DDP runs with forward_sync_buffers=False: buffers stay rank-local otherwise)."""
    buffers = [moe.tokens_per_expert_E for _, moe in model.moe_layers()]
    if buffers:
        flat = torch.cat(buffers)
        dist.all_reduce(flat)
        for buf, part in zip(buffers, flat.split([b.numel() for b in buffers])):
            buf.copy_(part)


# ---------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, monitor: TrainingMonitor | None = None) -> TrainResult:
    """Run (or continue) training as configured; see the module docstring for monitor calls."""
    rank, world, owns_dist = _setup_distributed()
    mcfg = cfg.model_config()
    seq_len = cfg.seq_len or mcfg.max_seq_len
    if seq_len > mcfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len}")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} not divisible by world size {world}")
    corpus = load_corpus()
    val = val_batches(corpus, cfg.eval_batches, max(1, cfg.batch_size // world), seq_len, cfg.seed)

    torch.manual_seed(cfg.seed)
    model = MoETransformer(mcfg)
    optimizer = _make_optimizer(model, cfg)
    start = 0
    if cfg.resume:
        start = load_checkpoint(
            cfg.resume,
            model=model,
            optimizer=optimizer,
            model_config=mcfg.to_dict(),
            trajectory=cfg.trajectory(),
        )
    # Buffers are synced at init (identical anyway) but not on every forward: the expert counts
    # are rank-local until _all_reduce_expert_counts sums them.
    ddp = DistributedDataParallel(model, forward_sync_buffers=False) if world > 1 else model
    stop = cfg.steps if cfg.stop_at is None else cfg.stop_at
    result = TrainResult(start_step=start, rank=rank, world_size=world, model=model)
    mon = SafeMonitor(monitor)
    metrics_file = None
    if cfg.out_dir and rank == 0:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        metrics_file = open(Path(cfg.out_dir) / "metrics.jsonl", "a")
    params = [p for p in model.parameters()]

    def checkpoint(next_step: int) -> None:
        if rank == 0:
            save_checkpoint(
                cfg.checkpoint,
                model=model,
                optimizer=optimizer,
                next_step=next_step,
                model_config=mcfg.to_dict(),
                trajectory=cfg.trajectory(),
            )
        if world > 1:
            dist.barrier()

    try:
        mon.call("attach", model, optimizer)
        model.train()
        for step in range(start, stop):
            mon.call("step_begin", step)
            apply_faults(cfg.faults, step, model)
            lr = cfg.lr_at(step) * lr_multiplier(cfg.faults, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx, targets = get_batch(
                corpus.train,
                cfg.batch_size,
                seq_len,
                seed=cfg.seed,
                step=step,
                rank=rank,
                world_size=world,
            )
            out = ddp(idx, targets)
            out.loss.backward()  # DDP all-reduces (averages) gradients here
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in params if p.grad is not None]
            )
            mon.call("before_optimizer", step, grad_norm)
            if torch.isfinite(grad_norm):  # host sync; the loop reads the loss every step anyway
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
                optimizer.step()
            else:
                result.skipped_steps.append(step)
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                _all_reduce_expert_counts(model)
            model.update_expert_bias()

            loss = out.main_loss.detach()
            mtp = [m.detach() for m in out.mtp_losses]
            mon.call("step_end", step, loss=loss, mtp_losses=mtp, lr=lr, tokens=idx.numel())
            result.losses.append(float(loss))
            result.mtp_losses.append([float(m) for m in mtp])
            result.lrs.append(lr)
            result.grad_norms.append(float(grad_norm))
            result.tokens += idx.numel()
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == stop:
                result.val_losses.append((step, evaluate(model, val)))
            if metrics_file is not None:
                row = {
                    "step": step,
                    "loss": result.losses[-1],
                    "mtp": result.mtp_losses[-1],
                    "lr": lr,
                    "grad_norm": result.grad_norms[-1],
                }
                if result.val_losses and result.val_losses[-1][0] == step:
                    row["val_loss"] = result.val_losses[-1][1]
                metrics_file.write(json.dumps(row) + "\n")
            if cfg.log_every and rank == 0 and (step % cfg.log_every == 0 or step + 1 == stop):
                log.info(
                    "step %5d  loss %.4f  lr %.2e  grad_norm %.3f",
                    step,
                    result.losses[-1],
                    lr,
                    result.grad_norms[-1],
                )
            if cfg.checkpoint and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                checkpoint(step + 1)
        if cfg.checkpoint:
            checkpoint(stop)
    finally:
        mon.call("close")
        result.monitor_errors = mon.errors
        if metrics_file is not None:
            metrics_file.close()
        if owns_dist:
            dist.destroy_process_group()
    if cfg.out_dir:
        # every rank's own losses: what telemetry's per-rank rows are checked against
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"losses.rank{rank}.json").write_text(json.dumps(result.losses))
        if rank == 0:
            summary = {k: v for k, v in asdict(result).items() if k != "model"}
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return result


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> TrainResult:
    p = argparse.ArgumentParser(description="Train the MoE transformer on stdlib bytes.")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--inject", action="append", default=[], metavar="KIND@STEP[:k=v,...]")
    p.add_argument("--monitor", metavar="HOST:PORT", help="stream telemetry to a collector")
    p.add_argument("--run", help="run name for --monitor")
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding --monitor's bearer token (default: $STEPWATCH_TOKEN, else the "
        "file $STEPWATCH_TOKEN_FILE names)",
    )
    p.add_argument("--tls", action="store_true", help="--monitor over TLS (system roots)")
    p.add_argument("--tls-ca", metavar="PEM", help="--monitor over TLS trusting these roots")
    p.add_argument("--checkpoint", metavar="PATH")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", metavar="PATH")
    p.add_argument("--out", metavar="DIR")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads; 1 avoids spin-wait thrash on a busy 2-core box",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run and not args.monitor:
        p.error("--run only makes sense with --monitor")
    try:
        cfg = TrainConfig(
            preset=args.preset,
            steps=args.steps,
            stop_at=args.stop_at,
            seed=args.seed,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            eval_every=args.eval_every,
            injects=args.inject,
            checkpoint=args.checkpoint,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            out_dir=args.out,
            log_every=args.log_every,
        )
    except ValueError as exc:
        p.error(str(exc))
    monitor: TrainingMonitor | None = None
    if args.monitor:
        if not args.run:
            p.error("--monitor needs --run NAME")
        try:
            from hooks import Monitor  # lazy: only --monitor pays for (and needs) the client
        except ImportError as exc:
            p.error(
                f"--monitor needs the stepwatch hooks package (hooks/), which failed to "
                f"import: {exc}"
            )
        given = {"token_file": args.token_file, "tls": args.tls, "tls_ca": args.tls_ca}
        secure = {k: v for k, v in given.items() if v}  # the Monitor's defaults read the env
        monitor = DeferredMonitor(
            lambda model, optimizer: Monitor(
                model, optimizer, target=args.monitor, run=args.run, **secure
            )
        )
    result = train(cfg, monitor=monitor)
    if result.val_losses and result.rank == 0:
        log.info("final validation loss %.4f", result.val_losses[-1][1])
    return result


if __name__ == "__main__":
    main()
