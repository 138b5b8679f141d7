"""Adapter for torchtitan's MoE (torchtitan.models.common.moe), found structurally.

The layout: a container (ModuleDict or ModuleList, torchtitan's `model.layers`) of blocks, some
of which hold an `MoE`: `router` (TokenChoiceTopKRouter: its `gate` Linear gives the logits,
its output (top-k scores, top-k expert ids, unbiased scores)), `routed_experts.inner_experts`
(GroupedExperts: w1/w3 [E, F, D], w2 [E, D, F], the SwiGLU computed inline in its forward through
the `_grouped_mm` seam), optional `shared_experts` (FeedForward: w2(silu(w1 x) * w3 x)) and the
aux-loss-free `expert_bias_E` (None when load_balance_coeff is None). Any model built from these
modules fits: torchtitan's Qwen3 / DeepSeek-V3 decoders or a user's own.

Where the statistics come from (the tensors the forward computes, nothing recomputed):
  routed experts  GroupedExperts' own seam `_grouped_mm` is wrapped on the instance (as
                  torchtitan's MXFP8 converter does); per forward it is called for w1 (gate),
                  w3 (up) and w2 (down), in that order: the third call's input is the SwiGLU
                  intermediate and its output the expert outputs, rows in expert order (ids from
                  num_tokens_per_expert, no host sync);
  clamp (routed)  up: the w3 call returns out.clamp(-L, L); gate: while L is set, the experts'
                  forward runs under a TorchFunctionMode that returns silu(x).clamp(max=L) for its
                  F.silu. Both are the forward's own ops, so autograd differentiates the clamp;
  shared experts  a forward hook on w2 (input = intermediate, output = expert output); clamp by
                  a hook on w3 and the same F.silu mode around the FeedForward's forward;
  router          its output plus the logits of its `gate` (stashed by a forward hook on it);
  attention       a forward pre-hook on each ScaledDotProductAttention inner attention: per-head
                  max of q k^T * scale over the causal positions (one extra QK^T under no_grad).

FSDP / expert parallelism (not exercised by the tests, which run one CPU process):
- FSDP2: the expert weights are DTensor shards; GroupedExperts computes on `to_local()`
  copies of the gathered weights, so the activation statistics (taken from the forward's own
  tensors) are those of the tokens this rank computed and the collector combines ranks as for
  any metric. Per-expert gradient and parameter norms are reductions over the parameters the
  adapter hands out, which are DTensors there: unverified (a norm of a DTensor is a collective
  and may not copy into the flat buffer); switch the "grad" / "params" groups off under FSDP2
  until it is tested on a multi-GPU machine.
- EP: `inner_experts` holds this rank's slice of the experts and its rows are the tokens
  dispatched to them. Construct the adapter with `ep_rank` / `ep_size` (and pass it as
  `Monitor(adapter=...)`) so local expert e is reported as global expert ep_rank * E_local + e.
  Token counts (sum) and act_maxabs (max) then reduce correctly across ranks; ranks that do
  not hold an expert report 0 for its act_rms and out_norm, which reduce as mean_nonzero (the
  mean over the ranks whose value is not 0, collector/reduction.py): the owner's value. (A
  collector older than that op is sent mean, the owner's value divided by the number of
  ranks.)
- The clamp needs nothing more: it binds inside each rank's own forward.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hooks.adapter import AttentionSite, MoESite, RouterView
from hooks.adapters.taps import (
    CLAMP_SITES,
    SwiGLUClamp,
    Tap,
    check_limit,
    hold_silu_clamp,
    max_logit_H,
)
from hooks.adapters.taps import tap_output as tap_projection

FAMILY = "torchtitan MoE (torchtitan.models.common.moe: router, GroupedExperts, shared experts)"
MOE_MODULE = "torchtitan.models.common.moe"


def _moe_class() -> type | None:
    mod = sys.modules.get(MOE_MODULE)  # not imported: the model cannot contain one
    return getattr(mod, "MoE", None) if mod is not None else None


def _blocks(model: nn.Module) -> list[nn.Module] | None:
    """The blocks of the first ModuleList / ModuleDict holding a torchtitan MoE."""
    moe_cls = _moe_class()
    if moe_cls is None:
        return None
    for mod in model.modules():
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            blocks = list(mod.values() if isinstance(mod, nn.ModuleDict) else mod)
            if any(_moe_of(b, moe_cls) is not None for b in blocks):
                return blocks
    return None


def _moe_of(block: nn.Module, moe_cls: type) -> nn.Module | None:
    found = [m for m in block.children() if isinstance(m, moe_cls)]
    return found[0] if len(found) == 1 else None


def supports(model: nn.Module) -> bool:
    return isinstance(model, nn.Module) and _blocks(model) is not None


class _RoutedTap:
    """The wrapped `_grouped_mm` seam of one GroupedExperts, and its clamp."""

    def __init__(self, experts: Any, offset: int) -> None:
        self.experts, self.offset = experts, offset
        self.tap = Tap()
        self.limit: float | None = None
        self.calls = 0
        self.ids_R: torch.Tensor | None = None
        self._mode_handles: list = []
        self._inner: Any = experts._grouped_mm  # bound method, or a converter's replacement
        experts.__dict__["_grouped_mm"] = self._grouped_mm
        self._handles = [experts.register_forward_pre_hook(self._begin)]

    def _begin(self, module: nn.Module, args: tuple) -> None:
        self.calls = 0
        self.ids_R = None
        if self.tap.active:
            x_RD, counts_E = args[0], args[1]
            experts_E = torch.arange(counts_E.numel(), device=counts_E.device) + self.offset
            self.ids_R = torch.repeat_interleave(  # output_size: no host sync
                experts_E, counts_E.long(), output_size=x_RD.shape[0]
            )

    def _grouped_mm(self, *, A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor):
        role, self.calls = self.calls % 3, self.calls + 1  # 0 = w1 (gate), 1 = w3 (up), 2 = w2
        out = self._inner(A=A, B_t=B_t, offs=offs)
        if role == 1 and self.limit is not None:
            out = out.clamp(-self.limit, self.limit)
        elif role == 2 and self.ids_R is not None and self.tap.active:
            self.tap(A.detach(), out.detach(), self.ids_R)
        return out

    def set(self, limit: float | None) -> None:
        self.limit = check_limit(limit)
        for handle in self._mode_handles:
            handle.remove()
        self._mode_handles = [] if self.limit is None else hold_silu_clamp(self.experts, self.limit)

    def release(self) -> None:
        self.set(None)
        for handle in self._handles:
            handle.remove()
        self.experts.__dict__.pop("_grouped_mm", None)


def _attention_hook(tap: Tap):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not tap.active:
            return
        with torch.no_grad():
            q_BNLH, k_BNLH = args[0].transpose(1, 2), args[1].transpose(1, 2)
            scale = kwargs.get("scale")
            scale = q_BNLH.shape[-1] ** -0.5 if scale is None else float(scale)
            tap(max_logit_H(q_BNLH, k_BNLH, scale, bool(kwargs.get("is_causal", True))))

    return hook


class TorchtitanMoEAdapter:
    """MoEAdapter for a model built from torchtitan's MoE modules."""

    family = FAMILY

    def __init__(self, model: nn.Module, ep_rank: int = 0, ep_size: int = 1) -> None:
        blocks = _blocks(model)
        if blocks is None:
            raise TypeError(f"TorchtitanMoEAdapter: {type(model).__name__} holds no {FAMILY}")
        moe_cls = _moe_class()
        self.model: Any = model
        self.blocks: list[Any] = blocks
        self._moe: dict[int, Any] = {}
        self._routed: dict[int, _RoutedTap] = {}
        self._shared: dict[int, tuple[Tap, SwiGLUClamp]] = {}
        self._attn: list[AttentionSite] = []
        self._handles: list = []
        self._logits: torch.Tensor | None = None
        for i, block in enumerate(self.blocks):
            moe: Any = _moe_of(block, moe_cls) if moe_cls else None
            if moe is not None:
                experts = moe.routed_experts.inner_experts
                offset = ep_rank * (int(experts.num_experts) // max(ep_size, 1))
                self._moe[i], self._routed[i] = moe, _RoutedTap(experts, offset)
                self._handles.append(moe.router.gate.register_forward_hook(self._stash_logits))
                shared = moe.shared_experts
                if shared is not None:
                    tap = Tap()
                    self._handles.append(tap_projection(shared.w2, tap))
                    self._shared[i] = (tap, SwiGLUClamp(shared, shared.w3, None))
            inner: Any = getattr(getattr(block, "attention", None), "inner_attention", None)
            if inner is not None and type(inner).__name__ == "ScaledDotProductAttention":
                tap = Tap()
                self._handles.append(
                    inner.register_forward_pre_hook(_attention_hook(tap), with_kwargs=True)
                )
                attention: Any = block.attention
                self._attn.append(AttentionSite(i, tap, int(attention.n_heads)))

    def _stash_logits(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self._logits = out  # read by decode_router right after, in the same router forward

    # -- MoEAdapter ------------------------------------------------------------------------
    def residual_blocks(self) -> Sequence[nn.Module]:
        return self.blocks

    def attention_sites(self) -> list[AttentionSite]:
        return list(self._attn)

    def moe_sites(self) -> list[MoESite]:
        sites = []
        for i, moe in sorted(self._moe.items()):
            experts = moe.routed_experts.inner_experts
            sites.append(
                MoESite(
                    layer=i,
                    n_experts=int(experts.num_experts),
                    top_k=int(moe.router.top_k),
                    router=moe.router,
                    expert_probe=self._routed[i].tap,
                    shared_probe=self._shared[i][0] if i in self._shared else None,
                    expert_weights=(experts.w1_EFD, experts.w3_EFD, experts.w2_EDF),
                    expert_bias=moe.expert_bias_E,
                )
            )
        return sites

    def output_head(self) -> nn.Module | None:
        head: Any = getattr(self.model, "lm_head", None)
        return head if isinstance(head, nn.Module) else None

    def decode_router(self, output: Any) -> RouterView:
        topk_scores, topk_ids, scores = output
        K, E = topk_ids.shape[-1], scores.shape[-1]
        logits = self._logits
        if logits is None:
            raise RuntimeError("router logits missing: the router's gate did not run")
        self._logits = None
        return RouterView(
            topk_ids.reshape(-1, K),
            topk_scores.reshape(-1, K),
            scores.reshape(-1, E),
            logits.reshape(-1, E),
        )

    def n_mtp(self) -> int:
        return 0

    def set_clamp(self, layer: int, site: str, limit: float | None) -> None:
        if site not in CLAMP_SITES:
            raise ValueError(f"clamp site must be one of {CLAMP_SITES}, got {site!r}")
        if layer not in self._moe:
            raise ValueError(f"layer {layer} is not an MoE layer (MoE layers: {sorted(self._moe)})")
        if site == "shared":
            if layer not in self._shared:
                raise ValueError(f"layer {layer} has no shared experts")
            self._shared[layer][1].set(limit)
        else:
            self._routed[layer].set(limit)

    def clamp_limit(self, layer: int, site: str) -> float | None:
        if site == "shared":
            return self._shared[layer][1].limit if layer in self._shared else None
        return self._routed[layer].limit if layer in self._routed else None

    def describe(self) -> dict:
        return {
            "adapter": type(self).__name__,
            "model": type(self.model).__name__,
            "family": "torchtitan",
            "moe_layers": sorted(self._moe),
        }

    def release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for routed in self._routed.values():
            routed.release()
        for _, clamp in self._shared.values():
            clamp.release()
