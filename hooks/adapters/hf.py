"""Adapter for the Hugging Face Transformers 5.x MoE layout, found structurally (no per-family code).

The layout: a decoder `ModuleList` whose blocks hold `mlp`; an MoE `mlp` has a router `gate`
returning (router_logits, top_k_weights, top_k_index) and fused `experts` (3-D `gate_up_proj`
and `down_proj`, decorated with `use_experts_implementation`, so their forward dispatches
through transformers' ExpertsInterface), optionally a shared SwiGLU (`shared_expert(s)`:
gate_proj / up_proj / down_proj / act_fn). Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3
and the other families built from the same parts (GLM-4-MoE, Ernie-4.5-MoE, dots1, ...) fit.

Where the statistics come from (transformers' own extension points, nothing recomputed):
  routed experts  the model's experts implementation is set to "stepwatch", registered in
                  ExpertsInterface: transformers' grouped_mm path (its `_grouped_linear`
                  kernels: tokens sorted by expert, one grouped GEMM up, the experts'
                  `_apply_gate`, one down) that hands the SwiGLU intermediate and the expert
                  output it has just computed to a Tap, with the expert id of every row;
  clamp (routed)  the experts' `_apply_gate` is overridden on the instance with
                  act_fn(gate).clamp(max=L) * up.clamp(-L, L): both halves, inside the forward,
                  in every implementation that calls `_apply_gate` (grouped_mm, batched_mm,
                  ours). A family whose class defines its own `_apply_gate` keeps it, and its
                  routed clamp is refused (set_clamp raises);
  shared expert   a forward hook on its down projection (input = intermediate, output = expert
                  output); the clamp binds through hooks on `act_fn` and `up_proj`;
  router          the `gate` module's own output; the unbiased scores are its softmax (or the
                  sigmoid, where the router's forward or `config.scoring_func` says so);
  attention       the attention implementation is set to "stepwatch_<base>", registered in
                  AttentionInterface (and its mask function in AttentionMaskInterface): it calls
                  the base implementation unchanged and, while the Tap is hooked, the per-head max
                  of q k^T * scaling over unmasked positions (one extra QK^T under no_grad).
`release()` restores both implementations and removes every hook and attribute.
"""

from __future__ import annotations

import inspect
import math
import sys
import types
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
    max_logit_H,
    tap_output,
)

EXPERTS_IMPL = "stepwatch"
ATTN_PREFIX = "stepwatch_"
STATE = "_stepwatch_state"  # attribute holding an _ExpertsState / _AttnState on a module
FAMILY = (
    "Hugging Face Transformers 5.x MoE layout (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, "
    "DeepSeek-V3 and families with mlp.gate + ExpertsInterface experts)"
)


class _ExpertsState:
    """What the stepwatch experts implementation reads on one experts module (a plain
    object, so the Tap does not become a submodule of the user's model)."""

    def __init__(self, tap: Tap) -> None:
        self.tap = tap
        self.limit: float | None = None


class _AttnState:
    def __init__(self, tap: Tap, base: str) -> None:
        self.tap, self.base = tap, base


# ---------------------------------------------------------------- registered implementations


def _experts_forward(
    self: Any,  # the experts module (transformers' class: attributes are its own)
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' grouped_mm experts path, handing its intermediates to the Tap."""
    from transformers.integrations.moe import _grouped_linear

    K, T, D = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    E = self.num_experts
    weights_S, ids_S = top_k_weights.reshape(-1), top_k_index.reshape(-1)
    ids_g, perm = torch.sort(ids_S)  # rows grouped by expert
    x_g = hidden_states[perm // K]
    counts = torch.histc(  # histc: float on CPU/MPS, int on CUDA (as transformers does)
        ids_g.float() if ids_g.device.type in ("cpu", "mps") else ids_g.int(),
        bins=E,
        min=0,
        max=E - 1,
    )
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    has_bias, transposed = self.has_bias, self.is_transposed
    if self.has_gate:
        w_in, b_in = self.gate_up_proj, self.gate_up_proj_bias[ids_g] if has_bias else None
    else:
        w_in, b_in = self.up_proj, self.up_proj_bias[ids_g] if has_bias else None
    proj = _grouped_linear(x_g, w_in, offsets, bias=b_in, is_transposed=transposed)
    h = self._apply_gate(proj) if self.has_gate else self.act_fn(proj)
    b_out = self.down_proj_bias[ids_g] if has_bias else None
    out = _grouped_linear(h, self.down_proj, offsets, bias=b_out, is_transposed=transposed)
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    state = self.__dict__.get(STATE)
    if state is not None and state.tap.active:
        state.tap(h.detach(), out.detach(), ids_g)
    weighted = out * weights_S[perm].unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    final = weighted[inv_perm].view(T, K, D).sum(dim=1)
    return final.to(hidden_states.dtype)


def _clamped_apply_gate(self: Any, gate_up: torch.Tensor) -> torch.Tensor:
    """transformers' default `_apply_gate` with both halves of the clamp."""
    gate, up = gate_up.chunk(2, dim=-1)
    act = self.act_fn(gate)
    limit = self.__dict__[STATE].limit
    if limit is not None:
        act, up = act.clamp(max=limit), up.clamp(-limit, limit)
    return act * up


def _max_logit_H(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: Any, kw: dict
) -> torch.Tensor:
    """Per-head max logit of one attention call, with the mask or causality it was given."""
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    causal = kw.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    m = mask if isinstance(mask, torch.Tensor) else None
    return max_logit_H(query, key, scale, bool(causal), m)


def _attention_for(base: str):
    """The AttentionInterface function `stepwatch_<base>`: base unchanged, plus the Tap."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if base == "eager":  # the family's own eager function, as its modeling file passes it
            fn = sys.modules[type(module).__module__].eager_attention_forward
        else:
            fn = ALL_ATTENTION_FUNCTIONS[base]
        state = module.__dict__.get(STATE)
        if state is not None and state.tap.active:
            with torch.no_grad():
                scaling = kwargs.get("scaling", args[1] if len(args) > 1 else None)
                state.tap(_max_logit_H(module, query, key, attention_mask, scaling, kwargs))
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


def _register(attn_base: str) -> str:
    from transformers.integrations.moe import ExpertsInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    ExpertsInterface.register(EXPERTS_IMPL, _experts_forward)
    name = ATTN_PREFIX + attn_base
    AttentionInterface.register(name, _attention_for(attn_base))
    if attn_base in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[attn_base])
    return name


# ---------------------------------------------------------------- finding the layout


def _is_experts(mod: Any) -> bool:
    """Fused experts that dispatch through ExpertsInterface (use_experts_implementation)."""
    return (
        isinstance(mod, nn.Module)
        and hasattr(mod, "has_gate")
        and hasattr(mod, "down_proj")
        and hasattr(mod, "config")
        and (hasattr(mod, "gate_up_proj") or hasattr(mod, "up_proj"))
    )


def _is_moe(mlp: Any) -> bool:
    return isinstance(getattr(mlp, "gate", None), nn.Module) and _is_experts(
        getattr(mlp, "experts", None)
    )


def _shared_swiglu(mlp: nn.Module) -> Any:
    found = [
        child
        for name, child in mlp.named_children()
        if name not in ("gate", "experts")
        and all(hasattr(child, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    ]
    if len(found) > 1:
        raise TypeError(f"HFMoEAdapter: {type(mlp).__name__} has {len(found)} shared SwiGLUs")
    return found[0] if found else None


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and any(_is_moe(getattr(b, "mlp", None)) for b in mod):
            return mod
    return None


def supports(model: nn.Module) -> bool:
    """True for a transformers PreTrainedModel with at least one MoE block in the layout."""
    tf = sys.modules.get("transformers")  # not imported: cannot be a transformers model
    if tf is None or not isinstance(model, nn.Module):
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and _decoder_layers(model) is not None


def _sigmoid_router(router: nn.Module, config: Any) -> bool:
    func = getattr(config, "scoring_func", None)
    if isinstance(func, str):
        return func == "sigmoid"
    try:  # the router's own forward says which (transformers inspects sources the same way)
        return "sigmoid" in inspect.getsource(type(router).forward)
    except (OSError, TypeError):
        return False


# ---------------------------------------------------------------- the adapter


class HFMoEAdapter:
    """MoEAdapter for a transformers 5.x model in the MoE layout above."""

    family = FAMILY

    def __init__(self, model: Any) -> None:  # a transformers PreTrainedModel
        if not supports(model):
            raise TypeError(
                f"HFMoEAdapter: {type(model).__name__} is not in the layout of {FAMILY}"
            )
        from transformers.integrations.moe import _default_apply_gate

        self.model: Any = model
        self.config: Any = model.config
        layers = _decoder_layers(model)
        assert layers is not None
        self.layers: list[Any] = list(layers)
        self._handles: list = []
        self._experts: dict[int, Any] = {}
        self._routers: dict[int, Any] = {}
        self._expert_taps: dict[int, Tap] = {}
        self._shared: dict[int, tuple[Any, Tap, SwiGLUClamp]] = {}
        self._gate_clamp: dict[int, bool] = {}
        for i, block in enumerate(self.layers):
            mlp: Any = getattr(block, "mlp", None)
            if not _is_moe(mlp):
                continue
            experts = mlp.experts
            if getattr(experts, "_is_expert_parallel", False):
                raise TypeError(
                    "HFMoEAdapter: transformers expert parallelism (_is_expert_parallel) is not "
                    "supported; attach before distributing the experts, or per local shard"
                )
            tap = Tap()
            experts.__dict__[STATE] = _ExpertsState(tap)
            self._gate_clamp[i] = bool(experts.has_gate) and (
                type(experts)._apply_gate is _default_apply_gate
            )
            if self._gate_clamp[i]:
                experts.__dict__["_apply_gate"] = types.MethodType(_clamped_apply_gate, experts)
            self._experts[i], self._routers[i], self._expert_taps[i] = experts, mlp.gate, tap
            shared = _shared_swiglu(mlp)
            if shared is not None:
                s_tap = Tap()
                self._handles.append(tap_output(shared.down_proj, s_tap))
                clamp = SwiGLUClamp(shared, shared.up_proj, _private_act(model, shared))
                self._shared[i] = (shared, s_tap, clamp)
        self._sigmoid = _sigmoid_router(next(iter(self._routers.values())), self.config)
        # ExpertsInterface / AttentionInterface: switch this model onto the stepwatch functions
        self._prev_experts = self.config._experts_implementation
        self._prev_attn = self.config._attn_implementation
        attn_base = self._prev_attn or "eager"
        if attn_base.startswith(ATTN_PREFIX):
            raise ValueError("HFMoEAdapter: this model is already attached to a stepwatch Monitor")
        attn_name = _register(attn_base)
        model.set_experts_implementation(EXPERTS_IMPL)
        model.set_attn_implementation(attn_name)
        self._attn: list[tuple[int, Any, Tap]] = []
        for i, block in enumerate(self.layers):
            attn = getattr(block, "self_attn", None)
            if isinstance(attn, nn.Module):
                tap = Tap()
                attn.__dict__[STATE] = _AttnState(tap, attn_base)
                self._attn.append((i, attn, tap))
        wrong = [
            i for i, e in self._experts.items() if e.config._experts_implementation != EXPERTS_IMPL
        ]
        if wrong or self.config._attn_implementation != attn_name:
            self.release()
            raise TypeError(
                f"HFMoEAdapter: {type(model).__name__} did not take the stepwatch experts / "
                f"attention implementations (layers {wrong}); it does not dispatch through "
                f"transformers' ExpertsInterface and AttentionInterface"
            )

    # -- MoEAdapter ------------------------------------------------------------------------
    def residual_blocks(self) -> Sequence[nn.Module]:
        return self.layers

    def attention_sites(self) -> list[AttentionSite]:
        n_heads = int(self.config.num_attention_heads)
        return [AttentionSite(i, tap, n_heads) for i, _, tap in self._attn]

    def moe_sites(self) -> list[MoESite]:
        sites = []
        for i, experts in self._experts.items():
            router = self._routers[i]
            bias = getattr(router, "e_score_correction_bias", None)
            if bias is None:
                bias = getattr(router, "expert_bias", None)
            sites.append(
                MoESite(
                    layer=i,
                    n_experts=int(experts.num_experts),
                    top_k=int(getattr(router, "top_k", self.config.num_experts_per_tok)),
                    router=router,
                    expert_probe=self._expert_taps[i],
                    shared_probe=self._shared[i][1] if i in self._shared else None,
                    expert_weights=tuple(
                        p
                        for name in ("gate_up_proj", "up_proj", "down_proj")
                        if isinstance(p := getattr(experts, name, None), nn.Parameter)
                    ),
                    expert_bias=bias if isinstance(bias, torch.Tensor) else None,
                )
            )
        return sites

    def output_head(self) -> nn.Module | None:
        get = getattr(self.model, "get_output_embeddings", None)
        head: Any = get() if callable(get) else None
        return head if isinstance(head, nn.Module) else None

    def decode_router(self, output: Any) -> RouterView:
        logits, weights, idx = output[0], output[1], output[2]
        logits = logits.reshape(-1, logits.shape[-1])
        # softmax routers: None says "the softmax of the logits", never materialised
        scores = torch.sigmoid(logits.float()) if self._sigmoid else None
        K = idx.shape[-1]
        return RouterView(idx.reshape(-1, K), weights.reshape(-1, K), scores, logits)

    def n_mtp(self) -> int:
        return 0

    def set_clamp(self, layer: int, site: str, limit: float | None) -> None:
        if site not in CLAMP_SITES:
            raise ValueError(f"clamp site must be one of {CLAMP_SITES}, got {site!r}")
        if layer not in self._experts:
            raise ValueError(f"layer {layer} is not an MoE layer (MoE layers: {self.moe_layers})")
        if site == "shared":
            if layer not in self._shared:
                raise ValueError(f"layer {layer} has no shared expert")
            self._shared[layer][2].set(limit)
            return
        if not self._gate_clamp[layer]:
            raise ValueError(
                f"{type(self._experts[layer]).__name__} defines its own _apply_gate; the routed "
                f"clamp cannot bind inside it"
            )
        self._experts[layer].__dict__[STATE].limit = check_limit(limit)

    def clamp_limit(self, layer: int, site: str) -> float | None:
        if site == "shared":
            return self._shared[layer][2].limit if layer in self._shared else None
        state = self._experts[layer].__dict__.get(STATE)
        return None if state is None else state.limit

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self._experts)

    def describe(self) -> dict:
        out: dict = {
            "adapter": type(self).__name__,
            "model": type(self.model).__name__,
            "family": getattr(self.config, "model_type", ""),
            "moe_layers": self.moe_layers,
            "experts_implementation": {"was": self._prev_experts, "now": EXPERTS_IMPL},
            "attn_implementation": {"was": self._prev_attn, "now": ATTN_PREFIX + "*"},
        }
        out["model_config"] = {
            k: v
            for k, v in self.config.to_dict().items()
            if isinstance(v, (int, float, str, bool))
            and not (isinstance(v, float) and not math.isfinite(v))
        }
        return out

    def release(self) -> None:
        """Undo everything attach did: implementations, hooks, clamps, attributes."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for _, _, clamp in self._shared.values():
            clamp.release()
        for experts in self._experts.values():
            experts.__dict__.pop(STATE, None)
            experts.__dict__.pop("_apply_gate", None)
        for _, attn, _ in self._attn:
            attn.__dict__.pop(STATE, None)
        if self.config._experts_implementation == EXPERTS_IMPL:
            self.model.set_experts_implementation(self._prev_experts or "grouped_mm")
        if str(self.config._attn_implementation).startswith(ATTN_PREFIX):
            self.model.set_attn_implementation(self._prev_attn or "eager")


def _private_act(model: nn.Module, mlp: Any) -> nn.Module:
    """The shared SwiGLU's activation module, made private to it if another module uses the
    same instance (a clamp hook on it must bind on this SwiGLU only)."""
    act = mlp.act_fn
    users = sum(1 for m in model.modules(remove_duplicate=False) if m is act)
    if users > 1:
        import copy

        act = copy.copy(act)
        mlp.act_fn = act
    return act
