"""The decoder: blocks, multi-token-prediction heads, and the `MoETransformer` that owns them.

Multi-token prediction follows DeepSeek-V3, which Step 3.5 Flash adopts: MTP head d (1-based)
takes the previous depth's hidden state h^{d-1}_i (h^0 = the main trunk's output) and the
embedding of token t_{i+d}, and predicts t_{i+d+1}. With inputs idx[0..T-1] and targets
targets[i] = t_{i+1}, that is: emb(targets[:, d-1:T-1]) combined with h^{d-1}[:, :T-d], scored
against targets[:, d:T]. The heads share the embedding and output matrix with the trunk; they
call the output matrix functionally so that a forward hook on `lm_head` sees only the main
logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import Attention
from model.config import ModelConfig
from model.moe import DenseFFN, MoE, RoutedExperts


class Block(nn.Module):
    """Pre-norm decoder block. Forward output is the residual stream after the block."""

    def __init__(self, cfg: ModelConfig, kind: str, moe: bool) -> None:
        super().__init__()
        self.kind = kind
        n_heads = cfg.n_heads_full if kind == "full" else cfg.n_heads_swa
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(
            cfg.d_model,
            n_heads,
            cfg.n_kv_heads,
            cfg.head_dim,
            kind,
            cfg.window,
            cfg.max_seq_len,
            cfg.rope_theta,
            cfg.norm_eps,
        )
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn: MoE | DenseFFN
        if moe:
            self.ffn = MoE(
                cfg.d_model,
                cfg.n_experts,
                cfg.top_k,
                cfg.expert_hidden,
                cfg.bias_update_rate,
                cfg.balance_loss_weight,
            )
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.dense_hidden)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD))
        return x_BTD + self.ffn(self.ffn_norm(x_BTD))


class MTPHead(nn.Module):
    """One MTP depth: proj([norm(h); norm(emb)]) -> a sliding-window block with a dense FFN."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_h = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.norm_e = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg, "swa", moe=False)
        self.norm_out = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, h_BTD: torch.Tensor, emb_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = self.proj(torch.cat([self.norm_h(h_BTD), self.norm_e(emb_BTD)], dim=-1))
        return self.block(x_BTD)


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V] main-head logits
    loss: torch.Tensor | None  # main + mtp_loss_weight * mean(mtp) + aux
    main_loss: torch.Tensor | None  # next-token cross-entropy (nats / token)
    mtp_losses: list[torch.Tensor]  # one per MTP depth, d = 1..mtp_depth
    aux_loss: torch.Tensor | None  # sum of the MoE balance losses (0 when off)


class MoETransformer(nn.Module):
    """Hybrid full/sliding-window MoE decoder with MTP heads. See model/__init__.py for the
    probe surface that telemetry builds against."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(
            Block(cfg, cfg.layer_kind(i), moe=cfg.is_moe_layer(i)) for i in range(cfg.n_layers)
        )
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPHead(cfg) for _ in range(cfg.mtp_depth))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual-branch outputs (GPT-2)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("attn.wo", "w_down"))
                nn.init.normal_(module.weight, std=out_std if is_out else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RoutedExperts):
                nn.init.normal_(module.w_gate, std=std)
                nn.init.normal_(module.w_up, std=std)
                nn.init.normal_(module.w_down, std=out_std)

    def moe_layers(self) -> list[tuple[int, MoE]]:
        """(layer index, MoE) for every MoE block of the trunk (not the MTP heads)."""
        return [(i, block.ffn) for i, block in enumerate(self.layers) if isinstance(block.ffn, MoE)]

    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step; the loop calls it once after optimizer.step()."""
        for _, moe in self.moe_layers():
            moe.update_expert_bias()

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None) -> ModelOutput:
        if idx_BT.dim() != 2 or idx_BT.dtype != torch.long:
            raise ValueError(
                f"idx_BT must be a 2-D long tensor, got {tuple(idx_BT.shape)} {idx_BT.dtype}"
            )
        if targets_BT is not None and targets_BT.shape != idx_BT.shape:
            raise ValueError(
                f"targets_BT shape {tuple(targets_BT.shape)} != idx_BT shape {tuple(idx_BT.shape)}"
            )
        x_BTD = self.embed(idx_BT)
        for block in self.layers:
            x_BTD = block(x_BTD)
        logits_BTV = self.lm_head(self.norm(x_BTD))
        if targets_BT is None:
            return ModelOutput(logits_BTV, None, None, [], None)

        V = self.cfg.vocab_size
        main_loss = F.cross_entropy(logits_BTV.reshape(-1, V), targets_BT.reshape(-1))
        mtp_losses = []
        h_BTD, T = x_BTD, idx_BT.shape[1]
        for d, head in enumerate(self.mtp, start=1):
            if T - d <= 0:
                break
            emb_BTD = self.embed(targets_BT[:, d - 1 : T - 1])
            h_BTD = head(h_BTD[:, : T - d], emb_BTD)
            mtp_logits = F.linear(head.norm_out(h_BTD), self.lm_head.weight)  # no lm_head hook
            mtp_losses.append(
                F.cross_entropy(mtp_logits.reshape(-1, V), targets_BT[:, d:].reshape(-1))
            )
        aux_terms = [moe.aux_loss for _, moe in self.moe_layers() if moe.aux_loss is not None]
        aux_loss = torch.stack(aux_terms).sum() if aux_terms else main_loss.new_zeros(())
        loss = main_loss + aux_loss
        if mtp_losses:
            loss = loss + self.cfg.mtp_loss_weight * torch.stack(mtp_losses).mean()
        return ModelOutput(logits_BTV, loss, main_loss, mtp_losses, aux_loss)
