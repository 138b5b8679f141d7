"""Shipped adapters, and the one function that picks one for a model.

    adapter = select_adapter(model)   # what Monitor(model, ...) and attach(model) call

Families, tried in this order (each test is structural and imports nothing the model does not
already use: a model is only a transformers or torchtitan model if that library is imported):
  model/          StepFlashAdapter (hooks/adapter.py): this project's MoETransformer
  transformers    HFMoEAdapter (hooks/adapters/hf.py): the Transformers 5.x MoE layout
  torchtitan      TorchtitanMoEAdapter (hooks/adapters/torchtitan.py): torchtitan's MoE module
A wrapper (a LightningModule, the user's own nn.Module) is searched for the first submodule
one of them fits. Anything else raises `UnsupportedModelError` naming these families; pass
`Monitor(adapter=...)` with an object of the MoEAdapter protocol instead (README: "Writing an
adapter").
"""

from __future__ import annotations

from torch import nn

from hooks.adapter import MoEAdapter, StepFlashAdapter
from hooks.adapters import hf, torchtitan

SUPPORTED_FAMILIES = (
    "stepwatch model/ (MoETransformer)",
    hf.FAMILY,
    torchtitan.FAMILY,
)


class UnsupportedModelError(TypeError):
    """No shipped adapter fits the model."""


def _unwrap(model: nn.Module) -> nn.Module:
    for wrapped in ("module", "_orig_mod"):  # DDP / FSDP1 wrapper, torch.compile
        inner = getattr(model, wrapped, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return model


def select_adapter(model: nn.Module) -> MoEAdapter:
    """The shipped adapter for `model`, or UnsupportedModelError."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch nn.Module, got {type(model).__name__}")
    inner = _unwrap(model)
    if hasattr(inner, "moe_layers"):  # model/'s surface (its adapter says what is missing)
        return StepFlashAdapter(inner)
    if torchtitan.supports(inner):  # searches the whole module tree itself
        return torchtitan.TorchtitanMoEAdapter(inner)
    for mod in inner.modules():  # the model itself, or one a wrapper holds (LightningModule)
        if mod is not inner and hasattr(mod, "moe_layers") and hasattr(mod, "lm_head"):
            return StepFlashAdapter(mod)
        if hf.supports(mod):
            return hf.HFMoEAdapter(mod)
    families = "\n  - ".join(SUPPORTED_FAMILIES)
    raise UnsupportedModelError(
        f"stepwatch has no adapter for {type(inner).__name__}: no MoE layer of a supported "
        f"family was found. Supported families:\n  - {families}\n"
        f"For another MoE, pass Monitor(model, ..., adapter=YourAdapter(model)) implementing "
        f"hooks.MoEAdapter (README: 'Writing an adapter')."
    )


__all__ = ["SUPPORTED_FAMILIES", "UnsupportedModelError", "select_adapter"]
