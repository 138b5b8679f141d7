"""One monitored rank of the tiny model, as its own process, for benchmarks/reliability.py and
tests/integration/test_durability.py: a plain training loop with a real Monitor streaming to a
collector.

    python -m benchmarks.monitored_rank --target HOST:PORT --run NAME --rank R --world W \\
        --steps N --out FILE [--step-sleep S] [--policy block|drop_oldest]

Writes FILE (JSON) at the end: the float32 loss of every step (what the store must hold for
train/loss of this rank), the longest step_end() call (what the training thread waited for
telemetry), Monitor.stats(), and whether close() flushed everything. The buffer is sized so
that no step is dropped in any outage the tests make: loss would then be the client's policy,
not the collector's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hooks import Monitor
from hooks.config import MonitorConfig
from model.config import get_preset
from model.transformer import MoETransformer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--policy", default="block")
    ap.add_argument("--buffer-steps", type=int, default=20_000)
    ap.add_argument("--close-timeout", type=float, default=120.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.rank)
    model = MoETransformer(get_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = MonitorConfig(
        buffer_steps=args.buffer_steps,
        full_policy=args.policy,
        block_timeout_s=1.0,
        net_timeout_s=5.0,
        backoff_max_s=2.0,
        close_timeout_s=args.close_timeout,
    )
    mon = Monitor(
        model, opt, target=args.target, run=args.run, rank=args.rank, world_size=args.world,
        config=cfg,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(100 + args.rank)
    losses, longest = [], 0.0
    for step in range(args.steps):
        mon.step_begin(step)
        x = torch.randint(0, 256, (2, 33), generator=gen)
        out = model(x[:, :-1], x[:, 1:])
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        mon.before_optimizer(step, gnorm)
        opt.step()
        opt.zero_grad()
        loss = out.main_loss.detach()
        losses.append(float(np.float32(loss.item())))
        t0 = time.monotonic()
        mtp = [m.detach() for m in out.mtp_losses]
        mon.step_end(step, loss=loss, mtp_losses=mtp, lr=1e-3, tokens=x.numel())
        longest = max(longest, time.monotonic() - t0)
        if args.step_sleep:
            time.sleep(args.step_sleep)
    t0 = time.monotonic()
    mon.close()
    stats = mon.stats()
    Path(args.out).write_text(
        json.dumps(
            {
                "losses": losses,
                "longest_step_end_s": longest,
                "close_s": time.monotonic() - t0,
                "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, bool))},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
