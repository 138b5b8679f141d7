"""Routing, dispatch, aux-loss-free balancing and the clamp site of the MoE layer."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.moe import MoE


def make_moe(E=8, K=2, D=16, H=24, rate=1e-3, seed=0):
    torch.manual_seed(seed)
    moe = MoE(D, E, K, H, bias_update_rate=rate)
    for w in (moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down):
        torch.nn.init.normal_(w, std=0.3)
    return moe


def test_topk_uses_biased_scores_but_weights_use_unbiased_scores():
    moe = make_moe()
    x = torch.randn(50, 16)
    moe.router.expert_bias.copy_(torch.tensor([0.3, -0.3, 0.2, 0.0, -0.2, 0.1, 0.05, -0.1]))
    out = moe.router(x)
    scores = torch.sigmoid(x @ moe.router.gate.weight.T)
    assert torch.allclose(out.scores_TE, scores) and torch.allclose(
        out.logits_TE, x @ moe.router.gate.weight.T
    )
    biased = scores + moe.router.expert_bias
    differs = 0
    for t in range(50):
        chosen = set(out.topk_idx_TK[t].tolist())
        assert chosen == set(torch.argsort(biased[t], descending=True)[:2].tolist())
        differs += chosen != set(torch.argsort(scores[t], descending=True)[:2].tolist())
        w = scores[t, out.topk_idx_TK[t]]
        assert torch.allclose(out.topk_weight_TK[t], w / w.sum())
    assert differs > 5  # the bias really changed selections, so the test discriminates


def test_dispatch_equals_per_token_reference():
    moe = make_moe()
    x_BTD = torch.randn(2, 7, 16)
    y = moe(x_BTD)
    x_TD = x_BTD.reshape(-1, 16)
    route = moe.router(x_TD)
    ex = moe.experts
    for t in range(x_TD.shape[0]):
        ref = moe.shared(x_TD[t])
        for k in range(2):
            e = route.topk_idx_TK[t, k]
            h = F.silu(ex.w_gate[e] @ x_TD[t]) * (ex.w_up[e] @ x_TD[t])
            ref = ref + route.topk_weight_TK[t, k] * (ex.w_down[e] @ h)
        assert torch.allclose(y.reshape(-1, 16)[t], ref, atol=1e-5)


def test_token_counts_accumulate_in_training_only():
    moe = make_moe()
    x = torch.randn(3, 5, 16)
    moe.eval()
    moe(x)
    assert moe.tokens_per_expert_E.sum() == 0
    moe.train()
    moe(x)
    moe(x)
    idx = moe.router(x.reshape(-1, 16)).topk_idx_TK
    assert torch.equal(moe.tokens_per_expert_E, 2 * torch.bincount(idx.flatten(), minlength=8))


def test_sign_rule_reduces_load_imbalance():
    moe = make_moe(E=8, K=2, rate=0.02)
    with torch.no_grad():  # skew: experts 0 and 1 strongly prefer the inputs' common direction
        moe.router.gate.weight[0] += 2.0
        moe.router.gate.weight[1] += 1.5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g) * 0.5 + 1.0

    def imbalance():
        idx = moe.router(x).topk_idx_TK
        load = torch.bincount(idx.flatten(), minlength=8).float()
        return (load.max() / load.mean()).item()

    before = imbalance()
    assert before > 3.0
    with torch.no_grad():
        for _ in range(150):
            moe(x.view(4, 64, 16))
            moe.update_expert_bias()
            assert moe.tokens_per_expert_E.sum() == 0  # reset every step
    after = imbalance()
    assert after <= before / 2  # 4.0 -> ~1.4 (the sign rule then oscillates around balance)
    assert moe.expert_bias[0] < 0 and moe.expert_bias[1] < 0  # overloaded experts pushed down


def test_sign_rule_step_is_exactly_rate_times_sign():
    moe = make_moe(rate=0.01)
    moe.tokens_per_expert_E.copy_(torch.tensor([5, 1, 3, 3, 0, 9, 3, 0]))  # mean 3
    moe.update_expert_bias()
    assert torch.allclose(moe.expert_bias, 0.01 * torch.tensor([-1.0, 1, 0, 0, 1, -1, 0, 1]))


def capture_experts(moe, x):
    seen = {}
    hooks = [
        moe.probe_experts.register_forward_hook(lambda m, a, o: seen.__setitem__("routed", a)),
        moe.probe_shared.register_forward_hook(lambda m, a, o: seen.__setitem__("shared", a)),
    ]
    y = moe(x)
    for h in hooks:
        h.remove()
    return y, seen


def test_clamp_bounds_swiglu_exactly_at_limit():
    moe = make_moe()
    x = torch.randn(4, 16, 16) * 3
    L = 0.5
    moe.set_clamp("routed", L)
    moe.set_clamp("shared", L)
    assert moe.clamp_limit("routed") == L and moe.clamp_limit("shared") == L
    _, seen = capture_experts(moe, x)
    h_NH, out_ND, expert_N = seen["routed"]
    x_TD = x.reshape(-1, 16)
    token_N = torch.argsort(moe.router(x_TD).topk_idx_TK.flatten(), stable=True) // 2
    ex = moe.experts
    gate = F.silu(torch.einsum("nhd,nd->nh", ex.w_gate[expert_N], x_TD[token_N]))
    up = torch.einsum("nhd,nd->nh", ex.w_up[expert_N], x_TD[token_N])
    both_over = (gate > L) & (up.abs() > L)
    assert both_over.sum() > 10 and (gate > L).sum() > both_over.sum()  # clamp really engaged
    assert torch.allclose(h_NH, gate.clamp(max=L) * up.clamp(-L, L), atol=1e-6)
    assert h_NH.abs().max() <= L * L + 1e-7  # |h| <= L^2 as L >= 0.2785 > -min(silu)
    # where both factors would exceed L, h sits exactly at the bound +-L*L
    assert torch.allclose(h_NH[both_over].abs(), torch.full_like(h_NH[both_over], L * L))
    # the gate factor alone never exceeds L: h / clamp(up) <= L
    ratio = h_NH / up.clamp(-L, L)
    assert ratio[up.abs() > 0.05].max() <= L * (1 + 1e-4)
    assert torch.allclose(out_ND, torch.einsum("ndh,nh->nd", ex.w_down[expert_N], h_NH), atol=1e-5)
    h_TH, _ = seen["shared"]
    assert h_TH.abs().max() <= L * L + 1e-7


def test_clamp_off_is_bit_identical_and_never_reallocates():
    moe = make_moe()
    x = torch.randn(3, 8, 16) * 3
    baseline = moe(x)
    ptr = moe.experts.limit.data_ptr()
    moe.set_clamp("routed", 0.1)
    clamped = moe(x)
    assert not torch.equal(clamped, baseline)
    moe.set_clamp("routed", None)
    assert moe.clamp_limit("routed") is None
    assert torch.equal(moe(x), baseline)
    assert moe.experts.limit.data_ptr() == ptr and moe.experts.limit.dtype == torch.float32


@pytest.mark.parametrize(
    "site,limit", [("routed", 0.0), ("routed", -1.0), ("shared", math.nan), ("dense", 1.0)]
)
def test_set_clamp_rejects_bad_input(site, limit):
    with pytest.raises(ValueError):
        make_moe().set_clamp(site, limit)


def test_sequence_balance_loss_matches_reference():
    moe = make_moe(E=8, K=2)
    moe.balance_loss_weight = 0.01
    x = torch.randn(2, 16, 16)
    moe(x)
    ref = 0.0
    with torch.no_grad():
        for b in range(2):  # DeepSeek-V3 eq. 17-20, one sequence at a time
            route = moe.router(x[b])
            f = torch.bincount(route.topk_idx_TK.flatten(), minlength=8).float() * 8 / (2 * 16)
            P = (route.scores_TE / route.scores_TE.sum(-1, keepdim=True)).mean(0)
            ref += 0.01 * (f * P).sum().item() / 2
    assert moe.aux_loss.detach().item() == pytest.approx(ref, rel=1e-5)
    moe.balance_loss_weight = 0.0
    moe(x)
    assert moe.aux_loss is None
