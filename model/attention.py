"""Attention: RoPE, causal / sliding-window masks, and the gated GQA attention layer.

One `Attention` class serves both layer kinds; `kind="swa"` only adds the window to the causal
mask and (by configuration) uses more query heads. Details follow Step 3.5 Flash:
grouped-query attention, RMSNorm on queries and keys per head (QK-norm, before RoPE), and a
head-wise sigmoid output gate o_i = sigmoid(w_i . x) * y_i applied before the output projection.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.probe import Probe


def attention_mask(seq_len: int, window: int | None, device=None) -> torch.Tensor:
    """Boolean [T, T] mask, True where query i may attend key j.

    Causal: j <= i. With a window: additionally i - j < window, i.e. each query sees itself and
    the window - 1 keys before it. window=None (or >= seq_len) gives the plain causal mask.
    """
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (i - j < window)
    return mask


@functools.lru_cache(maxsize=4)
def window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """`attention_mask` of a sliding-window layer, built once per shape and device (every
    forward of every such layer used to build it again); never written to."""
    return attention_mask(seq_len, window, device=device)


# A causal layer's max-logit probe goes by blocks of this many queries once T holds at least 4
# of them: each block against the keys before it (no mask) and its own diagonal block (masked),
# about T^2 / 2 + T * CAUSAL_BLOCK / 2 products instead of T^2 (at T=4,096: 56%).
CAUSAL_BLOCK = 512


def _as_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `allowed`, -inf elsewhere: a mask to add to logits."""
    bias = torch.zeros(allowed.shape, device=allowed.device, dtype=dtype)
    return bias.masked_fill_(~allowed, float("-inf"))


@functools.lru_cache(maxsize=16)
def logit_bias(
    seq_len: int, window: int | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Additive [T, T] bias of `attention_mask`: 0 where query i may attend key j, -inf
    elsewhere. Cached per shape, device and dtype; never written to."""
    return _as_bias(attention_mask(seq_len, window, device=device), dtype)


@functools.lru_cache(maxsize=16)
def band_bias(seq_len: int, window: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive [n_blocks, window, 2 * window] bias for `Attention.max_logits`' banded form:
    query row r of block b (position b * window + r) against key column c (position
    (b - 1) * window + c); 0 where the sliding-window mask allows the pair, -inf elsewhere,
    padding rows and columns (before position 0, past the last) included. Never written to."""
    n_blocks = -(-seq_len // window)
    i = torch.arange(n_blocks * window, device=device).view(n_blocks, window, 1)
    j = (
        torch.arange(n_blocks, device=device).view(n_blocks, 1, 1) * window
        - window
        + torch.arange(2 * window, device=device).view(1, 1, 2 * window)
    )
    return _as_bias((j >= 0) & (j <= i) & (i - j < window) & (i < seq_len), dtype)


def _causal_blocks_max(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[N] max of q_i . k_j over j <= i, for q, k of [N, T, d], by blocks of CAUSAL_BLOCK
    queries: the keys before a block are all visible to it, its own block takes the causal
    bias, the keys after it are never multiplied."""
    T, block = q.shape[1], CAUSAL_BLOCK
    best: torch.Tensor | None = None
    for start in range(0, T, block):
        stop = min(start + block, T)
        q_blk = q[:, start:stop]
        bias = logit_bias(stop - start, None, q.device, q.dtype)
        diag = torch.baddbmm(bias, q_blk, k[:, start:stop].transpose(1, 2)).amax(dim=(1, 2))
        if start:
            before = torch.bmm(q_blk, k[:, :start].transpose(1, 2)).amax(dim=(1, 2))
            diag = torch.maximum(diag, before)
        best = diag if best is None else torch.maximum(best, diag)
    assert best is not None  # T >= 1
    return best


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with precomputed cos/sin tables (non-persistent buffers)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        freqs_TF = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles_TH = torch.cat([freqs_TF, freqs_TF], dim=-1)
        self.register_buffer("cos_TH", angles_TH.cos(), persistent=False)
        self.register_buffer("sin_TH", angles_TH.sin(), persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, x_BHTd: torch.Tensor) -> torch.Tensor:
        T = x_BHTd.shape[-2]
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.max_seq_len}")
        cos, sin = self.cos_TH[:T].to(x_BHTd.dtype), self.sin_TH[:T].to(x_BHTd.dtype)
        x1, x2 = x_BHTd.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return x_BHTd * cos + rotated * sin


class Attention(nn.Module):
    """Gated grouped-query attention with QK-norm; full causal or sliding-window.

    `probe_logits` receives the per-query-head maximum pre-softmax logit (after QK-norm, RoPE
    and scaling; masked positions excluded) over the whole batch, shape [n_heads], only when
    it is active: computing it costs an extra QK^T product.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        kind: str,
        window: int,
        max_seq_len: int,
        rope_theta: float,
        norm_eps: float,
    ) -> None:
        super().__init__()
        if kind not in ("full", "swa"):
            raise ValueError(f"attention kind must be 'full' or 'swa', got {kind!r}")
        self.kind = kind
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window = window if kind == "swa" else None
        self.scale = 1.0 / math.sqrt(head_dim)
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.w_gate = nn.Linear(d_model, n_heads, bias=False)  # one gate logit per head
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps)
        self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps)
        self.rope = RotaryEmbedding(head_dim, max_seq_len, rope_theta)
        self.probe_logits = Probe()

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = self.rope(self.q_norm(q))
        k = self.rope(self.k_norm(k))
        group = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(group, dim=1)  # [B, H, T, d]: query head h uses kv head h//group
        v = v.repeat_interleave(group, dim=1)

        if self.window is None or self.window >= T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            mask_TT = window_mask(T, self.window, x_BTD.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TT, scale=self.scale)

        if self.probe_logits.active:
            with torch.no_grad():
                self.probe_logits(self.max_logits(q, k))

        gate_BHT1 = torch.sigmoid(self.w_gate(x_BTD)).transpose(1, 2).unsqueeze(-1)
        y = (y * gate_BHT1).transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.wo(y)

    def max_logits(self, q_BHTd: torch.Tensor, k_BHTd: torch.Tensor) -> torch.Tensor:
        """[H] max pre-softmax logit per query head over the positions the mask allows.

        Causal: one batched GEMM that adds the mask as a -inf bias (no [B,H,T,T] scale or mask
        pass, no mask built per call), then the max; from 4 x CAUSAL_BLOCK tokens on, by query
        blocks that skip the keys after them. Sliding window: per block of `window` queries
        against the 2 * window keys that can hold its window, so the cost is T x 2W instead of
        T x T (at T=4096, W=512: 4x less). The positive scale is applied to the H maxima, which
        equals the max of the scaled logits (rounding is monotonic)."""
        B, H, T, d = q_BHTd.shape
        q, k = q_BHTd.reshape(B * H, T, d), k_BHTd.reshape(B * H, T, d)
        w = self.window
        n_blocks = -(-T // w) if w is not None and w < T else 0
        if not n_blocks and T >= 4 * CAUSAL_BLOCK:
            return _causal_blocks_max(q, k).view(B, H).amax(dim=0) * self.scale
        if n_blocks and n_blocks * w * 2 * w < T * T:
            q = F.pad(q, (0, 0, 0, n_blocks * w - T))  # whole blocks; padded rows are masked
            k = F.pad(k, (0, 0, w, n_blocks * w - T))  # a block's keys start a window earlier
            k_blocks = k.unfold(1, 2 * w, w)  # [BH, n_blocks, d, 2w]: K^T of each block
            logits = torch.matmul(q.view(B * H, n_blocks, w, d), k_blocks)
            logits.add_(band_bias(T, w, q.device, q.dtype))
        else:
            bias_TT = logit_bias(T, w if n_blocks else None, q.device, q.dtype)
            logits = torch.baddbmm(bias_TT, q, k.transpose(1, 2))
        return logits.view(B, H, -1).amax(dim=2).amax(dim=0) * self.scale
