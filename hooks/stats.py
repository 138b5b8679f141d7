"""Forward-side capture: hooks that write device-side statistics into one flat buffer.

Every hook runs under no_grad, touches only precomputed views of `Capture.buf`, and never
synchronises with the host: no .item(), .cpu(), .tolist(), data-dependent shapes or collectives.
Sums go through `index_add_`, maxima through `scatter_reduce_(amax)` / `torch.maximum(out=)`,
so several forwards in one step (gradient accumulation) simply accumulate; `reset()` at
step_begin restores every slot to its initial value with one copy, `finalize()` at step_end turns
the running sums in the scratch part into means with a few vectorised ops, and `to_host()` is the
single device-to-host copy of the step (pinned + non_blocking + event on CUDA).

Definitions (per rank, per step):
  act_rms     sqrt(mean over the expert's rows and hidden units of h^2); 0 if it got no tokens
  act_maxabs  max |h| over the expert's rows (0 if none)
  out_norm    sqrt(mean over the expert's rows of ||out_row||^2): RMS of the row L2 norms
  confidence  mean over tokens of sum(top-k unbiased scores) / sum(all scores)
  logit_std   mean over tokens of the std (over experts) of the router logits
  z_loss      mean over tokens of logsumexp(logits)^2
  load_max_over_mean  max_e tokens_e / mean_e tokens_e
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from hooks.adapter import MoEAdapter
from hooks.layout import Layout
from hooks.layout import RegionKey as R

INF = math.inf


_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _in_backward() -> bool:
    """True while autograd runs a backward pass: activation checkpointing re-runs forwards
    there, and counting them again would double every sum."""
    return _graph_task_id() != -1


def _rowsq(x: torch.Tensor) -> torch.Tensor:
    """Per-row sum of squares in float32, without materialising a float32 copy first."""
    return torch.linalg.vector_norm(x, 2, dim=1, dtype=torch.float32).square()


def _fused(x: torch.Tensor) -> bool:
    """Whether x lives where one fused kernel beats a few cheaper ones: on an accelerator a
    small model's step is bound by kernel launches (README, "On CUDA"), on the CPU by the
    kernels' own work, where the fused forms below are the slower ones."""
    return x.device.type != "cpu"


def _maxabs(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max |x| (over `dim`) in float32; NaN if any value is NaN; the max of low-precision
    values is exact in them, then widened. Off the CPU (_fused) the inf-norm, one kernel. On the CPU that kernel is ~20x slower with a dtype, so there: over the whole tensor
    max(max x, -min x) from one aminmax pass (no |x| copy: 0.4-0.7x the time of abs().amax()
    on this VM's CPU), per row abs().amax, which is the faster there."""
    if dim is None and x.numel() == 0:  # a shape: no sync; the inf-norm has no identity
        return torch.zeros((), dtype=torch.float32, device=x.device)
    if _fused(x):
        return torch.linalg.vector_norm(x, INF, dim=dim).float()
    if dim is None:
        lo, hi = torch.aminmax(x)
        return torch.maximum(hi, lo.neg()).float()
    return x.abs().amax(dim).float()


def _row_std(x_TE: torch.Tensor) -> torch.Tensor:
    """Population std of each row: off the CPU (_fused) torch.std, one kernel; on the CPU
    two-pass, as torch.std over a short last dim is ~4x slower there."""
    if _fused(x_TE):
        return torch.std(x_TE, dim=1, correction=0)
    return (x_TE - x_TE.mean(1, keepdim=True)).square().mean(1).sqrt()


def _add_sumsq(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += sum of x^2, in float32: the norm, then one fused multiply-add."""
    n = torch.linalg.vector_norm(x, dtype=torch.float32)
    acc.addcmul_(n, n)


class HostVector:
    """A step's packed vector on its way to the host. `materialize()` (sender thread) waits
    for the copy's event, takes a numpy copy and returns the staging buffer to its pool."""

    def __init__(self, host: torch.Tensor, event, release: Callable[[torch.Tensor], None]):
        self._host: torch.Tensor | None = host  # None once released to the pool
        self._event, self._release = event, release
        self._array: np.ndarray | None = None

    def materialize(self) -> np.ndarray:
        if self._array is None:
            assert self._host is not None  # released only together with setting _array
            if self._event is not None:
                self._event.synchronize()
            self._array = self._host.numpy().copy()
            self._release(self._host)
            self._host = None
        return self._array


class Capture:
    """Owns the flat buffer and the forward hooks. Not thread-safe: training thread only."""

    def __init__(
        self,
        adapter: MoEAdapter,
        layout: Layout,
        device: torch.device,
        on_error: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.adapter, self.layout, self.device = adapter, layout, torch.device(device)
        self.on_error = on_error  # a hook must never raise into the forward pass
        self.buf = torch.zeros(layout.n_total, dtype=torch.float32, device=self.device)
        self._init = torch.from_numpy(layout.init_vector()).to(self.device)
        self.capturing = False  # True between step_begin and step_end
        self.paused = False  # Monitor.paused(): forwards in this window are not training
        self._train_forward = True  # set by each residual block's pre-hook (see below)
        self.tokens_seen = 0  # tokens through the first MoE router this step (host int)
        # element, row and token counts are shapes: counted here, written at finalize in one
        # copy each (router.n_tokens, resid.numel, the shared expert's numel and rows)
        self._counts: dict[str, list[float]] = {}
        self._handles: list = []
        self._pinned = self.device.type == "cuda"
        self._pool: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.host_copies = 0  # device-to-host copies issued (one per step)
        self.moe_sites = list(adapter.moe_sites())
        self._expert_off = np.cumsum([0] + [s.n_experts for s in self.moe_sites]).tolist()
        self._uniform_e = len({s.n_experts for s in self.moe_sites}) <= 1
        self._views: dict[str, torch.Tensor | None] = {}

    def view(self, key: str) -> torch.Tensor | None:
        """The buffer slice of a region, or None when its stat group is off; KeyError for a key
        that names no region (hooks.layout.RegionKey): a misspelling fails, it does not pass
        for a group that is off."""
        try:
            return self._views[key]
        except KeyError:
            region = self.layout.region(key)  # KeyError for a key that names no region
            view = None if region is None else self.buf[region.start : region.stop]
            self._views[key] = view  # the buffer is never reallocated: views stay valid
            return view

    def need(self, key: str) -> torch.Tensor:
        """`view` of a region laid out with one already found (its scratch sums, the rest of
        its group); KeyError when it is not laid out."""
        region = self.view(key)
        if region is None:
            raise KeyError(f"buffer region {key!r} is not laid out")
        return region

    def _token_counts(self) -> torch.Tensor | None:
        """Tokens per expert: moe.tokens, or router.load when only the router group is on."""
        tokens = self.view(R.MOE_TOKENS)
        return tokens if tokens is not None else self.view(R.ROUTER_LOAD)

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        """Register every hook the enabled groups need (activating the model's probes)."""
        v = self.view
        for block in self.adapter.residual_blocks():  # what kind of forward this is
            self._handles.append(block.register_forward_pre_hook(self._block_entered))
        tokens = self._token_counts()
        shared_i = 0
        for i, site in enumerate(self.moe_sites):
            a, b = self._expert_off[i], self._expert_off[i + 1]
            if tokens is not None:
                self._hook(site.router, self._router_hook(i, a, b, tokens))
            if v(R.MOE_ACT_RMS) is not None and site.expert_probe is not None:
                self._hook(site.expert_probe, self._expert_hook(a, b))
            if v(R.SHARED_ACT_RMS) is not None and site.shared_probe is not None:
                self._hook(site.shared_probe, self._shared_hook(shared_i))
                shared_i += 1
        max_logit = v(R.ATTN_MAX_LOGIT)
        if max_logit is not None:
            off = 0
            for attn in self.adapter.attention_sites():
                self._hook(
                    attn.probe,
                    self._max_hook(max_logit[off : off + attn.n_heads], lambda args, out: args[0]),
                )
                off += attn.n_heads
        head, logit_max = self.adapter.output_head(), v(R.OUTPUT_LOGIT_MAX)
        if logit_max is not None and head is not None:
            self._hook(head, self._max_hook(logit_max, lambda args, out: out))
        if v(R.RESID_RMS) is not None:
            for layer, block in enumerate(self.adapter.residual_blocks()):
                self._hook(block, self._resid_hook(layer))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _training_forward(self) -> bool:
        """A forward of the training step: inside step_begin..step_end, not paused, its blocks
        entered in training mode with grad enabled (probes may run under no_grad inside them),
        and not a checkpointed re-run inside backward. Evaluation (eval mode) and generation
        (no_grad) never count into the step."""
        return self.capturing and not self.paused and self._train_forward and not _in_backward()

    def _block_entered(self, block: nn.Module, args) -> None:
        self._train_forward = block.training and torch.is_grad_enabled()

    def _hook(self, module: nn.Module, fn: Callable) -> None:
        def hook(mod, args, out):
            if self._training_forward():
                try:
                    with torch.no_grad():
                        fn(args, out)
                except Exception as exc:
                    if self.on_error is None:
                        raise
                    self.on_error("hook", exc)

        self._handles.append(module.register_forward_hook(hook))

    # ------------------------------------------------------------------ hooks
    def _router_hook(self, i: int, a: int, b: int, tokens: torch.Tensor) -> Callable:
        tokens_E, gate = tokens[a:b], self.view(R.MOE_GATE_MASS)
        gate_E = None if gate is None else gate[a:b]
        one = torch.ones((), device=self.device)  # expanded, never allocated per call
        router = None  # this layer's slots of the router group, when it is on
        if self.view(R.ROUTER_CONFIDENCE) is not None:
            sums = self._stacked((R.ROUTER_CONF_SUM, R.ROUTER_STD_SUM, R.ROUTER_LSE2_SUM), i, i + 1)
            router = (sums, self._slice(R.ROUTER_LOGIT_MAX, i, i + 1))
            n_routed = self._counter(R.ROUTER_N_TOKENS)

        def fn(args, out) -> None:
            r = self.adapter.decode_router(out)
            T = r.topk_idx_TK.shape[0]
            if i == 0:  # the step's token count when the loop gives none (shapes: no sync)
                self.tokens_seen += T
            idx_N = r.topk_idx_TK.reshape(-1)
            tokens_E.index_add_(0, idx_N, one.expand(idx_N.shape))
            if gate_E is not None:
                gate_E.index_add_(0, idx_N, r.topk_weight_TK.reshape(-1).float())
            if router is not None:
                sums, logit_max = router
                logits_TE = r.logits_TE.float()
                lse_T = torch.logsumexp(logits_TE, dim=1)
                if r.scores_TE is None:  # softmax: the scores sum to 1, the chosen are exp(l - lse)
                    conf = (logits_TE.gather(1, r.topk_idx_TK) - lse_T[:, None]).exp().sum()
                else:
                    scores_TE = r.scores_TE.float()
                    chosen_T = scores_TE.gather(1, r.topk_idx_TK).sum(1)
                    conf = (chosen_T / scores_TE.sum(1)).sum()
                std = _row_std(logits_TE).sum()
                sums.add_(torch.stack([conf, std, lse_T.square().sum()]).unsqueeze(1))
                n_routed[i] += T
                torch.maximum(logit_max, logits_TE.amax(), out=logit_max)

        return fn

    def _stacked(self, keys: tuple[str, ...], a: int, b: int) -> torch.Tensor:
        """[len(keys), b - a]: slots a..b of consecutive equal-size regions (the layout lays a
        family's scratch sums out that way) as one strided view, so one op updates them all."""
        regions = [self.layout.region(k) for k in keys]
        first = regions[0]
        if first is None or any(
            r is None or r.start != first.start + k * first.size or r.size != first.size
            for k, r in enumerate(regions)
        ):
            raise KeyError(f"regions {keys} are not laid out side by side")
        return self.buf.as_strided((len(keys), b - a), (first.size, 1), first.start + a)

    def _expert_hook(self, a: int, b: int) -> Callable:
        sums = self._stacked((R.MOE_ACT_SUMSQ, R.MOE_ROWS, R.MOE_OUT_SUMSQ), a, b)
        maxabs_E = self._slice(R.MOE_ACT_MAXABS, a, b)
        one = torch.ones((), device=self.device)

        def fn(args, out) -> None:
            h_NH, out_ND, idx_N = args[:3]
            rows = torch.stack(
                [_rowsq(h_NH) / h_NH.shape[1], one.expand(idx_N.shape), _rowsq(out_ND)]
            )  # per row: mean square over hidden, 1, squared output norm
            sums.index_add_(1, idx_N, rows)
            maxabs_E.scatter_reduce_(0, idx_N, _maxabs(h_NH, 1), "amax", include_self=True)

        return fn

    def _counter(self, key: str) -> list[float]:
        """The host-side counts of a scratch region (one per slot), written at finalize."""
        return self._counts.setdefault(key, [0.0] * self.need(key).numel())

    def _shared_hook(self, j: int) -> Callable:
        sumsq, out_sq, maxabs = (
            self._slice(k, j, j + 1)
            for k in (R.SHARED_ACT_SUMSQ, R.SHARED_OUT_SUMSQ, R.SHARED_ACT_MAXABS)
        )
        numel, rows = self._counter(R.SHARED_ACT_NUMEL), self._counter(R.SHARED_ROWS)

        def fn(args, out) -> None:
            h_TH, out_TD = args[:2]
            _add_sumsq(sumsq, h_TH)
            numel[j] += h_TH.numel()
            _add_sumsq(out_sq, out_TD)
            rows[j] += out_TD.shape[0]
            torch.maximum(maxabs, _maxabs(h_TH), out=maxabs)

        return fn

    def _max_hook(self, dst: torch.Tensor, pick: Callable) -> Callable:
        def fn(args, out) -> None:
            x = pick(args, out)
            m = x.amax() if dst.numel() == 1 else x.reshape(dst.shape)
            torch.maximum(dst, m.float(), out=dst)

        return fn

    def _resid_hook(self, layer: int) -> Callable:
        sumsq, maxabs = (self._slice(k, layer, layer + 1) for k in (R.RESID_SUMSQ, R.RESID_MAXABS))
        numel = self._counter(R.RESID_NUMEL)

        def fn(args, out) -> None:
            x = out[0] if isinstance(out, (tuple, list)) else out
            _add_sumsq(sumsq, x)
            numel[layer] += x.numel()
            torch.maximum(maxabs, _maxabs(x), out=maxabs)

        return fn

    def _slice(self, key: str, a: int, b: int) -> torch.Tensor:
        return self.need(key)[a:b]

    # ------------------------------------------------------------------ step boundaries
    def reset(self) -> None:
        self.buf.copy_(self._init)
        self.tokens_seen = 0
        for counts in self._counts.values():  # in place: the hooks hold these lists
            counts[:] = [0.0] * len(counts)

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn this step's running sums into the metrics (device ops only)."""
        v, need = self.view, self.need
        for key, counts in self._counts.items():  # the host-side counts, one copy each
            need(key).copy_(torch.tensor(counts, dtype=torch.float32), non_blocking=True)
        act_rms = v(R.MOE_ACT_RMS)
        if act_rms is not None:
            rows = need(R.MOE_ROWS).clamp(min=1)  # no tokens -> 0, documented above
            torch.div(need(R.MOE_ACT_SUMSQ), rows, out=act_rms).sqrt_()
            torch.div(need(R.MOE_OUT_SUMSQ), rows, out=need(R.MOE_OUT_NORM)).sqrt_()
        shared_rms = v(R.SHARED_ACT_RMS)
        if shared_rms is not None:
            numel = need(R.SHARED_ACT_NUMEL).clamp(min=1)
            torch.div(need(R.SHARED_ACT_SUMSQ), numel, out=shared_rms).sqrt_()
            rows = need(R.SHARED_ROWS).clamp(min=1)
            torch.div(need(R.SHARED_OUT_SUMSQ), rows, out=need(R.SHARED_OUT_NORM)).sqrt_()
        confidence = v(R.ROUTER_CONFIDENCE)
        if confidence is not None:
            n = need(R.ROUTER_N_TOKENS)  # 0 tokens -> NaN: nothing was routed
            torch.div(need(R.ROUTER_CONF_SUM), n, out=confidence)
            torch.div(need(R.ROUTER_STD_SUM), n, out=need(R.ROUTER_LOGIT_STD))
            torch.div(need(R.ROUTER_LSE2_SUM), n, out=need(R.ROUTER_Z_LOSS))
            tokens = self._token_counts()
            assert tokens is not None  # the router group counts them when moe is off
            self._load_ratio(tokens, need(R.ROUTER_LOAD_MAX_OVER_MEAN))
            biased = [s.expert_bias for s in self.moe_sites if s.expert_bias is not None]
            if biased:  # laid out for exactly these layers, in this order (hooks.layout)
                norms = torch._foreach_norm(biased, INF, dtype=torch.float32)
                need(R.ROUTER_BIAS_ABSMAX).copy_(torch.stack(norms))
        resid_rms = v(R.RESID_RMS)
        if resid_rms is not None:
            torch.div(need(R.RESID_SUMSQ), need(R.RESID_NUMEL), out=resid_rms).sqrt_()

    def _load_ratio(self, tokens: torch.Tensor, dst: torch.Tensor) -> None:
        if self._uniform_e:
            t_LE = tokens.view(len(self.moe_sites), -1)
            torch.div(t_LE.amax(1), t_LE.mean(1), out=dst)
        else:
            for i in range(len(self.moe_sites)):
                t_E = tokens[self._expert_off[i] : self._expert_off[i + 1]]
                torch.div(t_E.amax(), t_E.mean(), out=dst[i])

    def write_loop_values(self, loss, mtp_losses) -> None:
        """Copy the step's loss tensors into their slots on the device (no sync; the float32
        value sent is bit-identical to float(loss) for float32/bf16/fp16 losses)."""
        for key, values in ((R.TRAIN_LOSS, [loss]), (R.TRAIN_MTP, list(mtp_losses or ()))):
            dst = self.view(key)
            if dst is None:
                continue
            for d, value in enumerate(values[: dst.numel()]):
                if value is None:
                    continue
                if isinstance(value, torch.Tensor):
                    dst[d].copy_(value.detach().reshape(()))
                else:
                    dst[d].fill_(float(value))

    def to_host(self, n: int) -> HostVector:
        """The step's single device-to-host copy of buf[:n] (the schemas' prefix)."""
        pool = self._pool[n]
        try:
            host = pool.pop()
        except IndexError:
            host = torch.empty(n, dtype=torch.float32, pin_memory=self._pinned)
        host.copy_(self.buf[:n], non_blocking=self._pinned)
        event = None
        if self._pinned:
            event = torch.cuda.Event()
            event.record()
        self.host_copies += 1

        def release(t: torch.Tensor) -> None:
            if len(pool) < 4:  # a few staging buffers; the rest go back to the allocator
                pool.append(t)

        return HostVector(host, event, release)
