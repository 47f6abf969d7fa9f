"""The reference decoder-only transformer, in one file.

Parameter names match Hugging Face Llama checkpoints (model.layers.0.self_attn.q_proj.weight, ...), so a
Llama-family safetensors file loads with a plain load_state_dict. The KV cache is preallocated and
written at explicit slots; positions are given explicitly, per row (ragged batches, left padding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from backends.base import KVCache
from backends.checkpoint import ModelConfig
from backends.strategies import Attention

from .attention import IMPLEMENTATIONS

# --- positions -----------------------------------------------------------------------------------


def rope_frequencies(config: ModelConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the cos/sin magnitude for a call whose furthest position is seq_len-1."""
    dim, base, scaling = config.head_dim, config.rope_theta, config.rope_scaling
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    if scaling is None:
        return 1.0 / base**exponents, 1.0
    factor = scaling.factor
    original = scaling.original_max_position_embeddings or config.max_position_embeddings
    if scaling.kind == "linear":  # position interpolation (Chen et al. 2023): positions / factor
        return 1.0 / (factor * base**exponents), 1.0
    if scaling.kind == "ntk":  # NTK-aware: stretch the base so the lowest frequency interpolates by `factor`
        return 1.0 / (base * factor ** (dim / (dim - 2))) ** exponents, 1.0
    if scaling.kind == "dynamic-ntk":  # NTK-aware with a factor that grows with the sequence seen so far
        if seq_len > original:
            base = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / base**exponents, 1.0
    # YaRN (Peng et al. 2023, eqs. 17-23): interpolate low frequencies, keep high ones, ramp between
    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    extrapolated, interpolated = 1.0 / base**exponents, 1.0 / (factor * base**exponents)
    inv_freq = interpolated * ramp + extrapolated * (1 - ramp)
    magnitude = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, magnitude


def rope_cos_sin(config: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T)."""
    inv_freq, magnitude = rope_frequencies(config, int(positions.max()) + 1)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, head_dim): Llama's half-split layout
    return (angles.cos() * magnitude).float(), (angles.sin() * magnitude).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head slopes of Press et al. (2022): a geometric sequence from 2^(-8/n); for n not a power of 2,
    the slopes of the closest power of 2 followed by every other slope of twice that many heads."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two_slopes(closest) + power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes)


def sinusoidal_embedding(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """Vaswani et al. (2017): sin on even, cos on odd channels, wavelengths from 2*pi to 10000*2*pi."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
    return table[..., :d_model].float()


# --- the KV cache and the attention context ------------------------------------------------------


@dataclass
class AttentionContext:
    """What every layer of one forward call shares: where the new tokens go and what they may see."""

    allowed: torch.Tensor  # (B, 1, T, S) bool
    query_positions: torch.Tensor  # (B, T)
    key_positions: torch.Tensor  # (B, S)
    cache: TorchKVCache | None = None
    slots: torch.Tensor | None = None  # (B, T) cache slots of the new tokens
    kv_round_trip: Callable[[torch.Tensor], torch.Tensor] | None = None  # no cache: what a quantized cache stores

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, Hkv, T, D) keys/values and return every key/value the queries may read."""
        if self.cache is None:
            return (k, v) if self.kv_round_trip is None else (self.kv_round_trip(k), self.kv_round_trip(v))
        return self.cache.store(layer, self.slots, k, v, self.allowed.shape[-1])


def causal_mask(query_slots: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, S): a query at slot s sees valid keys at slots <= s, and always itself (so padding never NaNs)."""
    key_slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    before = key_slots[None, None, :] <= query_slots[:, :, None]
    itself = key_slots[None, None, :] == query_slots[:, :, None]
    return (before & (key_valid[:, None, :] | itself))[:, None]


class TorchKVCache(KVCache):
    """Preallocated keys and values, (n_layers, B, Hkv, capacity, D), plus each slot's position and validity."""

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, dtype: torch.dtype, device):
        shape = (config.n_layers, batch_size, config.n_kv_heads, capacity, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self._lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths

    @property
    def allocated_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    @property
    def element_bytes(self) -> int:
        return self.k.element_size()

    def truncate(self, lengths: torch.Tensor) -> None:
        lengths = lengths.to(self._lengths)
        if bool((lengths > self._lengths).any()) or bool((lengths < 0).any()):
            raise ValueError(f"truncate can only shorten rows: {self._lengths.tolist()} -> {lengths.tolist()}")
        slots = torch.arange(self.capacity, device=lengths.device)
        self.valid &= slots[None, :] < lengths[:, None]
        self._lengths = lengths.clone()

    def begin(self, positions: torch.Tensor, token_mask: torch.Tensor) -> AttentionContext:
        """Reserve slots for (B, T) new tokens and build the mask every layer uses."""
        n_new = positions.shape[1]
        self.check_room(n_new)
        slots = self._lengths[:, None] + torch.arange(n_new, device=positions.device)  # (B, T)
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        self.valid[rows, slots] = token_mask
        self.positions[rows, slots] = positions
        self._lengths = self._lengths + n_new
        seen = int(self._lengths.max())  # attend over the slots any row has filled
        allowed = causal_mask(slots, self.valid[:, :seen])
        return AttentionContext(allowed, positions, self.positions[:, :seen], self, slots)

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: int):
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
        # advanced indices (rows, slots) around a slice put (B, T) first: assign (B, T, Hkv, D)
        self.k[layer][rows, :, slots] = k.transpose(1, 2).to(self.k.dtype)
        self.v[layer][rows, :, slots] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[layer, :, :, :seen], self.v[layer, :, :, :seen]


def full_sequence_context(positions: torch.Tensor, token_mask: torch.Tensor) -> AttentionContext:
    slots = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
    return AttentionContext(causal_mask(slots, token_mask), positions, positions)


# --- the blocks ----------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, attention: Attention):
        super().__init__()
        self.config = config
        self.kernel = IMPLEMENTATIONS[attention]
        hd = config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * hd, config.d_model, bias=config.out_bias)
        if config.position == "alibi":
            self.register_buffer("slopes", alibi_slopes(config.n_heads), persistent=False)

    def forward(self, x, layer: int, ctx: AttentionContext, rope: tuple[torch.Tensor, torch.Tensor] | None):
        B, T, _ = x.shape
        cfg = self.config
        q = self.q_proj(x).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if rope is not None:  # keys are rotated before they are cached, at their own positions
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = ctx.keys_values(layer, k, v)  # (B, Hkv, S, D)
        bias = None
        if cfg.position == "alibi":  # slope * (key position - query position), by position, not slot
            distance = ctx.key_positions[:, None, None, :] - ctx.query_positions[:, None, :, None]
            bias = self.slopes[None, :, None, None] * distance.float()  # (B, H, T, S)
        out = self.kernel(q, k, v, ctx.allowed, bias, 1.0 / math.sqrt(cfg.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=not self.swiglu)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=not self.swiglu)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attention: Attention):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = SelfAttention(config, attention)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, layer, ctx, rope):
        x = x + self.self_attn(self.input_layernorm(x), layer, ctx, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, config: ModelConfig, attention: Attention):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        if config.position == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config, attention) for _ in range(config.n_layers))
        self.norm = make_norm(config)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, attention: Attention = Attention.SDPA):
        super().__init__()
        self.config = config
        self.model = Body(config, attention)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """(B, T) tokens -> (B, T, V) logits, in the model's dtype."""
        cfg, body = self.config, self.model
        x = body.embed_tokens(tokens)
        if cfg.position == "learned":
            x = x + body.embed_positions(ctx.query_positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_embedding(ctx.query_positions, cfg.d_model).to(x.dtype)
        rope = rope_cos_sin(cfg, ctx.query_positions) if cfg.position == "rope" else None
        for index, layer in enumerate(body.layers):
            x = layer(x, index, ctx, rope)
        return self.lm_head(body.norm(x))

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The state dict as a checkpoint stores it (a tied head is stored once, as the embedding)."""
        weights = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            weights.pop("lm_head.weight")
        return weights


def init_random_weights(model: Transformer, generator: torch.Generator) -> None:
    """Seeded random weights whose logits are well separated (so greedy choices are not coin flips)."""
    for name, param in model.named_parameters():
        if "norm" in name or "layernorm" in name:
            nn.init.ones_(param) if name.endswith("weight") else nn.init.zeros_(param)
        elif name.endswith("bias"):
            nn.init.normal_(param, std=0.02, generator=generator)
        elif "embed" in name:
            nn.init.normal_(param, std=1.0, generator=generator)
        else:
            nn.init.normal_(param, std=1.0 / math.sqrt(param.shape[1]), generator=generator)
