"""Model configuration: one dataclass, three presets.

`ModelConfig` describes a miniature (or full-size) Step 3.5 Flash-style decoder: hybrid
full / sliding-window attention at 3:1, GQA with QK-norm and a head-wise output gate, MoE FFNs
with one shared expert and aux-loss-free balancing, and multi-token prediction heads.

Presets:
  tiny   unit tests: trains a step in well under a second on one core.
  demo   `python -m model.demo`: a clearly falling loss within a few hundred CPU steps.
  flash  the published Step 3.5 Flash shape; only ever built on the meta device (param counts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    """Token vocabulary. The byte-level presets use 256 (one token per byte, no specials)."""

    d_model: int = 64
    """Residual stream width D."""

    n_layers: int = 5
    """Number of decoder blocks. Layer i uses full attention iff i % (swa_per_full + 1) == 0,
    which gives the layout [F] + [S, S, S, F] * n for swa_per_full = 3."""

    swa_per_full: int = 3
    """Sliding-window layers between two full-attention layers (Step 3.5 Flash: 3)."""

    window: int = 16
    """Sliding-window size: a query at position i sees keys i-window+1 .. i (itself included)."""

    n_heads_full: int = 4
    """Query heads in full-attention layers."""

    n_heads_swa: int = 6
    """Query heads in sliding-window layers (more than full layers, as in Step 3.5 Flash)."""

    n_kv_heads: int = 2
    """Key/value heads shared by groups of query heads (grouped-query attention)."""

    head_dim: int = 16
    """Width of one attention head."""

    rope_theta: float = 10000.0
    """RoPE base frequency."""

    max_seq_len: int = 64
    """Longest sequence the RoPE tables cover."""

    n_dense_layers: int = 1
    """The first n_dense_layers blocks use a dense SwiGLU FFN; the rest are MoE."""

    dense_hidden: int = 128
    """Hidden width of the dense FFN layers (and of the MTP heads' FFN)."""

    n_experts: int = 8
    """Routed experts per MoE layer (E)."""

    top_k: int = 2
    """Routed experts selected per token (K)."""

    expert_hidden: int = 64
    """Hidden width H of one routed expert; the shared expert has the same width."""

    bias_update_rate: float = 1e-3
    """Aux-loss-free balancing: expert_bias += rate * sign(mean_load - load) once per optimizer
    step. 0 disables the update."""

    balance_loss_weight: float = 0.0
    """Weight of the optional sequence-wise balance loss (DeepSeek-V3 style); 0 = off."""

    mtp_depth: int = 1
    """Number of multi-token-prediction heads (0..3); head d predicts token t+1+d."""

    mtp_loss_weight: float = 0.3
    """loss = main + mtp_loss_weight * mean(mtp losses) + aux."""

    norm_eps: float = 1e-6
    """RMSNorm epsilon (also used by QK-norm)."""

    init_std: float = 0.02
    """Std of the normal init; output projections are further scaled by 1/sqrt(2 * n_layers)."""

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "d_model",
            "n_layers",
            "window",
            "n_heads_full",
            "n_heads_swa",
            "n_kv_heads",
            "head_dim",
            "max_seq_len",
            "dense_hidden",
            "n_experts",
            "top_k",
            "expert_hidden",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.swa_per_full < 0:
            raise ValueError(f"ModelConfig.swa_per_full must be >= 0, got {self.swa_per_full}")
        for name in ("n_heads_full", "n_heads_swa"):
            if getattr(self, name) % self.n_kv_heads:
                raise ValueError(
                    f"ModelConfig.{name}={getattr(self, name)} must be a multiple "
                    f"of n_kv_heads={self.n_kv_heads} (grouped-query attention)"
                )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(
                f"ModelConfig.n_dense_layers must be in [0, n_layers="
                f"{self.n_layers}], got {self.n_dense_layers}"
            )
        if self.top_k > self.n_experts:
            raise ValueError(f"ModelConfig.top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if not 0 <= self.mtp_depth <= 3:
            raise ValueError(f"ModelConfig.mtp_depth must be in 0..3, got {self.mtp_depth}")
        for name in ("bias_update_rate", "balance_loss_weight", "mtp_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
            raise ValueError("ModelConfig.norm_eps, init_std and rope_theta must be > 0")

    # -- derived ---------------------------------------------------------------------------
    def layer_kind(self, i: int) -> str:
        """'full' or 'swa' for layer i: [F] + [S]*swa_per_full + [F] + ..."""
        return "full" if i % (self.swa_per_full + 1) == 0 else "swa"

    @property
    def layer_kinds(self) -> list[str]:
        return [self.layer_kind(i) for i in range(self.n_layers)]

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.n_dense_layers

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # [F,S,S,S,F], 4 MoE layers of 8 experts top-2; ~0.2M parameters.
    "tiny": ModelConfig(),
    # [F]+[S,S,S,F]*2, 8 MoE layers of 16 experts top-4; ~2.7M parameters.
    "demo": ModelConfig(
        d_model=128,
        n_layers=9,
        window=32,
        n_heads_full=4,
        n_heads_swa=6,
        n_kv_heads=2,
        head_dim=32,
        max_seq_len=128,
        n_dense_layers=1,
        dense_hidden=256,
        n_experts=16,
        top_k=4,
        expert_hidden=64,
        mtp_depth=1,
    ),
    # Published Step 3.5 Flash shape: [F]+[S,S,S,F]*11 = 45 layers. The dense prefix (3 layers,
    # hidden 11264) is our estimate; `python -m model.params` checks the published totals.
    "flash": ModelConfig(
        vocab_size=128_896,
        d_model=4096,
        n_layers=45,
        window=512,
        n_heads_full=64,
        n_heads_swa=96,
        n_kv_heads=8,
        head_dim=128,
        max_seq_len=4096,
        n_dense_layers=3,
        dense_hidden=11264,
        n_experts=288,
        top_k=8,
        expert_hidden=1280,
        mtp_depth=3,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The preset `name`, optionally with some fields overridden."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return cfg.replace(**overrides) if overrides else cfg
