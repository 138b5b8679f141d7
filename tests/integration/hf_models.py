"""Tiny random Hugging Face MoE models of every family the HF adapter must cover (hidden 64,
3 layers, 8 experts, top-2, no downloads), and what an independent recomputation needs to know
about each: how its router scores, and how its MoE block combines routed and shared experts."""

from __future__ import annotations

import torch

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def _families() -> dict:
    import transformers as tf

    return {
        "mixtral": (
            tf.MixtralConfig,
            tf.MixtralForCausalLM,
            dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
        ),
        "qwen2_moe": (
            tf.Qwen2MoeConfig,
            tf.Qwen2MoeForCausalLM,
            dict(
                intermediate_size=64,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=64,
                num_experts=8,
                num_experts_per_tok=2,
            ),
        ),
        "qwen3_moe": (
            tf.Qwen3MoeConfig,
            tf.Qwen3MoeForCausalLM,
            dict(
                intermediate_size=64,
                moe_intermediate_size=32,
                num_experts=8,
                num_experts_per_tok=2,
                head_dim=16,
            ),
        ),
        "olmoe": (
            tf.OlmoeConfig,
            tf.OlmoeForCausalLM,
            dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2, eos_token_id=1),
        ),
        "deepseek_v3": (
            tf.DeepseekV3Config,
            tf.DeepseekV3ForCausalLM,
            dict(
                intermediate_size=64,
                moe_intermediate_size=32,
                n_routed_experts=8,
                num_experts_per_tok=2,
                n_shared_experts=1,
                first_k_dense_replace=1,  # layer 0 dense: MoE layers are 1 and 2
                n_group=1,
                topk_group=1,
                kv_lora_rank=16,
                q_lora_rank=None,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=16,
            ),
        ),
    }


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def build(family: str, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, kw = _families()[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **kw))
    if family == "deepseek_v3":  # a nonzero selection bias, so the recount must apply it
        for layer in model.model.layers:
            bias = getattr(layer.mlp, "gate", None)
            if bias is not None:
                bias.e_score_correction_bias.copy_(torch.linspace(-0.02, 0.03, 8))
    return model


def sigmoid_router(family: str) -> bool:
    return family == "deepseek_v3"
