"""Independent recomputation of the step statistics from raw tensors, for the stats tests.

A `Recorder` registers its own hooks on the model's probe surface (not through hooks/), keeps
every tensor of one step, and `expected()` recomputes each metric with plain float64 torch in
the most direct way, so a wrong reduction, offset or accumulation in hooks/ shows up as a
mismatch.
"""

from __future__ import annotations

import math

import torch


class Recorder:
    def __init__(self, model) -> None:
        self.model = model
        self.moe = model.moe_layers()
        self.handles = []
        self.router: dict[int, list] = {l: [] for l, _ in self.moe}
        self.experts: dict[int, list] = {l: [] for l, _ in self.moe}
        self.shared: dict[int, list] = {l: [] for l, _ in self.moe}
        self.attn: dict[int, list] = {i: [] for i in range(len(model.layers))}
        self.resid: dict[int, list] = {i: [] for i in range(len(model.layers))}
        self.head: list = []
        self.grads: dict[str, torch.Tensor] = {}
        keep = lambda store: (
            lambda m, a, o: store.append(tuple(t.detach().clone().double() for t in a))
        )
        for l, moe in self.moe:
            self.handles.append(
                moe.router.register_forward_hook(
                    lambda m, a, o, l=l: self.router[l].append(tuple(t.detach().clone() for t in o))
                )
            )
            self.handles.append(
                moe.probe_experts.register_forward_hook(
                    lambda m, a, o, l=l: self.experts[l].append(
                        (a[0].detach().double(), a[1].detach().double(), a[2].clone())
                    )
                )
            )
            if getattr(moe, "probe_shared", None) is not None:
                self.handles.append(moe.probe_shared.register_forward_hook(keep(self.shared[l])))
        for i, block in enumerate(model.layers):
            self.handles.append(block.attn.probe_logits.register_forward_hook(keep(self.attn[i])))
            self.handles.append(
                block.register_forward_hook(
                    lambda m, a, o, i=i: self.resid[i].append(o.detach().double())
                )
            )
        self.handles.append(
            model.lm_head.register_forward_hook(
                lambda m, a, o: self.head.append(o.detach().double())
            )
        )

    def clear(self) -> None:
        for store in (self.router, self.experts, self.shared, self.attn, self.resid):
            for v in store.values():
                v.clear()
        self.head.clear()
        self.grads.clear()

    def snapshot_grads(self) -> None:
        self.grads = {
            n: p.grad.detach().clone().double()
            for n, p in self.model.named_parameters()
            if p.grad is not None
        }

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    # ------------------------------------------------------------------ expectations
    def expected(self) -> dict[str, float]:
        """metric name -> value, for every metric the recorder can recompute."""
        out: dict[str, float] = {}
        L = len(self.model.layers)
        lw, ew, hw = 2, 3, 2
        for l, moe in self.moe:
            E, p = moe.n_experts, f"moe/layer{l:0{lw}d}"
            idx = torch.cat([r[0].reshape(-1) for r in self.router[l]])
            w = torch.cat([r[1].reshape(-1) for r in self.router[l]]).double()
            scores = torch.cat([r[2] for r in self.router[l]]).double()
            logits = torch.cat([r[3] for r in self.router[l]]).double()
            topk = torch.cat([r[0] for r in self.router[l]])
            h = torch.cat([e[0] for e in self.experts[l]])
            o = torch.cat([e[1] for e in self.experts[l]])
            eidx = torch.cat([e[2] for e in self.experts[l]])
            tokens = []
            for e in range(E):
                q = f"{p}/expert{e:0{ew}d}"
                tokens.append(float((idx == e).sum()))
                out[f"{q}/tokens"] = tokens[-1]
                out[f"{q}/gate_mass"] = float(w[idx == e].sum())
                rows_h, rows_o = h[eidx == e], o[eidx == e]
                if len(rows_h):
                    out[f"{q}/act_rms"] = math.sqrt(float(rows_h.pow(2).mean()))
                    out[f"{q}/act_maxabs"] = float(rows_h.abs().max())
                    out[f"{q}/out_norm"] = math.sqrt(float(rows_o.norm(dim=1).pow(2).mean()))
                else:
                    out[f"{q}/act_rms"] = out[f"{q}/act_maxabs"] = out[f"{q}/out_norm"] = 0.0
            if self.shared[l]:
                hs = torch.cat([s[0] for s in self.shared[l]])
                os_ = torch.cat([s[1] for s in self.shared[l]])
                out[f"{p}/shared/act_rms"] = math.sqrt(float(hs.pow(2).mean()))
                out[f"{p}/shared/act_maxabs"] = float(hs.abs().max())
                out[f"{p}/shared/out_norm"] = math.sqrt(float(os_.norm(dim=1).pow(2).mean()))
            r = f"{p}/router"
            out[f"{r}/confidence"] = float((scores.gather(1, topk).sum(1) / scores.sum(1)).mean())
            out[f"{r}/logit_max"] = float(logits.max())
            out[f"{r}/logit_std"] = float(logits.std(dim=1, unbiased=False).mean())
            out[f"{r}/z_loss"] = float(torch.logsumexp(logits, 1).pow(2).mean())
            out[f"{r}/load_max_over_mean"] = max(tokens) / (sum(tokens) / E)
            out[f"{r}/bias_absmax"] = float(moe.expert_bias.abs().max())
        for i in range(L):
            heads = torch.stack([a[0] for a in self.attn[i]]).max(0).values
            for hd, v in enumerate(heads.tolist()):
                out[f"attn/layer{i:0{lw}d}/head{hd:0{hw}d}/max_logit"] = v
            x = torch.cat([t.reshape(-1) for t in self.resid[i]])
            out[f"resid/layer{i:0{lw}d}/rms"] = math.sqrt(float(x.pow(2).mean()))
            out[f"resid/layer{i:0{lw}d}/maxabs"] = float(x.abs().max())
        out["model/output_logit_max"] = max(float(t.max()) for t in self.head)
        if self.grads:
            for i in range(L):
                g = [v for n, v in self.grads.items() if n.startswith(f"layers.{i}.")]
                flat = torch.cat([t.reshape(-1) for t in g])
                out[f"grad/layer{i:0{lw}d}/norm"] = float(flat.norm())
            for l, moe in self.moe:
                pre = f"layers.{l}.ffn.experts."
                for e in range(moe.n_experts):
                    g = torch.cat(
                        [self.grads[pre + k][e].reshape(-1) for k in ("w_gate", "w_up", "w_down")]
                    )
                    out[f"grad/layer{l:0{lw}d}/expert{e:0{ew}d}/norm"] = float(torch.linalg.norm(g))
        return out
