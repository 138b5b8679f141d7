"""Probe: a no-op module the model calls with internal tensors, so observers can hook it.

The model never computes probe-only values (per-head max attention logits, per-assignment
expert activations) unless someone is watching: call sites check `probe.active` first, which is
True iff the probe has forward hooks (or forward pre-hooks) registered. An observer does

    handle = model.layers[3].attn.probe_logits.register_forward_hook(
        lambda mod, args, out: record(args[0]))

and receives the tensors as the hook's positional `args`. The probe returns None, so hooks
cannot change the computation by accident.
"""

from __future__ import annotations

import torch
from torch import nn


class Probe(nn.Module):
    """Observation point. `forward(*tensors) -> None`; see module docstring."""

    def forward(self, *tensors: torch.Tensor) -> None:
        return None

    @property
    def active(self) -> bool:
        """True iff a forward hook or forward pre-hook is registered on this probe."""
        return bool(self._forward_hooks) or bool(self._forward_pre_hooks)
