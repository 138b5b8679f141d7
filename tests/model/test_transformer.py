"""The full model: MTP targets, the probe contract the hooks build against, determinism."""

import pytest
import torch
import torch.nn.functional as F

from model.moe import MoE, RouterOutput
from model.probe import Probe
from model.transformer import MoETransformer


def test_layout_and_heads(tiny_model, tiny_cfg):
    assert [b.kind for b in tiny_model.layers] == ["full", "swa", "swa", "swa", "full"]
    assert [b.attn.n_heads for b in tiny_model.layers] == [4, 6, 6, 6, 4]
    assert [i for i, _ in tiny_model.moe_layers()] == [1, 2, 3, 4]  # n_dense_layers = 1
    assert all(isinstance(m, MoE) for _, m in tiny_model.moe_layers())


def test_mtp_losses_use_the_right_shifted_targets(tiny_cfg, tiny_batch):
    cfg = tiny_cfg.replace(mtp_depth=3, mtp_loss_weight=0.5)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    idx, targets = tiny_batch
    trunk = {}
    model.layers[-1].register_forward_hook(lambda m, a, out: trunk.setdefault("h", out))
    out = model(idx, targets)

    # Independent formulation over the whole token stream seq[0..T]: position i of depth d
    # reads token seq[i + d] and must predict seq[i + d + 1].
    seq = torch.cat([idx, targets[:, -1:]], dim=1)
    T = idx.shape[1]
    W = model.lm_head.weight
    with torch.no_grad():
        main = F.cross_entropy(
            model.lm_head(model.norm(trunk["h"])).flatten(0, 1), seq[:, 1 : T + 1].flatten()
        )
        h = trunk["h"]
        expected = []
        for d, head in enumerate(model.mtp, start=1):
            h = head(h[:, : T - d], model.embed(seq[:, d:T]))
            logits = head.norm_out(h) @ W.T
            expected.append(F.cross_entropy(logits.flatten(0, 1), seq[:, d + 1 : T + 1].flatten()))
    assert len(out.mtp_losses) == 3
    for got, want in zip(out.mtp_losses, expected):
        assert torch.allclose(got, want, rtol=1e-5)
    assert torch.allclose(out.main_loss, main, rtol=1e-5)
    total = main + 0.5 * torch.stack(expected).mean() + out.aux_loss
    assert torch.allclose(out.loss, total, rtol=1e-5)


def test_no_targets_gives_logits_only(tiny_model, tiny_batch):
    out = tiny_model(tiny_batch[0])
    assert out.loss is None and out.mtp_losses == [] and out.logits.shape == (2, 64, 256)


def test_bad_input_is_rejected(tiny_model, tiny_batch):
    idx, targets = tiny_batch
    with pytest.raises(ValueError, match="long"):
        tiny_model(idx.float())
    with pytest.raises(ValueError, match="shape"):
        tiny_model(idx, targets[:, :10])
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model(torch.zeros(1, 65, dtype=torch.long))


def test_same_seed_same_model_same_output(tiny_cfg, tiny_batch):
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(MoETransformer(tiny_cfg)(*tiny_batch).loss)
    assert torch.equal(outs[0], outs[1])


def test_probe_contract_shapes(tiny_model, tiny_cfg, tiny_batch):
    idx, targets = tiny_batch
    B, T = idx.shape
    D, E, K, H, V = (
        tiny_cfg.d_model,
        tiny_cfg.n_experts,
        tiny_cfg.top_k,
        tiny_cfg.expert_hidden,
        tiny_cfg.vocab_size,
    )
    seen: dict[str, list] = {}

    def record(key):
        return lambda mod, args, out: seen.setdefault(key, []).append((args, out))

    model = tiny_model
    for i, block in enumerate(model.layers):
        assert isinstance(block.attn.probe_logits, Probe) and not block.attn.probe_logits.active
        block.register_forward_hook(record(f"block{i}"))
        block.attn.probe_logits.register_forward_hook(record(f"attn{i}"))
    for i, moe in model.moe_layers():
        assert not moe.probe_experts.active
        moe.router.register_forward_hook(record(f"router{i}"))
        moe.probe_experts.register_forward_hook(record(f"experts{i}"))
        moe.probe_shared.register_forward_hook(record(f"shared{i}"))
        moe.register_forward_hook(record(f"moe{i}"))
    model.lm_head.register_forward_hook(record("lm_head"))
    out = model(idx, targets)

    assert len(seen["lm_head"]) == 1 and torch.equal(seen["lm_head"][0][1], out.logits)
    assert out.logits.shape == (B, T, V)
    for i, block in enumerate(model.layers):
        assert seen[f"block{i}"][0][1].shape == (B, T, D)
        (max_logit,), _ = seen[f"attn{i}"][0]
        assert max_logit.shape == (block.attn.n_heads,) and torch.isfinite(max_logit).all()
    for i, moe in model.moe_layers():
        assert (moe.n_experts, moe.top_k) == (E, K) and moe.expert_bias.shape == (E,)
        assert moe.experts.w_gate.shape == (E, H, D) and moe.experts.w_up.shape == (E, H, D)
        assert moe.experts.w_down.shape == (E, D, H)
        _, route = seen[f"router{i}"][0]
        assert isinstance(route, RouterOutput)
        assert route.topk_idx_TK.shape == (B * T, K) and route.topk_idx_TK.dtype == torch.long
        assert route.topk_weight_TK.shape == (B * T, K)
        assert torch.allclose(route.topk_weight_TK.sum(-1), torch.ones(B * T))
        assert route.scores_TE.shape == route.logits_TE.shape == (B * T, E)
        (h_NH, out_ND, expert_N), _ = seen[f"experts{i}"][0]
        assert h_NH.shape == (B * T * K, H) and out_ND.shape == (B * T * K, D)
        assert expert_N.shape == (B * T * K,) and expert_N.dtype == torch.long
        assert torch.equal(
            torch.bincount(expert_N, minlength=E),
            torch.bincount(route.topk_idx_TK.flatten(), minlength=E),
        )
        (h_TH, shared_TD), _ = seen[f"shared{i}"][0]
        assert h_TH.shape == (B * T, H) and shared_TD.shape == (B * T, D)
        # The probes see exactly what the layer sums: gate-weighted expert rows + shared output.
        (x_in,), y = seen[f"moe{i}"][0]
        order = torch.argsort(route.topk_idx_TK.flatten(), stable=True)
        w_N = route.topk_weight_TK.flatten()[order]
        routed = torch.zeros(B * T, D).index_add(0, order // K, out_ND * w_N[:, None])
        assert torch.allclose(y.reshape(B * T, D), routed + shared_TD, atol=1e-6)


def test_probes_do_not_change_the_result(tiny_model, tiny_batch):
    plain = tiny_model(*tiny_batch).loss
    for _, moe in tiny_model.moe_layers():
        moe.probe_experts.register_forward_hook(lambda *a: None)
        moe.probe_shared.register_forward_hook(lambda *a: None)
    for block in tiny_model.layers:
        block.attn.probe_logits.register_forward_hook(lambda *a: None)
    assert torch.equal(tiny_model(*tiny_batch).loss, plain)
