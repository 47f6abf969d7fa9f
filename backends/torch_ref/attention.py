"""Attention implementations, selectable by name. Each takes the same arguments and returns (B, H, T, D).

q: (B, H, T, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv (MHA, GQA, MQA);
allowed: (B, 1 or H, T, S) bool, True where a query may attend to a key;
bias: (B, H, T, S) additive score bias (ALiBi) or None; scale: the softmax scale.
A query row with no allowed key returns zeros, never NaN.
"""
from __future__ import annotations

from typing import Callable

import math

import torch
import torch.nn.functional as F

from backends.strategies import Attention


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    # (B, Hkv, S, D) -> (B, H, S, D): each kv head serves H/Hkv query heads
    return x if x.shape[1] == n_heads else x.repeat_interleave(n_heads // x.shape[1], dim=1)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): x kept within (-cap, cap), nearly unchanged where |x| << cap (Gemma 2)."""
    return torch.tanh(x / cap) * cap


def naive_attention(q, k, v, allowed, bias, scale, score_cap: float | None = None):
    """score_cap: scores are soft-capped before the mask (Gemma 2's attention soft-capping)."""
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S), materialized
    if score_cap is not None:
        scores = softcap(scores, score_cap)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
    probs = probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)  # fully masked rows: 0, not NaN
    return probs @ v


def sdpa_attention(q, k, v, allowed, bias, scale):
    B, H, T, D = q.shape
    n_kv, groups = k.shape[1], H // k.shape[1]
    if bias is None:
        mask = allowed
    else:
        mask = bias.to(q.dtype).masked_fill(~allowed, float("-inf"))
    # GQA without copying the cache: kv head j serves query heads j*G .. j*G+G-1, so those G heads' queries are
    # stacked as G*T rows of one attention call over kv head j's keys: (B, Hkv, G*T, D)
    q = q.reshape(B, n_kv, groups * T, D)
    S = mask.shape[-1]
    mask = mask[:, :, None].expand(B, 1, groups, T, S) if mask.shape[1] == 1 else mask.unflatten(1, (n_kv, groups))
    mask = mask.reshape(B, -1, groups * T, S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).view(B, H, T, D)
    return out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)


class FlashAttention:
    """Tiled attention with an online softmax, written in torch (FlashAttention-2: Dao 2023, Algorithm 1).

    Queries are taken `block_q` rows at a time and, for each query block, keys and values `block_k` at a
    time: only a (B, H, block_q, block_k) tile of scores exists at once. Per query row a running max m, a
    running sum l and an unnormalized output acc carry the softmax across key blocks; when the max grows,
    what was accumulated under the old max is rescaled by exp(m_old - m_new). Numerics follow the GPU
    kernel: products of low-precision inputs accumulate in fp32, and the probabilities are rounded to the
    input dtype before P @ V. Tiles with no allowed key (causal or padding) are skipped. The default tiles
    are large because on a CPU each tile costs Python overhead; the suite runs 16 to 256.
    """

    def __init__(self, block_q: int = 256, block_k: int = 256):
        for name, size in (("block_q", block_q), ("block_k", block_k)):
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"flash attention {name}={size!r}; accepted: a positive integer")
        self.block_q, self.block_k = block_q, block_k

    def __repr__(self) -> str:
        return f"FlashAttention(block_q={self.block_q}, block_k={self.block_k})"

    def __call__(self, q, k, v, allowed, bias, scale) -> torch.Tensor:
        B, H, T, D = q.shape
        n_kv, S = k.shape[1], k.shape[2]
        # (B, Hkv, G, ., .): each kv head serves its G query heads by broadcasting, never copied
        q = q.unflatten(1, (n_kv, -1))
        k, v = k[:, :, None], v[:, :, None]
        allowed = allowed[:, :, None] if allowed.shape[1] == 1 else allowed.unflatten(1, (n_kv, -1))
        bias = None if bias is None else bias.unflatten(1, (n_kv, -1))
        work = torch.promote_types(q.dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        for i in range(0, T, self.block_q):
            rows = slice(i, i + self.block_q)
            q_tile = q[..., rows, :].to(work)  # (B, Hkv, G, bq, D)
            m = torch.full(q_tile.shape[:-1], -math.inf, dtype=work, device=q.device)
            l = torch.zeros_like(m)
            acc = torch.zeros_like(q_tile)
            for j in range(0, S, self.block_k):
                cols = slice(j, j + self.block_k)
                tile_allowed = allowed[..., rows, cols]
                if not bool(tile_allowed.any()):
                    continue
                scores = (q_tile @ k[..., cols, :].to(work).transpose(-2, -1)) * scale  # (B, Hkv, G, bq, bk)
                if bias is not None:
                    scores = scores + bias[..., rows, cols].to(work)
                scores = scores.masked_fill(~tile_allowed, -math.inf)
                m, l, acc = self.update(m, l, acc, scores, v[..., cols, :])
            # a row that saw no allowed key has l = 0 and acc = 0: it returns zeros, not NaN
            out[..., rows, :] = (acc / l.masked_fill(l == 0, 1.0)[..., None]).to(q.dtype)
        return out.flatten(1, 2)

    @staticmethod
    def update(m, l, acc, scores, v_tile) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One key block of the online softmax: the new running max, running sum and unnormalized output."""
        m_new = torch.maximum(m, scores.amax(dim=-1))
        shift = m_new.masked_fill(m_new == -math.inf, 0.0)  # rows with nothing allowed yet: no inf - inf
        rescale = torch.exp(m - shift)  # what was summed under the old max, brought to the new one
        p = torch.exp(scores - shift[..., None])
        l = l * rescale + p.sum(dim=-1)
        acc = acc * rescale[..., None] + p.to(v_tile.dtype).to(p.dtype) @ v_tile.to(p.dtype)
        return m_new, l, acc


AttentionFn = Callable[..., torch.Tensor]

IMPLEMENTATIONS: dict[Attention, AttentionFn] = {
    Attention.NAIVE: naive_attention,
    Attention.SDPA: sdpa_attention,
    Attention.FLASH: FlashAttention(),
}
