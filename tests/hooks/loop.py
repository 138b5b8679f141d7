"""A training loop for the tests, with the monitor call points where model/train.py has them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class StepOut:
    loss: torch.Tensor  # detached main loss of the last micro-batch
    mtp: list[torch.Tensor] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None
    batches: list[torch.Tensor] = field(default_factory=list)


def forward_loss(model, idx: torch.Tensor):
    """(total loss, main loss, mtp losses) for the stand-in or model/'s MoETransformer."""
    targets = torch.roll(idx, -1, dims=1)
    out = model(idx, targets) if hasattr(model, "mtp") else model(idx)
    if isinstance(out, torch.Tensor):  # the stand-in returns logits
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))
        return loss, loss, []
    return out.loss, out.main_loss, list(out.mtp_losses)


def train_step(
    mon,
    model,
    opt,
    step: int,
    micro: int = 1,
    batch: int = 2,
    seq: int = 8,
    lr: float = 1e-2,
    vocab: int = 32,
    before_step=None,
) -> StepOut:
    """One optimizer step of `micro` accumulated micro-batches."""
    gen = torch.Generator().manual_seed(1000 + step)
    mon.step_begin(step)
    res = StepOut(loss=torch.zeros(()))
    for _ in range(micro):
        idx = torch.randint(0, vocab, (batch, seq), generator=gen)
        res.batches.append(idx)
        loss, main, mtp = forward_loss(model, idx)
        (loss / micro).backward()
        res.loss, res.mtp = main.detach(), [m.detach() for m in mtp]
    params = [p for p in model.parameters() if p.grad is not None]
    res.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    mon.before_optimizer(step, res.grad_norm)
    if before_step is not None:
        before_step()
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    mon.step_end(step, loss=res.loss, mtp_losses=res.mtp, lr=lr, tokens=micro * batch * seq)
    return res
