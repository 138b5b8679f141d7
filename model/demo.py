"""`python -m model.demo`: train the demo preset on CPU and summarise the loss curve.

A few hundred steps of the 9-layer, 16-expert model on stdlib bytes (a few minutes on 2 cores):
the next-byte loss falls from ln(256) = 5.55 nats to well under 3. Extra arguments go to the
training loop, e.g. `--inject blowup@150 --monitor HOST:PORT --run demo`.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from model.train import TrainConfig, train

log = logging.getLogger("model.demo")


def summarise(losses: list[float], val_losses: list[tuple[int, float]], every: int) -> str:
    lines = ["step   train loss (mean of the last `every` steps)"]
    for end in range(every, len(losses) + 1, every):
        window = losses[end - every : end]
        lines.append(f"{end - 1:5d}  {sum(window) / len(window):.4f}")
    if val_losses:
        lines.append(
            f"validation loss: first {val_losses[0][1]:.4f} (after step "
            f"{val_losses[0][0]}) -> last {val_losses[-1][1]:.4f} (after step "
            f"{val_losses[-1][0]})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    p.add_argument("--inject", action="append", default=[])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        preset="demo",
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=3e-3,
        warmup_steps=20,
        eval_every=50,
        injects=args.inject,
        log_every=50,
    )
    start = time.perf_counter()
    result = train(cfg)
    elapsed = time.perf_counter() - start
    print(summarise(result.losses, result.val_losses, every=25))
    print(
        f"{len(result.losses)} steps, {result.tokens:,} tokens in {elapsed:.0f} s "
        f"({result.tokens / elapsed:,.0f} tokens/s)"
    )


if __name__ == "__main__":
    main()
