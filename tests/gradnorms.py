"""Gradient norms recomputed in float64 from a model's own grads, and the check of what the
store holds against them: shared by the Hugging Face and torchtitan end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import pytest
import torch
from torch import nn

from store import open_store


def grad_norms(
    blocks: Iterable[nn.Module], expert_weights: Callable[[nn.Module], Sequence[torch.Tensor]]
) -> dict[str, float]:
    """By metric name: each decoder layer's gradient norm (every parameter with a grad) and,
    where `expert_weights(block)` gives batched [E, ...] routed weights that all have grads,
    each expert's (its slices of them)."""
    out = {}
    g = lambda p: p.grad.detach().double()
    for layer, block in enumerate(blocks):
        ps = [p for p in block.parameters() if p.grad is not None]
        out[f"grad/layer{layer:02d}/norm"] = float(torch.cat([g(p).reshape(-1) for p in ps]).norm())
        ws = expert_weights(block)
        if ws and all(w.grad is not None for w in ws):
            sq = sum(g(w).pow(2).sum(dim=tuple(range(1, w.dim()))) for w in ws)
            for e, v in enumerate(sq.sqrt().tolist()):
                out[f"grad/layer{layer:02d}/expert{e:03d}/norm"] = v
    return out


def assert_stored_grad_norms(url: str, run: str, want: dict[int, dict[str, float]]) -> None:
    """Every step's stored grad/* values equal `want[step]` (and some are per expert)."""
    with open_store(url) as st:
        for step, names in want.items():
            got = st.at_step(run, step, "grad/*")
            got = dict(zip(got["name"].to_list(), got["value"].to_list()))
            assert any("/expert" in n for n in names)
            for name, value in names.items():
                assert got[name] == pytest.approx(value, rel=1e-5), (step, name)
