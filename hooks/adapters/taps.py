"""Observation points and clamp bindings that shipped adapters add to models that have none.

`Tap` is the hooks-side twin of model/probe.py's Probe: a no-op module that an adapter's own
extension-point code calls with tensors the forward has already computed (a SwiGLU
intermediate and its expert output, a router's decoded view, a per-head max logit), only while
something is hooked on it. The Tap is never registered as a submodule of the user's model, so
state_dict, `.to()`, FSDP wrapping and parameter counts are unchanged; the Monitor's Capture
hooks it exactly as it hooks model/'s probes.

`SwiGLUClamp` makes both halves of the clamp, silu(gate).clamp(max=L) and up.clamp(-L, L),
bind on a SwiGLU made of submodules (a shared expert: gate_proj/w1, up_proj/w3, down_proj/w2).
The up half is a forward hook on the up projection that returns the clamped output; the gate
half is either a forward hook on the activation module (Hugging Face's `act_fn`) or, where the
activation is a plain `F.silu` call (torchtitan's FeedForward), a TorchFunctionMode held only
for the duration of that module's forward. With the limit off nothing is registered at all, so
"off" is bit-identical to the unmonitored model and costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

CLAMP_SITES = ("routed", "shared")


class Tap(nn.Module):
    """Observation point: `forward(*tensors)` returns its arguments; `.active` is True iff a
    forward hook is registered, and callers compute tap-only values only then."""

    def forward(self, *tensors: Any) -> Any:
        return tensors[0] if len(tensors) == 1 else tensors

    @property
    def active(self) -> bool:
        return bool(self._forward_hooks)


def check_limit(limit: float | None) -> float | None:
    """A clamp limit as the adapters store it: a finite float > 0, or None for off."""
    if limit is None:
        return None
    limit = float(limit)
    if not limit > 0 or math.isinf(limit):  # NaN compares False
        raise ValueError(f"clamp limit must be a finite number > 0 (or None for off), got {limit}")
    return limit


class SiluClampMode(TorchFunctionMode):
    """While active, every `F.silu(x)` returns `silu(x).clamp(max=limit)`."""

    def __init__(self, limit: float) -> None:
        super().__init__()
        self.limit = limit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.silu:
            out = out.clamp(max=self.limit)
        return out


def _clamp_up(limit: float) -> Callable:
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.clamp(-limit, limit)

    return hook


def _clamp_act(limit: float) -> Callable:
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.clamp(max=limit)

    return hook


def hold_silu_clamp(module: nn.Module, limit: float) -> list:
    """Clamp every `F.silu` inside `module.forward` at `limit` (a TorchFunctionMode entered by a
    forward pre-hook and left by an always-called forward hook). Returns the hook handles."""
    modes: list[SiluClampMode] = []

    def enter(mod: nn.Module, args: tuple) -> None:
        mode = SiluClampMode(limit)
        mode.__enter__()
        modes.append(mode)

    def leave(mod: nn.Module, args: tuple, out: Any) -> None:
        modes.pop().__exit__(None, None, None)

    return [
        module.register_forward_pre_hook(enter),
        module.register_forward_hook(leave, always_call=True),  # popped even if forward raises
    ]


class SwiGLUClamp:
    """The clamp of one submodule SwiGLU. `act` is the activation module (gate half bound by
    a forward hook) or None, in which case `F.silu` calls inside `mlp.forward` are clamped."""

    def __init__(self, mlp: nn.Module, up: nn.Module, act: nn.Module | None) -> None:
        self.mlp, self.up, self.act = mlp, up, act
        self.limit: float | None = None
        self._handles: list = []

    def set(self, limit: float | None) -> None:
        limit = check_limit(limit)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.limit = limit
        if limit is None:
            return
        self._handles.append(self.up.register_forward_hook(_clamp_up(limit)))
        if self.act is not None:
            self._handles.append(self.act.register_forward_hook(_clamp_act(limit)))
        else:
            self._handles += hold_silu_clamp(self.mlp, limit)

    def release(self) -> None:
        self.set(None)


def tap_output(module: nn.Module, tap: Tap) -> Any:
    """Forward hook on a projection: calls `tap(input, output)` (detached) while active; the
    projection's input is the SwiGLU intermediate, its output the expert output."""

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if tap.active:
            h = args[0]
            tap(h.detach().reshape(-1, h.shape[-1]), out.detach().reshape(-1, out.shape[-1]))

    return module.register_forward_hook(hook)


_CAUSAL: dict[tuple, torch.Tensor] = {}


def causal_bias(Tq: int, Tk: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive [Tq, Tk]: 0 where key j is visible to query i (the last Tq of Tk positions),
    -inf in its future. Cached; adding it is ~10x faster on CPU than a broadcast masked_fill."""
    key = (Tq, Tk, str(device), dtype)
    bias = _CAUSAL.get(key)
    if bias is None:
        q_pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]
        future = torch.arange(Tk, device=device)[None, :] > q_pos
        bias = torch.zeros(Tq, Tk, device=device, dtype=dtype).masked_fill_(future, -math.inf)
        if len(_CAUSAL) < 64:
            _CAUSAL[key] = bias
    return bias


def max_logit_H(
    q_BHTd: torch.Tensor,
    k_BHTd: torch.Tensor,
    scale: float,
    causal: bool,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-query-head max of the pre-softmax logits q k^T * scale over visible positions, [H].

    One QK^T without copies: grouped-query heads fold into the query rows (query head h reads
    kv head h // G), and the scale is applied to the [H] result (max(s x) = s max(x) for
    s > 0; an additive mask is divided by it). `mask`: bool (True = visible) or additive,
    broadcastable to [B, H, Tq, Tk]; without one, `causal` masks the future."""
    B, H, Tq, d = q_BHTd.shape
    Hk, Tk = k_BHTd.shape[1], k_BHTd.shape[-2]
    G = H // Hk
    logits = torch.matmul(q_BHTd.reshape(B, Hk, G * Tq, d), k_BHTd.transpose(-2, -1))
    logits = logits.view(B, Hk, G, Tq, Tk)
    if mask is not None:
        m = mask[..., :Tk]
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=logits.dtype, device=m.device).masked_fill_(
                ~m, -math.inf
            )
        else:
            m = m / scale
        m = m.unsqueeze(2)  # [B|1, H|1, 1, Tq, Tk] against [B, Hk, G, Tq, Tk]
        if m.shape[1] not in (1, Hk):
            m = m.reshape(m.shape[0], Hk, G, Tq, Tk)
        logits.add_(m)
    elif causal and Tq > 1:
        logits.add_(causal_bias(Tq, Tk, logits.device, logits.dtype))
    return logits.amax(dim=(3, 4)).amax(0).reshape(H) * scale
