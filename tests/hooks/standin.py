"""A small stand-in MoE model implementing exactly the probe surface hooks/ builds against.

Independent of model/ on purpose: the tests check the monitor against the contract, and a
second implementation catches assumptions that only hold for model/. It differs from model/
where the contract allows: the first MoE layer has no shared expert (probe_shared is None),
the head count alternates between layers, experts are gathered per assignment rather than
sorted, and `checkpoint=True` recomputes every block in backward (activation checkpointing).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


class Probe(nn.Module):
    def forward(self, *tensors: torch.Tensor) -> None:
        return None

    @property
    def active(self) -> bool:
        return bool(self._forward_hooks)


class RouterOutput(NamedTuple):
    topk_idx_TK: torch.Tensor
    topk_weight_TK: torch.Tensor
    scores_TE: torch.Tensor
    logits_TE: torch.Tensor


class Router(nn.Module):
    def __init__(self, d: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(n_experts))

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits = self.gate(x_TD)
        scores = torch.sigmoid(logits)
        idx = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices
        chosen = scores.gather(1, idx)
        return RouterOutput(idx, chosen / chosen.sum(-1, keepdim=True), scores, logits)


class Experts(nn.Module):
    def __init__(self, n_experts: int, d: int, h: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.randn(n_experts, h, d) * 0.2)
        self.w_up = nn.Parameter(torch.randn(n_experts, h, d) * 0.2)
        self.w_down = nn.Parameter(torch.randn(n_experts, d, h) * 0.2)


class MoE(nn.Module):
    def __init__(self, d: int, n_experts: int, top_k: int, h: int, shared: bool) -> None:
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.router = Router(d, n_experts, top_k)
        self.experts = Experts(n_experts, d, h)
        self.shared = (
            nn.ModuleDict(
                {
                    "gate": nn.Linear(d, h, bias=False),
                    "up": nn.Linear(d, h, bias=False),
                    "down": nn.Linear(h, d, bias=False),
                }
            )
            if shared
            else None
        )
        self.probe_experts = Probe()
        self.probe_shared = Probe() if shared else None
        self.limits = {"routed": math.inf, "shared": math.inf}

    @property
    def expert_bias(self) -> torch.Tensor:
        return self.router.expert_bias

    def set_clamp(self, site: str, limit: float | None) -> None:
        if site not in self.limits:
            raise ValueError(f"bad site {site!r}")
        self.limits[site] = math.inf if limit is None else float(limit)

    def clamp_limit(self, site: str) -> float | None:
        value = self.limits[site]
        return None if math.isinf(value) else value

    def _swiglu(self, x, wg, wu, site):
        L = self.limits[site]
        return F.silu(x @ wg.T).clamp(max=L) * (x @ wu.T).clamp(-L, L)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x = x_BTD.reshape(B * T, D)
        r = self.router(x)
        flat = r.topk_idx_TK.reshape(-1)
        token = torch.arange(B * T).repeat_interleave(self.top_k)
        w = self.experts
        h = self._swiglu_rows(x[token], flat)
        out = torch.einsum("nh,ndh->nd", h, w.w_down[flat])
        if self.probe_experts.active:
            self.probe_experts(h.detach(), out.detach(), flat)
        y = torch.zeros_like(x).index_add(0, token, out * r.topk_weight_TK.reshape(-1, 1))
        if self.shared is not None:
            hs = self._swiglu(x, self.shared["gate"].weight, self.shared["up"].weight, "shared")
            outs = self.shared["down"](hs)
            if self.probe_shared.active:
                self.probe_shared(hs.detach(), outs.detach())
            y = y + outs
        return y.view(B, T, D)

    def _swiglu_rows(self, x_ND, idx_N):
        L = self.limits["routed"]
        w = self.experts
        g = F.silu(torch.einsum("nd,nhd->nh", x_ND, w.w_gate[idx_N])).clamp(max=L)
        u = torch.einsum("nd,nhd->nh", x_ND, w.w_up[idx_N]).clamp(-L, L)
        return g * u


class Attn(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.hd = n_heads, d // n_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.probe_logits = Probe()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.hd).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        logits = logits.masked_fill(~mask, float("-inf"))
        if self.probe_logits.active:
            self.probe_logits(logits.detach().amax(dim=(0, 2, 3)))
        y = torch.softmax(logits, -1) @ v
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, moe: MoE | None) -> None:
        super().__init__()
        self.attn = Attn(d, n_heads)
        self.ffn = moe if moe is not None else nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ffn(x)


class StandIn(nn.Module):
    """Layer 0 dense, layers 1.. MoE; layer 1's MoE has no shared expert; heads vary."""

    def __init__(
        self,
        vocab: int = 32,
        d: int = 16,
        n_layers: int = 3,
        n_experts: int = 4,
        top_k: int = 2,
        hidden: int = 12,
        mtp_depth: int = 0,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.config = SimpleNamespace(mtp_depth=mtp_depth)
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            Block(
                d, 2 if i % 2 else 4, MoE(d, n_experts, top_k, hidden, shared=i > 1) if i else None
            )
            for i in range(n_layers)
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, b.ffn) for i, b in enumerate(self.layers) if isinstance(b.ffn, MoE)]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.layers:
            if self.checkpoint:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.lm_head(x)
