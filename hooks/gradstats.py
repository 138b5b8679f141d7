"""Gradient and parameter statistics, written into the capture buffer on the device.

Called at two loop points, never from inside autograd:
  before_optimizer  grads are final (after any all-reduce): global norm (given by the loop),
                    per-expert norms (one reduction per batched expert tensor, then one over
                    those, written with one cat) and per-layer norms (its experts' squared
                    norms plus one foreach reduction over the other grads, summed per layer
                    with index_add_): every grad read once, a few kernels per MoE layer;
                    on periodic steps also snapshots the parameters for the update ratio;
  after_step        on periodic steps: per-expert parameter Frobenius norms and
                    optim/update_ratio = ||theta_after - theta_before|| / ||theta_before||.
No host sync anywhere: norms stay tensors until the step's single host copy.
"""

from __future__ import annotations

import torch
from torch import nn

from hooks.adapter import MoEAdapter, MoESite
from hooks.layout import RegionKey as R
from hooks.stats import Capture


def _expert_norm(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-expert 2-norm over several batched [E, ...] tensors (at least one) -> [E] float32:
    each tensor's per-expert norms, then the norm over those (k + 2 kernels for k tensors)."""
    per = [
        torch.linalg.vector_norm(t, 2, dim=tuple(range(1, t.dim())), dtype=torch.float32)
        for t in tensors
    ]
    return per[0] if len(per) == 1 else torch.linalg.vector_norm(torch.stack(per), dim=0)


class GradCapture:
    """Owns the parameter bookkeeping (layer of each parameter, the update snapshot)."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter, capture: Capture) -> None:
        self.capture = capture
        self.sites: list[MoESite] = list(adapter.moe_sites())
        blocks = list(adapter.residual_blocks())
        owner: dict[int, int] = {}  # id(param) -> the first block that holds it
        for layer, block in enumerate(blocks):
            for p in block.parameters():
                if p.requires_grad:
                    owner.setdefault(id(p), layer)
        # A site's batched expert weights are read once a step, per expert (_expert_norm): its
        # layer's sum of squares takes the squares of those, the foreach norm only the rest.
        self.site_layer: list[int | None] = []
        by_site: set[int] = set()
        for site in self.sites:
            layers = {owner.get(id(w)) for w in site.expert_weights}
            held = layers.pop() if len(layers) == 1 else None  # one block holds them all
            self.site_layer.append(held)
            if held is not None:
                by_site.update(id(w) for w in site.expert_weights)
        self.params: list[nn.Parameter] = []
        layer_of: list[int] = []
        seen: set[int] = set()
        for layer, block in enumerate(blocks):
            for p in block.parameters():
                if p.requires_grad and id(p) not in seen and id(p) not in by_site:
                    seen.add(id(p))
                    self.params.append(p)
                    layer_of.append(layer)
        self.n_layers = len(blocks)
        self.layer_of = torch.tensor(layer_of, dtype=torch.long, device=capture.device)
        # each routed expert's layer, in the expert region's order, when every site has one
        self._expert_layer = (
            torch.tensor(
                [l for site, l in zip(self.sites, self.site_layer) for _ in range(site.n_experts)],
                dtype=torch.long,
                device=capture.device,
            )
            if self.sites and None not in self.site_layer
            else None
        )
        # the update ratio covers every trainable parameter, in or out of a block
        self.all_params = [p for p in model.parameters() if p.requires_grad]
        self._snapshot: list[torch.Tensor] | None = None
        self._old_sq: torch.Tensor | None = None
        self._snapshot_valid = False

    @torch.no_grad()
    def before_optimizer(self, grad_norm, periodic: bool) -> None:
        v = self.capture.view
        global_norm = v(R.GRAD_GLOBAL)
        if global_norm is not None:
            if isinstance(grad_norm, torch.Tensor):
                global_norm.copy_(grad_norm.detach().reshape(1))
            elif grad_norm is not None:
                global_norm.fill_(float(grad_norm))
            self._grad_norms(self.capture.need(R.GRAD_LAYER), v(R.GRAD_EXPERT))
        self._snapshot_valid = False
        if periodic and v(R.PARAMS_UPDATE_RATIO) is not None and self.all_params:
            if self._snapshot is None:  # allocated once, on the first periodic step
                self._snapshot = [torch.empty_like(p) for p in self.all_params]
            torch._foreach_copy_(self._snapshot, [p.detach() for p in self.all_params])
            self._old_sq = self._sum_sq(self._snapshot)
            self._snapshot_valid = True

    def _grad_norms(self, layer_dst: torch.Tensor, expert_dst: torch.Tensor | None) -> None:
        """Per-layer gradient norms into layer_dst, per-expert ones into expert_dst (None:
        that region is off): one pass over every gradient. A parameter without a grad counts
        as 0; a layer none of whose parameters has one stays NaN, as does an expert's slot."""
        layer_sq = torch.zeros(self.n_layers, dtype=torch.float32, device=layer_dst.device)
        any_grad = False
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            any_grad = True
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            if len(grads) != len(self.params):  # some params got no grad: they count as 0
                it = iter(norms)
                zero = torch.zeros((), dtype=torch.float32, device=layer_dst.device)
                norms = tuple(next(it) if p.grad is not None else zero for p in self.params)
            layer_sq.index_add_(0, self.layer_of, torch.stack(norms).square())
        per_site: list[torch.Tensor | None] = []
        for site, layer in zip(self.sites, self.site_layer):
            expert_grads = tuple(w.grad for w in site.expert_weights if w.grad is not None)
            wanted = expert_grads and (expert_dst is not None or layer is not None)
            per_site.append(_expert_norm(expert_grads) if wanted else None)
        found = [n for n in per_site if n is not None]
        if self._expert_layer is not None and found and len(found) == len(per_site):
            # every site: one cat into the expert slots, one index_add_ into the layers
            flat = torch.cat(found) if expert_dst is None else torch.cat(found, out=expert_dst)
            layer_sq.index_add_(0, self._expert_layer, flat.square())
            any_grad = True
        else:
            off = 0
            for site, layer, norm in zip(self.sites, self.site_layer, per_site):
                if norm is not None:
                    if expert_dst is not None:
                        expert_dst[off : off + site.n_experts].copy_(norm)
                    if layer is not None:
                        any_grad = True
                        layer_sq[layer] += norm.square().sum()
                off += site.n_experts
        if any_grad:
            torch.sqrt(layer_sq, out=layer_dst)

    @staticmethod
    def _sum_sq(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square().sum()

    @torch.no_grad()
    def after_step(self, periodic: bool) -> None:
        """Runs after optimizer.step(), at step_end, only on periodic steps."""
        if not periodic:
            return
        v = self.capture.view
        dst = v(R.PARAMS_EXPERT_FRO)
        if dst is not None:
            off = 0
            for site in self.sites:
                dst[off : off + site.n_experts].copy_(_expert_norm(site.expert_weights))
                off += site.n_experts
        ratio = v(R.PARAMS_UPDATE_RATIO)
        if ratio is not None and self._snapshot_valid:
            assert self._snapshot is not None and self._old_sq is not None  # valid: both taken
            torch._foreach_sub_(self._snapshot, [p.detach() for p in self.all_params])
            delta_sq = self._sum_sq(self._snapshot)  # snapshot now holds -delta
            ratio.copy_((delta_sq / self._old_sq).sqrt().reshape(1))
            self._snapshot_valid = False

    def release(self) -> None:
        """Free the snapshot (one copy of the parameters)."""
        self._snapshot = None
        self._old_sq = None
        self._snapshot_valid = False
