"""Tiny torchtitan MoE decoders built on CPU from torchtitan's own config builders (no download).

`qwen3_moe()` is torchtitan's Qwen3 MoE decoder (softmax router, no shared expert, no selection
bias); `deepseek_moe()` the same decoder with a DeepSeek-V3-style MoE: sigmoid router with the
aux-loss-free `expert_bias_E` and a shared SwiGLU expert. Attention uses torchtitan's
ScaledDotProductAttention inner attention (causal; its flex default needs a compiler on CPU).
Used by tests/torchtitan and benchmarks/adapter_overhead.py; imports torchtitan, so only the
torchtitan venv (Makefile: .venv-titan) can run it.
"""

from __future__ import annotations

import torch
from torch import nn

DIM, HEAD_DIM, VOCAB, HIDDEN, EXPERTS, TOP_K, LAYERS = 64, 16, 128, 32, 8, 2, 3


def _build(*, deepseek: bool, layers: int = LAYERS, seed: int = 0) -> nn.Module:
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.config_utils import make_ffn_config
    from torchtitan.models.qwen3 import (
        _EMBEDDING_INIT,
        _LINEAR_INIT,
        Qwen3Model,
        _build_qwen3_moe_layers,
        _qwen3_norm,
    )

    blocks = _build_qwen3_moe_layers(
        n_layers=layers,
        dim=DIM,
        n_heads=4,
        n_kv_heads=2,
        head_dim=HEAD_DIM,
        moe_hidden_dim=HIDDEN,
        num_experts=EXPERTS,
        top_k=TOP_K,
        attn_backend="flex",
        moe_comm_backend="standard",  # all-to-all dispatcher: local reorder when EP = 1
        rope=CosSinRoPE.Config(dim=HEAD_DIM, max_seq_len=256, theta=1e6),
    )
    for block in blocks:
        block.attention.inner_attention = ScaledDotProductAttention.Config()
        moe = block.moe
        if deepseek:
            moe.router.score_func = "sigmoid"
            moe.shared_experts = make_ffn_config(
                dim=DIM, hidden_dim=HIDDEN, w1_param_init=_LINEAR_INIT, w2w3_param_init=_LINEAR_INIT
            )
        else:
            moe.load_balance_coeff = None  # no selection bias: router/bias_absmax not laid out
    config = Qwen3Model.Config(
        vocab_size=VOCAB,
        dim=DIM,
        norm=_qwen3_norm(DIM),
        tok_embeddings=Embedding.Config(
            num_embeddings=VOCAB, embedding_dim=DIM, param_init=_EMBEDDING_INIT
        ),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=_LINEAR_INIT),
        layers=blocks,
    )
    torch.manual_seed(seed)
    model = config.build()
    model.init_states()
    return model


def qwen3_moe(**kw) -> nn.Module:
    return _build(deepseek=False, **kw)


def deepseek_moe(**kw) -> nn.Module:
    return _build(deepseek=True, **kw)


def loss_of(model: nn.Module, idx_BT: torch.Tensor) -> torch.Tensor:
    logits = model(idx_BT)
    targets = torch.roll(idx_BT, -1, dims=1)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1))
