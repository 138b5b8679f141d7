"""Feed-forward layers: SwiGLU (dense and shared expert), the sigmoid router, batched routed
experts, and the MoE layer that ties them together with aux-loss-free balancing.

Clamp site. Every expert SwiGLU computes h = min(silu(x W_gate^T), L) * clamp(x W_up^T, -L, L)
with one limit L per (layer, routed|shared), stored as a 0-dim float32 buffer (inf = off), so a
controller can change it between steps with `fill_` — no recompilation, no reallocation — and
min(x, inf) is exactly x, so "off" is bit-identical to no clamp at all.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.probe import Probe

CLAMP_SITES = ("routed", "shared")


def swiglu_hidden(
    x_ND: torch.Tensor, w_gate_HD: torch.Tensor, w_up_HD: torch.Tensor, limit: torch.Tensor
) -> torch.Tensor:
    """SwiGLU intermediate with the clamp site applied: the input of the down projection."""
    gate_NH = torch.minimum(F.silu(x_ND @ w_gate_HD.T), limit)
    up_NH = torch.minimum(torch.maximum(x_ND @ w_up_HD.T, -limit), limit)
    return gate_NH * up_NH


def _limit_buffer() -> torch.Tensor:
    return torch.tensor(float("inf"), dtype=torch.float32)


class SwiGLU(nn.Module):
    """SwiGLU FFN with Linear projections and its own clamp limit buffer (inf = off)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)
        self.register_buffer("limit", _limit_buffer())

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_hidden(x, self.w_gate.weight, self.w_up.weight, self.limit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(self.hidden(x))


class DenseFFN(SwiGLU):
    """The dense feed-forward of the first `n_dense_layers` blocks (and of the MTP heads)."""


class RouterOutput(NamedTuple):
    topk_idx_TK: torch.Tensor  # long [T, K], chosen by scores + expert_bias
    topk_weight_TK: torch.Tensor  # [T, K], unbiased scores of the chosen experts, normalized
    scores_TE: torch.Tensor  # sigmoid(logits), no bias
    logits_TE: torch.Tensor  # pre-sigmoid router logits


class Router(nn.Module):
    """Sigmoid router with aux-loss-free balancing (DeepSeek-V3 / Step 3.5 Flash).

    The selection bias only decides *which* experts a token goes to; the gate weights come from
    the unbiased scores, so balancing does not distort the mixture. `logit_offset_E` is zero in
    normal training; fault injection writes into it to silence an expert.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(n_experts))
        self.register_buffer("logit_offset_E", torch.zeros(n_experts))

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = self.gate(x_TD) + self.logit_offset_E
        scores_TE = torch.sigmoid(logits_TE)
        topk_idx_TK = torch.topk(scores_TE + self.expert_bias, self.top_k, dim=-1).indices
        chosen_TK = scores_TE.gather(1, topk_idx_TK)
        topk_weight_TK = chosen_TK / (chosen_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return RouterOutput(topk_idx_TK, topk_weight_TK, scores_TE, logits_TE)


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as batched parameters, so per-expert norms are one reduction.

    Dispatch: sort the T*K assignments by expert, run each expert with a nonzero count on its
    contiguous slice, scatter-add the gate-weighted outputs back to their tokens.
    """

    def __init__(self, n_experts: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.w_gate = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.w_up = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.register_buffer("limit", _limit_buffer())

    def forward(
        self,
        x_TD: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        topk_weight_TK: torch.Tensor,
        probe: Probe | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (routed output [T, D], assignments per expert [E] long)."""
        K = topk_idx_TK.shape[1]
        flat_idx_N = topk_idx_TK.reshape(-1)
        order_N = torch.argsort(flat_idx_N, stable=True)  # stable: deterministic row order
        token_N = order_N // K
        counts_E = torch.bincount(flat_idx_N, minlength=self.n_experts)
        x_ND = x_TD[token_N]
        h_parts, out_parts, start = [], [], 0
        for e, n in enumerate(counts_E.tolist()):  # one host sync per layer; fine at this size
            if n == 0:
                continue
            h_nH = swiglu_hidden(x_ND[start : start + n], self.w_gate[e], self.w_up[e], self.limit)
            h_parts.append(h_nH)
            out_parts.append(h_nH @ self.w_down[e].T)
            start += n
        h_NH, out_ND = torch.cat(h_parts), torch.cat(out_parts)
        if probe is not None and probe.active:
            probe(h_NH.detach(), out_ND.detach(), flat_idx_N[order_N])
        weight_N1 = topk_weight_TK.reshape(-1)[order_N].unsqueeze(1)
        routed_TD = torch.zeros_like(x_TD).index_add(0, token_N, out_ND * weight_N1)
        return routed_TD, counts_E


class MoE(nn.Module):
    """Routed SwiGLU experts + one shared expert, sigmoid top-k routing, aux-loss-free bias.

    Per optimizer step the layer counts assignments per expert into `tokens_per_expert_E`
    (on the device, under no_grad, training mode only); `update_expert_bias()` applies the
    sign rule from those counts and resets them. `aux_loss` holds the optional sequence-wise
    balance loss of the last forward (None when its weight is 0 or in eval mode).
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        hidden: int,
        bias_update_rate: float = 1e-3,
        balance_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.bias_update_rate = bias_update_rate
        self.balance_loss_weight = balance_loss_weight
        self.router = Router(d_model, n_experts, top_k)
        self.experts = RoutedExperts(n_experts, d_model, hidden)
        self.shared = SwiGLU(d_model, hidden)
        self.probe_experts = Probe()
        self.probe_shared = Probe()
        self.register_buffer(
            "tokens_per_expert_E", torch.zeros(n_experts, dtype=torch.long), persistent=False
        )  # step-local: zero at every step boundary
        self.aux_loss: torch.Tensor | None = None

    @property
    def expert_bias(self) -> torch.Tensor:
        """The selection bias buffer [E] (lives on the router, which uses it)."""
        return self.router.expert_bias

    # -- clamp site ------------------------------------------------------------------------
    def _limit(self, site: str) -> torch.Tensor:
        if site == "routed":
            return self.experts.limit
        if site == "shared":
            return self.shared.limit
        raise ValueError(f"clamp site must be one of {CLAMP_SITES}, got {site!r}")

    @torch.no_grad()
    def set_clamp(self, site: str, limit: float | None) -> None:
        """Clamp the SwiGLU of `site` at `limit` (> 0), or switch it off with None."""
        buf = self._limit(site)
        if limit is None:
            buf.fill_(float("inf"))
            return
        limit = float(limit)
        if not limit > 0 or math.isnan(limit):
            raise ValueError(f"clamp limit must be > 0 (or None for off), got {limit}")
        buf.fill_(limit)

    def clamp_limit(self, site: str) -> float | None:
        value = float(self._limit(site))
        return None if math.isinf(value) else value

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        route = self.router(x_TD)
        routed_TD, counts_E = self.experts(
            x_TD, route.topk_idx_TK, route.topk_weight_TK, self.probe_experts
        )
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert_E.add_(counts_E)
        if self.probe_shared.active:
            h_TH = self.shared.hidden(x_TD)
            shared_TD = self.shared.w_down(h_TH)
            self.probe_shared(h_TH.detach(), shared_TD.detach())
        else:
            shared_TD = self.shared(x_TD)
        self.aux_loss = None
        if self.training and self.balance_loss_weight > 0:
            self.aux_loss = self._balance_loss(route, B, T)
        return (routed_TD + shared_TD).view(B, T, D)

    def _balance_loss(self, route: RouterOutput, B: int, T: int) -> torch.Tensor:
        """Sequence-wise balance loss: w * mean_b sum_e f_be * P_be (DeepSeek-V3, eq. 17-20)."""
        E, K = self.n_experts, self.top_k
        with torch.no_grad():
            counts_BE = torch.zeros(B, E, device=route.scores_TE.device)
            counts_BE.scatter_add_(
                1, route.topk_idx_TK.view(B, T * K), torch.ones(B, T * K, device=counts_BE.device)
            )
            f_BE = counts_BE * (E / (K * T))
        probs_BTE = route.scores_TE / route.scores_TE.sum(dim=-1, keepdim=True)
        P_BE = probs_BTE.view(B, T, E).mean(dim=1)
        return self.balance_loss_weight * (f_BE * P_BE).sum(dim=-1).mean()

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Sign rule: bias_e += rate * sign(mean_load - load_e); then reset the step counts."""
        load_E = self.tokens_per_expert_E.float()
        if self.bias_update_rate > 0:  # no counts -> sign(0) = 0 -> no change; no host sync
            self.router.expert_bias.add_(
                torch.sign(load_E.mean() - load_E), alpha=self.bias_update_rate
            )
        self.tokens_per_expert_E.zero_()
