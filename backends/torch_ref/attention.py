"""Attention implementations, selectable by name. Each takes the same arguments and returns (B, H, T, D).

q: (B, H, T, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv (MHA, GQA, MQA);
allowed: (B, 1 or H, T, S) bool, True where a query may attend to a key;
bias: (B, H, T, S) additive score bias (ALiBi) or None; scale: the softmax scale.
A query row with no allowed key returns zeros, never NaN.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from backends.strategies import Attention


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    # (B, Hkv, S, D) -> (B, H, S, D): each kv head serves H/Hkv query heads
    return x if x.shape[1] == n_heads else x.repeat_interleave(n_heads // x.shape[1], dim=1)


def naive_attention(q, k, v, allowed, bias, scale):
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S), materialized
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)  # fully masked rows: 0, not NaN
    return probs @ v


def sdpa_attention(q, k, v, allowed, bias, scale):
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    if bias is None:
        mask = allowed
    else:
        mask = bias.to(q.dtype).masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)


AttentionFn = Callable[..., torch.Tensor]

IMPLEMENTATIONS: dict[Attention, AttentionFn] = {
    Attention.NAIVE: naive_attention,
    Attention.SDPA: sdpa_attention,
}
