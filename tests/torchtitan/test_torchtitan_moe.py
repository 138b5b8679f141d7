"""torchtitan's MoE end to end (runs in the torchtitan venv: `make test-titan`): tiny Qwen3-MoE
and DeepSeek-style decoders built on CPU from torchtitan's own modules, attached with no
adapter argument, trained a few steps through a real collector process into Parquet, and read
back against an independent recomputation from the MoE modules' own inputs and weights
(recorded by this test's hooks):

- per (layer, expert) token counts equal a float64 top-k recount from the router's input,
  gate weight and expert_bias;
- act_rms / act_maxabs of every routed expert (and the shared expert) equal the SwiGLU
  recomputed from the GroupedExperts input rows. GroupedExperts computes in bfloat16, so the
  reference rounds to bfloat16 where torchtitan's forward does (the grouped GEMMs' outputs, the
  silu, the product) and computes everything else in float64; tolerances are a few bf16 ulps;
- a clip set with `python -m collector clip set` binds both halves of the clamp on the routed
  and the shared experts: outputs equal the recomputed clamped experts, both halves cross L;
- per-layer and per-expert gradient norms equal float64 norms of the blocks' own grads;
- no event on the clean run; `monitor.log` round-trips exactly; paused, eval and no_grad
  forwards leave the training statistics unchanged.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.titan_models import EXPERTS, TOP_K, VOCAB, deepseek_moe, loss_of, qwen3_moe  # noqa: E402
from collector.process import start_collector, stop_collector  # noqa: E402
from hooks import Monitor  # noqa: E402
from store import open_store  # noqa: E402
from tests.gradnorms import assert_stored_grad_norms, grad_norms  # noqa: E402

STEPS, CLIP_AFTER, EXTRA_AT, B, T = 6, 2, 1, 2, 16
WAIT_S = 30.0
SILU_MIN = 0.2784645  # |min silu|
BF = torch.bfloat16
VARIANTS = {"qwen3": qwen3_moe, "deepseek": deepseek_moe}


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("titan")
    url = f"parquet:{tmp / 'store'}"
    proc, address = start_collector(
        url, "--insecure", "--flush-interval", "0.05", log_path=tmp / "c.log"
    )
    yield address, url
    stop_collector(proc)


@dataclass
class Forward:
    x: torch.Tensor  # MoE input [T, D] float64
    gate_w: torch.Tensor  # router gate weight [E, D]
    bias: torch.Tensor | None  # expert_bias_E
    rows: torch.Tensor  # GroupedExperts input [R, D] (fp32 as the model holds it)
    counts: torch.Tensor  # tokens per expert [E]
    out: torch.Tensor  # GroupedExperts output [R, D]
    w1: torch.Tensor
    w2: torch.Tensor
    w3: torch.Tensor
    shared: tuple | None = None  # (x, out, w1, w2, w3)


@dataclass
class Recorded:
    forwards: dict[int, dict[int, list[Forward]]] = field(default_factory=dict)
    grad_norms: dict[int, dict[str, float]] = field(default_factory=dict)  # step, metric name
    on: bool = True
    step: int = -1


def titan_expert_weights(block) -> tuple:
    """A block's batched routed weights."""
    experts = block.moe.routed_experts.inner_experts
    return (experts.w1_EFD, experts.w2_EDF, experts.w3_EFD)


def record(model, rec: Recorded) -> list:
    handles = []
    c = lambda t: t.detach().clone()
    for layer, block in enumerate(model.layers.values()):
        moe = block.moe
        pending: dict = {}

        def on_moe_in(m, args, pending=pending):
            if rec.on:
                bias = m.expert_bias_E
                pending["x"] = (
                    c(args[0]).reshape(-1, args[0].shape[-1]).double(),
                    c(m.router.gate.weight).double(),
                    None if bias is None else c(bias).double(),
                )

        def on_experts(m, args, out, layer=layer, pending=pending):
            if rec.on:
                x, gw, bias = pending.pop("x")
                fwd = Forward(
                    x, gw, bias, c(args[0]), c(args[1]), c(out), c(m.w1_EFD), c(m.w2_EDF), c(m.w3_EFD)
                )  # fmt: skip
                rec.forwards.setdefault(rec.step, {}).setdefault(layer, []).append(fwd)
                pending["fwd"] = fwd

        handles.append(moe.register_forward_pre_hook(on_moe_in))
        handles.append(moe.routed_experts.inner_experts.register_forward_hook(on_experts))
        if moe.shared_experts is not None:

            def on_shared(m, args, out, pending=pending):
                if rec.on:
                    ws = (c(m.w1.weight), c(m.w2.weight), c(m.w3.weight))
                    x, y = c(args[0]), c(out)
                    pending["fwd"].shared = (
                        x.reshape(-1, x.shape[-1]),
                        y.reshape(-1, y.shape[-1]),
                        *ws,
                    )

            handles.append(moe.shared_experts.register_forward_hook(on_shared))
    return handles


# ---------------------------------------------------------------- independent recomputation


def bf(t: torch.Tensor) -> torch.Tensor:
    """float64 of the bfloat16 rounding of t: where torchtitan's forward rounds."""
    return t.to(BF).double()


def grouped_swiglu(fwd: Forward, e: int, limit):
    """Expert e's rows of the GroupedExperts input and its SwiGLU pieces, as torchtitan's
    forward computes them (bf16 GEMM outputs, bf16 silu and product)."""
    ends = torch.cumsum(fwd.counts.long(), 0)
    a, b = int(ends[e] - fwd.counts[e]), int(ends[e])
    x = bf(fwd.rows[a:b])
    gate = bf(x @ bf(fwd.w1[e]).T)
    up = bf(x @ bf(fwd.w3[e]).T)
    act = bf(F.silu(gate))
    if limit is not None:
        act, up = act.clamp(max=limit), up.clamp(-limit, limit)
    return (a, b), act, up, bf(act * up)


def grouped_out(fwd: Forward, limit) -> torch.Tensor:
    out = torch.zeros(fwd.rows.shape, dtype=torch.float64)
    for e in range(EXPERTS):
        (a, b), _, _, h = grouped_swiglu(fwd, e, limit)
        out[a:b] = bf(h @ bf(fwd.w2[e]).T)
    return out


def shared_swiglu(shared: tuple, limit):
    x, _, w1, _, w3 = (t.double() for t in shared)
    act, up = F.silu(x @ w1.T), x @ w3.T
    if limit is not None:
        act, up = act.clamp(max=limit), up.clamp(-limit, limit)
    return act, up, act * up


def recount(fwd: Forward, sigmoid: bool) -> torch.Tensor:
    logits = fwd.x @ fwd.gate_w.T
    scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1)
    if fwd.bias is not None:
        scores = scores + fwd.bias
    return torch.topk(scores, TOP_K, dim=-1).indices


# ---------------------------------------------------------------- the run


@dataclass
class Run:
    variant: str
    run: str
    url: str
    rec: Recorded
    limit: float
    clip_layer: int
    moe_layers: list[int]
    shared_layers: list[int]
    logged: dict
    stats: dict


def clip_cli(address: str, run: str, layer: int, site: str, limit: float) -> None:
    cmd = [sys.executable, "-m", "collector", "clip", "set", "--target", address, "--run", run]
    cmd += ["--layer", str(layer), "--site", site, "--limit", repr(limit)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def trained(request, collector) -> Run:
    address, url = collector
    variant = request.param
    model = VARIANTS[variant]()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rec = Recorded()
    handles = record(model, rec)
    run = f"titan-{variant}"
    mon = Monitor(model, opt, target=address, run=run)  # no adapter argument
    assert type(mon.adapter).__name__ == "TorchtitanMoEAdapter"
    sites = mon.adapter.moe_sites()
    moe_layers = [s.layer for s in sites]
    shared_layers = [s.layer for s in sites if s.shared_probe is not None]
    clip_layer, limit, logged = moe_layers[-1], 0.0, {}
    gen = torch.Generator().manual_seed(7)
    for step in range(STEPS):
        if step == CLIP_AFTER + 1:
            deadline = time.monotonic() + WAIT_S
            while mon.stats().get("clip_updates_staged", 0) < 1 + len(shared_layers):
                assert time.monotonic() < deadline, "the clip updates never arrived"
                time.sleep(0.01)
        rec.step = step
        idx = torch.randint(0, VOCAB, (B, T), generator=gen)
        mon.step_begin(step)
        loss = loss_of(model, idx)
        loss.backward()
        if step == EXTRA_AT:
            rec.on = False
            with mon.paused():
                loss_of(model, idx).backward()
            with torch.no_grad():
                model(idx)
                model.eval()
                model(idx)
                model.train()
            rec.on = True
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        rec.grad_norms[step] = grad_norms(model.layers.values(), titan_expert_weights)
        mon.before_optimizer(step, torch.nn.utils.get_total_norm(grads))
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(np.float32(1.0 / (step + 3)))
        mon.log({"user/inv_step": value}, step=step, reduce="max")
        logged[step] = value
        mon.step_end(step, loss=loss.detach(), lr=0.5, tokens=idx.numel())
        if step == CLIP_AFTER:
            fwd = rec.forwards[step][clip_layer][0]
            pieces = [grouped_swiglu(fwd, e, None) for e in range(EXPERTS)]
            act_max = max(float(p[1].max()) for p in pieces if p[1].numel())
            up_max = max(float(p[2].abs().max()) for p in pieces if p[2].numel())
            limit = float(np.float32(0.5 * min(act_max, up_max)))
            clip_cli(address, run, clip_layer, "routed", limit)
            for layer in shared_layers:
                clip_cli(address, run, layer, "shared", limit)
    stats = mon.stats()
    mon.close()
    for h in handles:
        h.remove()
    return Run(variant, run, url, rec, limit, clip_layer, moe_layers, shared_layers, logged, stats)


def limit_at(r: Run, step: int, layer: int, site: str = "routed") -> float | None:
    if step <= CLIP_AFTER:
        return None
    if site == "routed":
        return r.limit if layer == r.clip_layer else None
    return r.limit if layer in r.shared_layers else None


def test_attached_without_an_adapter_argument_and_the_run_is_clean(trained):
    r = trained
    assert r.stats.get("errors", 0) == 0, r.stats
    assert r.stats["clip_version"] == 1 + len(r.shared_layers)
    with open_store(r.url) as st:
        assert st.steps(r.run)["step"].to_list() == list(range(STEPS))
        assert st.events(r.run).height == 0
        names = set(st.metrics(r.run)["name"].to_list())
    for layer in r.moe_layers:  # qwen3 variant: no selection bias, so no bias_absmax at all
        assert (f"moe/layer{layer:02d}/router/bias_absmax" in names) == (r.variant == "deepseek")
        assert f"attn/layer{layer:02d}/head00/max_logit" in names


def test_gradient_norms_equal_float64_norms_of_the_layers_grads(trained):
    assert_stored_grad_norms(trained.url, trained.run, trained.rec.grad_norms)


def test_token_counts_equal_a_topk_recount(trained):
    r = trained
    with open_store(r.url) as st:
        for step in range(STEPS):
            got = st.at_step(r.run, step, "moe/*/expert*/tokens")
            got = {(l, e): v for l, e, v in got.select("layer", "expert", "value").iter_rows()}
            for layer in r.moe_layers:
                fwds = r.rec.forwards[step][layer]
                assert len(fwds) == 1
                idx = recount(fwds[0], r.variant == "deepseek")
                want = torch.bincount(idx.reshape(-1), minlength=EXPERTS)
                assert torch.equal(want, fwds[0].counts.long())  # the model routed the same
                assert [got[(layer, e)] for e in range(EXPERTS)] == want.tolist(), (step, layer)


def test_act_stats_equal_the_recomputed_swiglu(trained):
    r = trained
    with open_store(r.url) as st:
        for step in range(STEPS):
            got = st.at_step(r.run, step, "moe/*")
            got = dict(zip(got["name"].to_list(), got["value"].to_list()))
            for layer in r.moe_layers:
                fwd = r.rec.forwards[step][layer][0]
                for e in range(EXPERTS):
                    _, _, _, h = grouped_swiglu(fwd, e, limit_at(r, step, layer))
                    key = f"moe/layer{layer:02d}/expert{e:03d}"
                    rms = float(h.pow(2).mean().sqrt()) if h.numel() else 0.0
                    mx = float(h.abs().max()) if h.numel() else 0.0
                    np.testing.assert_allclose(got[f"{key}/act_rms"], rms, rtol=2e-3)
                    np.testing.assert_allclose(got[f"{key}/act_maxabs"], mx, rtol=8e-3)
                if layer in r.shared_layers:
                    _, _, h = shared_swiglu(fwd.shared, limit_at(r, step, layer, "shared"))
                    key = f"moe/layer{layer:02d}/shared"
                    want_rms, want_max = float(h.pow(2).mean().sqrt()), float(h.abs().max())
                    np.testing.assert_allclose(got[f"{key}/act_rms"], want_rms, rtol=1e-5)
                    np.testing.assert_allclose(got[f"{key}/act_maxabs"], want_max, rtol=1e-5)


def test_clip_set_over_the_cli_binds_both_halves(trained):
    r = trained
    L = r.limit
    for step in range(CLIP_AFTER + 1, STEPS):
        fwd = r.rec.forwards[step][r.clip_layer][0]
        pieces = [grouped_swiglu(fwd, e, None) for e in range(EXPERTS)]
        assert any(bool((p[1] > L).any()) for p in pieces)  # gate half binds somewhere
        assert any(bool((p[2].abs() > L).any()) for p in pieces)  # and the up half
        want = grouped_out(fwd, L)
        torch.testing.assert_close(fwd.out.double(), want, rtol=2e-2, atol=1e-5)
        assert (fwd.out.double() - grouped_out(fwd, None)).abs().max() > 10 * (
            (fwd.out.double() - want).abs().max()
        )
        for layer in r.shared_layers:
            shared = r.rec.forwards[step][layer][0].shared
            act, up, h = shared_swiglu(shared, L)
            assert bool((F.silu(shared[0].double() @ shared[2].double().T) > L).any())
            want = h @ shared[3].double().T
            torch.testing.assert_close(shared[1].double(), want, rtol=1e-4, atol=1e-7)
    with open_store(r.url) as st:
        for e in range(EXPERTS):
            s = st.series(r.run, f"moe/layer{r.clip_layer:02d}/expert{e:03d}/act_maxabs")
            after = s.filter(s["step"] > CLIP_AFTER)["value"].to_numpy()
            assert after.max() <= max(L, SILU_MIN) * L * (1 + 1e-2)  # bf16 product rounding


def test_user_scalars_round_trip_and_side_forwards_change_nothing(trained):
    r = trained
    with open_store(r.url) as st:
        s = st.series(r.run, "user/inv_step")
        assert s["step"].to_list() == list(range(STEPS))
        want = np.asarray([r.logged[k] for k in range(STEPS)], dtype=np.float32)
        np.testing.assert_array_equal(s["value"].to_numpy(), want)
        tokens = st.at_step(r.run, EXTRA_AT, "moe/*/expert*/tokens")
        assert tokens["value"].sum() == B * T * TOP_K * len(r.moe_layers)
