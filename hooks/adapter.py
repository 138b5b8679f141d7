"""Where the monitor finds things in a model: the adapter protocol and the adapter for model/.

The Monitor never walks a model itself. An adapter names the observation points (router
modules, expert probes, attention probes, residual blocks, output head), the batched expert
parameters, and the clamp sites, so any MoE implementation can be monitored by writing one small
class. `StepFlashAdapter` is that class for this project's model/, found by attribute names
alone: hooks/ never imports model/ (it installs into someone else's training job).

Probe convention (model/probe.py): a probe is an nn.Module the model calls with internal tensors
only when it has a forward hook, so registering the monitor's hook is what turns the
measurement on; the hook receives the tensors as positional args.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

CLAMP_SITES = ("routed", "shared")


class RouterView(NamedTuple):
    """The router's output for one forward, in the shape the monitor reads."""

    topk_idx_TK: torch.Tensor  # long [T, K]: experts chosen per token
    topk_weight_TK: torch.Tensor  # [T, K]: normalized gate weights
    scores_TE: torch.Tensor | None  # unbiased per-expert probabilities (sigmoid or softmax);
    # None: the softmax of logits_TE, which the monitor then never materialises
    logits_TE: torch.Tensor  # pre-activation router logits


@dataclass(frozen=True)
class MoESite:
    """One MoE layer as the monitor sees it."""

    layer: int  # index of the residual block holding this MoE
    n_experts: int
    top_k: int
    router: nn.Module  # forward-hooked; output decoded by MoEAdapter.decode_router
    expert_probe: nn.Module | None  # called (h_NH, out_ND, expert_idx_N) per routed assignment
    shared_probe: nn.Module | None  # called (h_TH, out_TD); None when there is no shared expert
    expert_weights: tuple[torch.Tensor, ...]  # batched routed params, expert on dim 0
    expert_bias: torch.Tensor | None  # selection bias [E] (aux-loss-free balancing), if any


@dataclass(frozen=True)
class AttentionSite:
    layer: int
    probe: nn.Module  # called (max_logit_H,): per-head max pre-softmax logit
    n_heads: int


@runtime_checkable
class MoEAdapter(Protocol):
    """What the Monitor needs from a model. All methods are called once at attach, except
    decode_router (per router forward, inside a hook: no host sync allowed) and
    set_clamp/clamp_limit (at step boundaries, when a clip update arrives)."""

    def residual_blocks(self) -> Sequence[nn.Module]:
        """Blocks whose forward output is the residual stream, index = layer."""

    def attention_sites(self) -> Sequence[AttentionSite]:
        """Per-head max-logit probes; empty when the model has none."""

    def moe_sites(self) -> Sequence[MoESite]:
        """The MoE layers in increasing layer order."""

    def output_head(self) -> nn.Module | None:
        """The module whose forward output is the main output logits."""

    def decode_router(self, output: Any) -> RouterView:
        """Turn a router module's forward output into a RouterView (no copies, no sync)."""

    def n_mtp(self) -> int:
        """How many multi-token-prediction losses step_end receives."""

    def set_clamp(self, layer: int, site: str, limit: float | None) -> None:
        """Clamp the SwiGLU of (layer, site) at limit, or switch it off with None."""

    def clamp_limit(self, layer: int, site: str) -> float | None:
        """The limit in force, None = off."""

    def describe(self) -> dict:
        """Model facts for Hello.config_json (preset, shapes); JSON-serialisable."""


def _need(obj: object, what: str, attrs: Sequence[str]) -> None:
    missing = [a for a in attrs if not hasattr(obj, a)]
    if missing:
        raise TypeError(
            f"StepFlashAdapter: {what} ({type(obj).__name__}) lacks {missing}; pass "
            f"Monitor(adapter=...) to describe a different MoE implementation"
        )


class StepFlashAdapter:
    """Adapter for model/'s MoETransformer (Step 3.5 Flash-style), found structurally.

    Needs: model.layers (blocks; block.attn.probe_logits and block.attn.n_heads where the
    block has attention), model.moe_layers() -> [(layer, MoE)], MoE.router returning
    (topk_idx, topk_weight, scores, logits), MoE.probe_experts / probe_shared,
    MoE.experts.w_gate/w_up/w_down, MoE.expert_bias, MoE.set_clamp / clamp_limit,
    model.lm_head, and optionally model.config (or model.cfg).mtp_depth.
    """

    def __init__(self, model: nn.Module) -> None:
        for wrapped in ("module", "_orig_mod"):  # DDP / FSDP wrapper, torch.compile
            inner = getattr(model, wrapped, None)
            if not hasattr(model, "moe_layers") and isinstance(inner, nn.Module):
                model = inner
        _need(model, "model", ("layers", "moe_layers", "lm_head"))
        # Found by attribute name alone (above), so typed Any: an nn.Module attribute would
        # type-check as Tensor | Module, never as the method or list it is.
        found: Any = model
        self.model = found
        self._moe: dict[int, Any] = {}
        for layer, moe in found.moe_layers():
            _need(
                moe,
                f"MoE of layer {layer}",
                (
                    "router",
                    "n_experts",
                    "top_k",
                    "experts",
                    "probe_experts",
                    "set_clamp",
                    "clamp_limit",
                ),
            )
            _need(moe.experts, f"experts of layer {layer}", ("w_gate", "w_up", "w_down"))
            self._moe[int(layer)] = moe

    def residual_blocks(self) -> Sequence[nn.Module]:
        return list(self.model.layers)

    def attention_sites(self) -> list[AttentionSite]:
        sites = []
        for i, block in enumerate(self.model.layers):
            attn = getattr(block, "attn", None)
            if attn is not None and hasattr(attn, "probe_logits"):
                sites.append(AttentionSite(i, attn.probe_logits, int(attn.n_heads)))
        return sites

    def moe_sites(self) -> list[MoESite]:
        return [
            MoESite(
                layer=layer,
                n_experts=int(moe.n_experts),
                top_k=int(moe.top_k),
                router=moe.router,
                expert_probe=moe.probe_experts,
                shared_probe=getattr(moe, "probe_shared", None),
                expert_weights=(moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down),
                expert_bias=getattr(moe, "expert_bias", None),
            )
            for layer, moe in sorted(self._moe.items())
        ]

    def output_head(self) -> nn.Module | None:
        return self.model.lm_head

    def decode_router(self, output: Any) -> RouterView:
        if hasattr(output, "topk_idx_TK"):
            return RouterView(
                output.topk_idx_TK, output.topk_weight_TK, output.scores_TE, output.logits_TE
            )
        return RouterView(*output[:4])  # a plain 4-tuple in the same order

    def _config(self) -> Any:
        return getattr(self.model, "config", None) or getattr(self.model, "cfg", None)

    def n_mtp(self) -> int:
        return int(getattr(self._config(), "mtp_depth", 0) or 0)

    def _moe_at(self, layer: int) -> Any:
        try:
            return self._moe[int(layer)]
        except KeyError:
            raise ValueError(
                f"layer {layer} is not an MoE layer (MoE layers: {sorted(self._moe)})"
            ) from None

    def set_clamp(self, layer: int, site: str, limit: float | None) -> None:
        if site not in CLAMP_SITES:
            raise ValueError(f"clamp site must be one of {CLAMP_SITES}, got {site!r}")
        self._moe_at(layer).set_clamp(site, limit)

    def clamp_limit(self, layer: int, site: str) -> float | None:
        return self._moe_at(layer).clamp_limit(site)

    def describe(self) -> dict:
        config = self._config()
        out: dict = {
            "adapter": type(self).__name__,
            "model": type(self.model).__name__,
            "moe_layers": sorted(self._moe),
        }
        to_dict = getattr(config, "to_dict", None)
        if callable(to_dict):
            out["model_config"] = {
                k: v
                for k, v in to_dict().items()
                if isinstance(v, (int, float, str, bool))
                and not (isinstance(v, float) and not math.isfinite(v))
            }
        return out
