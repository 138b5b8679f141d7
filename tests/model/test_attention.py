"""Attention masks and the per-head max-logit probe."""

import math

import pytest
import torch

from model.attention import Attention, attention_mask, window_mask


def reference_mask(T, window):
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            visible = j <= i and (window is None or i - j < window)
            mask[i, j] = visible
    return mask


@pytest.mark.parametrize("T,window", [(12, 4), (12, 1), (9, 9), (7, 20), (10, None)])
def test_mask_matches_loop_reference(T, window):
    assert torch.equal(attention_mask(T, window), reference_mask(T, window))


def test_a_sliding_window_layer_builds_its_mask_once():
    """window_mask is attention_mask, cached per shape and device: the same tensor on every
    forward of every sliding-window layer; and the layer's output is what the mask gives."""
    cpu = torch.device("cpu")
    first = window_mask(12, 4, cpu)
    assert torch.equal(first, reference_mask(12, 4)) and window_mask(12, 4, cpu) is first
    assert not torch.equal(window_mask(12, 3, cpu), first)
    torch.manual_seed(0)
    attn = Attention(16, 4, 2, 8, "swa", 4, 12, 1e4, 1e-6)
    x = torch.randn(2, 12, 16)
    y = attn(x)
    q = attn.rope(attn.q_norm(attn.wq(x).view(2, 12, 4, 8).transpose(1, 2)))
    k = attn.rope(attn.k_norm(attn.wk(x).view(2, 12, 2, 8).transpose(1, 2))).repeat_interleave(2, 1)
    v = attn.wv(x).view(2, 12, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    logits = (q @ k.transpose(-1, -2) * attn.scale).masked_fill(~reference_mask(12, 4), -math.inf)
    gate = torch.sigmoid(attn.w_gate(x)).transpose(1, 2).unsqueeze(-1)
    want = attn.wo(((logits.softmax(-1) @ v) * gate).transpose(1, 2).reshape(2, 12, 32))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_window_mask_row_counts():
    # Each query sees min(i + 1, window) keys: a window of 4 means itself + 3 before.
    mask = attention_mask(10, 4)
    assert mask.sum(dim=1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]


def test_swa_output_ignores_keys_outside_the_window():
    torch.manual_seed(0)
    attn = Attention(32, 4, 2, 8, "swa", window=3, max_seq_len=16, rope_theta=1e4, norm_eps=1e-6)
    x = torch.randn(1, 10, 32)
    y = attn(x)
    x2 = x.clone()
    x2[:, :4] = torch.randn(1, 4, 32)  # positions 0..3 are outside the window of query 7+
    y2 = attn(x2)
    assert torch.allclose(y[:, 7:], y2[:, 7:], atol=1e-6)
    assert not torch.allclose(y[:, 4:7], y2[:, 4:7], atol=1e-3)  # these do see changed keys


@pytest.mark.parametrize("kind", ["full", "swa"])
def test_probe_reports_masked_max_logit_per_head(kind):
    torch.manual_seed(0)
    n_heads, n_kv, hd, window = 6, 2, 8, 3
    attn = Attention(32, n_heads, n_kv, hd, kind, window, 16, 1e4, 1e-6)
    x = torch.randn(2, 9, 32)
    seen = []
    handle = attn.probe_logits.register_forward_hook(lambda m, args, out: seen.append(args))
    assert attn.probe_logits.active
    attn(x)
    handle.remove()
    assert not attn.probe_logits.active
    attn(x)
    assert len(seen) == 1 and len(seen[0]) == 1
    (max_logit_H,) = seen[0]
    assert max_logit_H.shape == (n_heads,)

    # Independent recomputation, head by head, with explicit loops over the visible keys.
    B, T, _ = x.shape
    with torch.no_grad():
        q = attn.rope(attn.q_norm(attn.wq(x).view(B, T, n_heads, hd).transpose(1, 2)))
        k = attn.rope(attn.k_norm(attn.wk(x).view(B, T, n_kv, hd).transpose(1, 2)))
    for h in range(n_heads):
        best = -math.inf
        for b in range(B):
            for i in range(T):
                for j in range(T):
                    if j <= i and (kind == "full" or i - j < window):
                        best = max(
                            best,
                            float(q[b, h, i] @ k[b, h // (n_heads // n_kv), j]) / math.sqrt(hd),
                        )
        assert max_logit_H[h].item() == pytest.approx(best, rel=1e-5, abs=1e-5)


def dense_masked_max(attn, q, k, window):
    """[H]: the max of the scaled logits over [B,H,T,T] where attention_mask(T, window) allows
    (and with window=False, unmasked)."""
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if window is not False:
        logits = logits.masked_fill(~attention_mask(q.shape[2], window), float("-inf"))
    return logits.amax(dim=(0, 2, 3))


@pytest.mark.parametrize(
    "kind,window,T",
    [
        ("full", 3, 9),
        ("swa", 3, 9),
        ("swa", 4, 9),
        ("swa", 3, 10),
        ("swa", 1, 9),
        ("swa", 20, 9),
        ("swa", 7, 9),
    ],
)  # the banded form at 3/9, 4/9 (a padded last block), 3/10 and 1/9; dense at 7/9 and 20/9
def test_max_logits_are_the_dense_masked_max_with_the_largest_products_masked(kind, window, T):
    """The probe (banded or one GEMM, the mask as a -inf bias, the scale applied to the maxima)
    against the dense masked max over [B,H,T,T]. Keys are unit vectors; query 0 is 80 x key 1 (the largest
    product, hidden by causality) and the last query 40 x key 0 (hidden only by a window)."""
    torch.manual_seed(1)
    hd = 8
    attn = Attention(32, 6, 2, hd, kind, window, 16, 1e4, 1e-6)
    q, k = torch.randn(2, 6, T, hd), torch.randn(2, 6, T, hd)
    k = k / k.norm(dim=-1, keepdim=True)
    q[:, :, 0] = 80 * k[:, :, 1]
    q[:, :, -1] = 40 * k[:, :, 0]
    shown = window if kind == "swa" and window < T else None
    dense = dense_masked_max(attn, q, k, shown)
    got = attn.max_logits(q, k)
    torch.testing.assert_close(got, dense, rtol=1e-6, atol=1e-6)
    unmasked = dense_masked_max(attn, q, k, False)
    assert (got < unmasked).all()  # query 0's product with key 1 was masked out
    if shown is None:  # the last query sees key 0: its product of 40 is in every head's max
        assert (got >= 40 * attn.scale * (1 - 1e-6)).all()


@pytest.mark.parametrize("window,T", [(3, 10), (4, 9), (8, 64)])
def test_max_logits_of_all_negative_products_ignore_the_padding(window, T):
    """Every product is -2 (every key the same unit vector, every query -2 times it): the
    banded form's zero padding rows and columns must not show up as a max of 0."""
    attn = Attention(32, 2, 1, 4, "swa", window, 64, 1e4, 1e-6)
    u = torch.tensor([0.5, 0.5, 0.5, 0.5])
    k = u.expand(1, 2, T, 4).clone()
    got = attn.max_logits(-2 * k, k)
    torch.testing.assert_close(got, torch.full((2,), -2 * attn.scale))


@pytest.mark.parametrize("T", [8, 9, 11])
def test_causal_max_logits_by_blocks_are_the_dense_masked_max(monkeypatch, T):
    """From 4 x CAUSAL_BLOCK tokens a causal layer's probe goes by query blocks (here blocks of
    2, the last one partial at T=9 and 11); query 0 is 80 x key 1 (unit keys), the largest
    product, which causality hides."""
    import model.attention as attention

    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 2)
    torch.manual_seed(2)
    attn = Attention(32, 6, 2, 8, "full", 3, 16, 1e4, 1e-6)
    q, k = torch.randn(2, 6, T, 8), torch.randn(2, 6, T, 8)
    k = k / k.norm(dim=-1, keepdim=True)
    q[:, :, 0] = 80 * k[:, :, 1]
    dense = dense_masked_max(attn, q, k, None)
    torch.testing.assert_close(attn.max_logits(q, k), dense, rtol=1e-6, atol=1e-6)
    assert (attn.max_logits(q, k) < 80 * attn.scale * 0.999).all()
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 512)  # the one-GEMM form gives the same
    torch.testing.assert_close(attn.max_logits(q, k), dense, rtol=1e-6, atol=1e-6)
