"""What both trainer callbacks share: the loss of the step's training forwards, read from the
model's own output (no extra forward, no host sync), and the grad norm when the framework
does not hand it over."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LossTap:
    """Forward hook on the trained model: keeps the detached `loss` of every training forward
    (an output attribute or key, as transformers' ModelOutput and Lightning step dicts have)."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.losses: list[torch.Tensor] = []
        self._handle = model.register_forward_hook(self._hook) if model is not None else None

    def _hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self.add(_loss_of(out))

    def add(self, loss: Any) -> None:
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.losses.append(loss.detach().reshape(()))

    def take(self) -> torch.Tensor | None:
        """Mean loss of the forwards since the last take (the step's micro-batches)."""
        losses, self.losses = self.losses, []
        if not losses:
            return None
        return torch.stack(losses).float().mean() if len(losses) > 1 else losses[0]

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _loss_of(out: Any) -> Any:
    if isinstance(out, dict):
        return out.get("loss")
    return getattr(out, "loss", None)


def grad_norm_of(model: nn.Module) -> torch.Tensor | None:
    """Total L2 norm of the gradients now held (a device tensor: no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def numeric_items(metrics: dict, prefix: str) -> dict[str, float]:
    """The finite-typed scalars of a framework's metrics dict, under `prefix/`."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)
    return out
