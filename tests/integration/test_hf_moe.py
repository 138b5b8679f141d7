"""Every Hugging Face MoE family the HF adapter covers, end to end through a real collector
process into Parquet: attached with no adapter argument, a few training steps, and what is read
back from the store against an independent float64 recomputation from the MoE blocks' own
inputs and weights (recorded by this test's hooks, not through hooks/):

- per (layer, expert) token counts equal a top-k recount from the router's input and weight;
- act_rms / act_maxabs of every expert (and the shared expert) equal float64 SwiGLU stats;
- a clip set with `python -m collector clip set` binds both halves of the clamp: the experts'
  outputs equal the independently recomputed clamped experts, while both silu(gate) > L and
  |up| > L occur, and act_maxabs stays <= max(L, |min silu|) L;
- per-layer and per-expert gradient norms equal float64 norms of the blocks' own grads;
- no event on the clean run; `monitor.log` values round-trip exactly; forwards under
  `monitor.paused()`, in eval mode and under no_grad leave the training statistics unchanged.
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

from collector.process import start_collector, stop_collector  # noqa: E402
from hooks import Monitor  # noqa: E402
from store import open_store  # noqa: E402
from tests.gradnorms import assert_stored_grad_norms, grad_norms  # noqa: E402
from tests.integration.hf_models import FAMILIES, VOCAB, build, sigmoid_router  # noqa: E402

STEPS, CLIP_AFTER, B, T = 6, 2, 2, 16  # clip set after step 2: steps 3.. train clamped
EXTRA_AT = 1  # the step that also runs paused, eval and no_grad forwards
WAIT_S = 30.0
SILU_MIN = 0.2784645  # |min silu|: the clamped gate lies in [-0.2785, L], so |h| <= max(L, it) L


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf-moe")
    url = f"parquet:{tmp / 'store'}"
    proc, address = start_collector(
        url, "--insecure", "--flush-interval", "0.05", log_path=tmp / "c.log"
    )
    yield address, url
    stop_collector(proc)


@dataclass
class Forward:
    """One recorded training forward of one MoE block, float64."""

    router_x: torch.Tensor  # router input [T, D]
    router_w: torch.Tensor  # router weight [E, D]
    router_bias: torch.Tensor | None
    x: torch.Tensor  # experts input [T, D]
    idx: torch.Tensor  # top_k_index [T, K] as the model routed
    weights: torch.Tensor  # top_k_weights [T, K]
    out: torch.Tensor  # experts output [T, D]
    gate_up: torch.Tensor  # [E, 2I, D] at forward time
    down: torch.Tensor  # [E, D, I]
    shared: tuple | None = None  # (x, out, gate_proj, up_proj, down_proj)


@dataclass
class Recorded:
    forwards: dict[int, dict[int, list[Forward]]] = field(default_factory=dict)  # step, layer
    grad_norms: dict[int, dict[str, float]] = field(default_factory=dict)  # step, metric name
    on: bool = True
    step: int = -1


def record(model, rec: Recorded) -> list:
    """This test's own hooks on the MoE blocks (not hooks/): inputs, outputs, weights."""
    handles = []
    d = lambda t: t.detach().double().clone()
    for layer, block in enumerate(model.model.layers):
        mlp = block.mlp
        if not hasattr(mlp, "experts"):
            continue
        pending: dict = {}

        def on_gate(m, args, out, pending=pending):
            if rec.on:
                bias = getattr(m, "e_score_correction_bias", None)
                pending["router"] = (
                    d(args[0].reshape(-1, args[0].shape[-1])),
                    d(m.weight),
                    None if bias is None else d(bias),
                )

        def on_experts(m, args, out, layer=layer, pending=pending):
            if rec.on:
                rx, rw, rb = pending.pop("router")
                fwd = Forward(
                    rx, rw, rb, d(args[0]), args[1].clone(), d(args[2]), d(out),
                    d(m.gate_up_proj), d(m.down_proj),
                )  # fmt: skip
                rec.forwards.setdefault(rec.step, {}).setdefault(layer, []).append(fwd)
                pending["fwd"] = fwd

        handles.append(mlp.gate.register_forward_hook(on_gate))
        handles.append(mlp.experts.register_forward_hook(on_experts))
        shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
        if shared is not None:

            def on_shared(m, args, out, pending=pending):
                if rec.on:
                    w = (d(m.gate_proj.weight), d(m.up_proj.weight), d(m.down_proj.weight))
                    pending["shared"] = (d(args[0]).reshape(-1, args[0].shape[-1]), d(out), *w)

            handles.append(shared.register_forward_hook(on_shared))

            def attach_shared(m, args, out, pending=pending):  # after the block: both are in
                if rec.on and "fwd" in pending:
                    pending.pop("fwd").shared = pending.pop("shared")

            handles.append(mlp.register_forward_hook(attach_shared))
    return handles


# ---------------------------------------------------------------- independent float64 math


def recount(fwd: Forward, K: int, sigmoid: bool) -> torch.Tensor:
    logits = fwd.router_x @ fwd.router_w.T
    scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)
    if fwd.router_bias is not None:
        scores = scores + fwd.router_bias
    return torch.topk(scores, K, dim=-1).indices


def swiglu_h(x, w_gate, w_up, limit):
    act, up = F.silu(x @ w_gate.T), x @ w_up.T
    if limit is not None:
        act, up = act.clamp(max=limit), up.clamp(-limit, limit)
    return act, up, act * up


def expert_h(fwd: Forward, e: int, limit):
    tok = (fwd.idx == e).any(dim=1).nonzero().reshape(-1)
    I = fwd.down.shape[-1]
    gu = fwd.gate_up[e]
    return tok, *swiglu_h(fwd.x[tok], gu[:I], gu[I:], limit)


def experts_out(fwd: Forward, limit) -> torch.Tensor:
    out = torch.zeros_like(fwd.x)
    for e in range(fwd.gate_up.shape[0]):
        tok, _, _, h = expert_h(fwd, e, limit)
        w = (fwd.weights[tok] * (fwd.idx[tok] == e)).sum(1, keepdim=True)
        out[tok] += w * (h @ fwd.down[e].T)
    return out


def hf_expert_weights(block) -> tuple:
    """A decoder layer's batched routed weights (none for a dense layer)."""
    experts = getattr(block.mlp, "experts", None)
    return () if experts is None else (experts.gate_up_proj, experts.down_proj)


# ---------------------------------------------------------------- the run


@dataclass
class Run:
    family: str
    run: str
    url: str
    rec: Recorded
    limit: float
    clip_layer: int
    moe_layers: list[int]
    shared_layers: list[int]
    logged: dict[tuple[int, str], float]
    top_k: int
    stats: dict


def clip_cli(address: str, run: str, layer: int, site: str, limit: float) -> None:
    cmd = [sys.executable, "-m", "collector", "clip", "set", "--target", address, "--run", run]
    cmd += ["--layer", str(layer), "--site", site, "--limit", repr(limit)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, collector) -> Run:
    address, url = collector
    family = request.param
    model = build(family)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rec = Recorded()
    handles = record(model, rec)
    run = f"hf-{family}"
    mon = Monitor(model, opt, target=address, run=run)  # no adapter argument
    moe_layers = sorted({s.layer for s in mon.adapter.moe_sites()})
    shared_layers = [s.layer for s in mon.adapter.moe_sites() if s.shared_probe is not None]
    top_k = mon.adapter.moe_sites()[0].top_k
    clip_layer, limit = moe_layers[-1], 0.0
    logged: dict[tuple[int, str], float] = {}
    gen = torch.Generator().manual_seed(7)
    for step in range(STEPS):
        if step == CLIP_AFTER + 1:  # the clips of the previous boundary are staged: in force now
            staged = 1 + len(shared_layers)
            wait_for(lambda n=staged: mon.stats().get("clip_updates_staged", 0) >= n, "the clips")
        rec.step = step
        idx = torch.randint(0, VOCAB, (B, T), generator=gen)
        mon.step_begin(step)
        loss = model(input_ids=idx, labels=idx).loss
        loss.backward()
        if step == EXTRA_AT:  # none of these may count into the training step
            rec.on = False
            with mon.paused():
                model(input_ids=idx, labels=idx).loss.backward()  # paused: even with backward
            with torch.no_grad():
                model(input_ids=idx)  # training mode, no_grad (generation)
                model.eval()
                model(input_ids=idx)  # eval
                model.train()
            rec.on = True
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        rec.grad_norms[step] = grad_norms(model.model.layers, hf_expert_weights)
        mon.before_optimizer(step, torch.nn.utils.get_total_norm(grads))
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(np.float32(1.0 / (step + 3)))
        loss_x2 = 2 * loss.detach()  # a tensor: read on the sender thread, no sync here
        mon.log({"user/inv_step": value, "user/loss_x2": loss_x2}, step=step)
        logged[(step, "user/inv_step")] = value
        logged[(step, "user/loss_x2")] = float(np.float32(float(loss_x2)))
        mon.step_end(step, loss=loss.detach(), lr=0.5, tokens=idx.numel())
        if step == CLIP_AFTER:
            # a limit both halves cross on this layer's experts: below max silu(gate), max |up|
            fwds = rec.forwards[step][clip_layer]
            acts = [expert_h(f, e, None) for f in fwds for e in range(8)]
            act_max = max(float(a[1].max()) for a in acts if a[0].numel())
            up_max = max(float(a[2].abs().max()) for a in acts if a[0].numel())
            limit = float(np.float32(0.5 * min(act_max, up_max)))
            clip_cli(address, run, clip_layer, "routed", limit)
            for layer in shared_layers:
                clip_cli(address, run, layer, "shared", limit)
    stats = mon.stats()
    mon.close()
    for h in handles:
        h.remove()
    return Run(
        family, run, url, rec, limit, clip_layer, moe_layers, shared_layers, logged, top_k, stats
    )


def clamp_at(r: Run, step: int, layer: int, site: str = "routed") -> float | None:
    if step <= CLIP_AFTER:
        return None
    if site == "routed":
        return r.limit if layer == r.clip_layer else None
    return r.limit if layer in r.shared_layers else None


def test_attach_picked_the_hf_adapter_and_the_run_is_clean(trained):
    r = trained
    assert r.stats.get("errors", 0) == 0, r.stats
    assert r.stats["clip_version"] == 1 + len(r.shared_layers)
    with open_store(r.url) as st:
        assert st.steps(r.run)["step"].to_list() == list(range(STEPS))
        assert st.events(r.run).height == 0  # no false nonfinite (no bias_absmax NaN), nothing
        names = set(st.metrics(r.run)["name"].to_list())
    has_bias = r.family == "deepseek_v3"
    for layer in r.moe_layers:
        assert (f"moe/layer{layer:02d}/router/bias_absmax" in names) == has_bias
    assert not any(n.startswith("train/mtp_loss") for n in names)


def test_gradient_norms_equal_float64_norms_of_the_layers_grads(trained):
    assert_stored_grad_norms(trained.url, trained.run, trained.rec.grad_norms)


def test_token_counts_equal_a_topk_recount_at_every_step(trained):
    r = trained
    with open_store(r.url) as st:
        for step in range(STEPS):
            got = st.at_step(r.run, step, "moe/*/expert*/tokens")
            got = {(l, e): v for l, e, v in got.select("layer", "expert", "value").iter_rows()}
            for layer in r.moe_layers:
                fwds = r.rec.forwards[step][layer]
                assert len(fwds) == 1  # paused / eval / no_grad forwards were not recorded
                idx = recount(fwds[0], r.top_k, sigmoid_router(r.family))
                assert torch.equal(idx.sort(1).values, fwds[0].idx.sort(1).values)
                want = torch.bincount(idx.reshape(-1), minlength=8)
                assert [got[(layer, e)] for e in range(8)] == want.tolist(), (step, layer)
                assert sum(got[(layer, e)] for e in range(8)) == B * T * r.top_k


def test_act_stats_equal_float64_swiglu_of_the_experts_inputs(trained):
    r = trained
    with open_store(r.url) as st:
        for step in range(STEPS):
            got = st.at_step(r.run, step, "moe/*")
            got = dict(zip(got["name"].to_list(), got["value"].to_list()))
            for layer in r.moe_layers:
                fwd = r.rec.forwards[step][layer][0]
                for e in range(8):
                    tok, _, _, h = expert_h(fwd, e, clamp_at(r, step, layer))
                    rms = float(h.pow(2).mean().sqrt()) if tok.numel() else 0.0
                    mx = float(h.abs().max()) if tok.numel() else 0.0
                    key = f"moe/layer{layer:02d}/expert{e:03d}"
                    np.testing.assert_allclose(got[f"{key}/act_rms"], rms, rtol=1e-5, atol=1e-9)
                    np.testing.assert_allclose(got[f"{key}/act_maxabs"], mx, rtol=1e-5, atol=1e-9)
                if layer in r.shared_layers:
                    sx, _, wg, wu, _ = fwd.shared
                    _, _, h = swiglu_h(sx, wg, wu, clamp_at(r, step, layer, "shared"))
                    key = f"moe/layer{layer:02d}/shared"
                    np.testing.assert_allclose(
                        got[f"{key}/act_rms"], float(h.pow(2).mean().sqrt()), rtol=1e-5
                    )
                    np.testing.assert_allclose(
                        got[f"{key}/act_maxabs"], float(h.abs().max()), rtol=1e-5
                    )


def test_clip_set_over_the_cli_binds_both_halves_exactly(trained):
    r = trained
    L = r.limit
    assert L > 0
    for step in range(CLIP_AFTER + 1, STEPS):
        fwd = r.rec.forwards[step][r.clip_layer][0]
        acts = [expert_h(fwd, e, None) for e in range(8)]
        assert any(bool((a[1] > L).any()) for a in acts)  # the gate half binds somewhere
        assert any(bool((a[2].abs() > L).any()) for a in acts)  # and the up half
        want = experts_out(fwd, L)  # independent clamped experts == the model's own output
        torch.testing.assert_close(fwd.out, want, rtol=1e-4, atol=1e-7)
        assert not torch.allclose(want, experts_out(fwd, None), rtol=1e-4, atol=1e-7)
        for layer in r.shared_layers:
            sx, sout, wg, wu, wd = r.rec.forwards[step][layer][0].shared
            _, _, h = swiglu_h(sx, wg, wu, L)
            torch.testing.assert_close(
                sout.reshape(-1, sout.shape[-1]), h @ wd.T, rtol=1e-4, atol=1e-7
            )
    with open_store(r.url) as st:
        for e in range(8):
            mx = st.series(r.run, f"moe/layer{r.clip_layer:02d}/expert{e:03d}/act_maxabs")
            after = mx.filter(mx["step"] > CLIP_AFTER)["value"].to_numpy()
            assert after.size == STEPS - CLIP_AFTER - 1 and after.max() <= max(L, SILU_MIN) * L * (
                1 + 1e-5
            )
        clips = st.clips(r.run)
    assert clips.height == 1 + len(r.shared_layers)


def test_user_scalars_round_trip_and_side_forwards_change_nothing(trained):
    r = trained
    with open_store(r.url) as st:
        for name in ("user/inv_step", "user/loss_x2"):
            s = st.series(r.run, name)
            assert s["step"].to_list() == list(range(STEPS))
            want = np.asarray([r.logged[(k, name)] for k in range(STEPS)], dtype=np.float32)
            np.testing.assert_array_equal(s["value"].to_numpy(), want)
        # the step with paused, eval and no_grad forwards counted only its training forward
        tokens = st.at_step(r.run, EXTRA_AT, "moe/*/expert*/tokens")
        assert tokens["value"].sum() == B * T * r.top_k * len(r.moe_layers)
