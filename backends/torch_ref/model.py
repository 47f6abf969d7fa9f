"""The reference decoder-only transformer, in one file.

Parameter names match Hugging Face Llama checkpoints (model.layers.0.self_attn.q_proj.weight, ...), so a
Llama-family safetensors file loads with a plain load_state_dict; other families' names and fused tensors are
translated on load (backends/hf_*.py), and their conventions are ModelConfig switches read here: partial RoPE
and q/k norms, a parallel residual (GPT-NeoX), Gemma's norms, soft-caps and sliding-window layers. The KV cache
is preallocated and written at explicit slots; positions are given explicitly, per row (ragged batches, left
padding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from backends.base import CacheFullError, KVCache, PagedKVCache, UnsupportedModel, rank_within
from backends.checkpoint import ModelConfig
from backends.strategies import Attention

from .attention import IMPLEMENTATIONS, naive_attention, softcap

# --- positions -----------------------------------------------------------------------------------


def rope_frequencies(config: ModelConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rotary_dim/2,) and the cos/sin magnitude for a call whose furthest position is seq_len-1."""
    dim, base, scaling = config.rotary_dim, config.rope_theta, config.rope_scaling
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    if scaling is None:
        return 1.0 / base**exponents, 1.0
    factor = scaling.factor
    original = scaling.original_max_position_embeddings or config.max_position_embeddings
    if scaling.kind == "linear":  # position interpolation (Chen et al. 2023): positions / factor
        return 1.0 / (factor * base**exponents), 1.0
    if scaling.kind == "ntk":  # NTK-aware: stretch the base so the lowest frequency interpolates by `factor`
        return 1.0 / (base * factor ** (dim / (dim - 2))) ** exponents, 1.0
    if scaling.kind == "llama3":
        return llama3_frequencies(1.0 / base**exponents, scaling, original), 1.0
    if scaling.kind == "longrope":  # LongRoPE (Ding et al. 2024): searched divisors, the long ones past `original`
        divisors = torch.tensor(scaling.long_factor if seq_len > original else scaling.short_factor, dtype=torch.float64)
        magnitude = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        return 1.0 / (divisors * base**exponents), scaling.attention_factor or magnitude
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
    return inv_freq, scaling.attention_factor or magnitude


def llama3_frequencies(inv_freq: torch.Tensor, scaling, original: int) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: wavelengths shorter than original/high_freq_factor are kept, longer than
    original/low_freq_factor are interpolated by `factor`, and those between are blended linearly in 1/wavelength."""
    wavelength = 2 * math.pi / inv_freq
    smooth = ((original / wavelength - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and rotations run in fp32 for low-precision models and in the model's own precision above it (an
    fp64 model is the harness's exact reference: nothing in it may round to fp32)."""
    return torch.promote_types(dtype, torch.float32)


def rope_cos_sin(config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype = torch.float32,
                 angle_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, rotary_dim) for integer positions (B, T), in `dtype`; the angles (position x
    inverse frequency) and their cos/sin computed in `angle_dtype` (float64 here; fp32 in most engines)."""
    inv_freq, magnitude = rope_frequencies(config, int(positions.max()) + 1)
    angles = positions.to(angle_dtype)[..., None] * inv_freq.to(angle_dtype)  # (B, T, rotary_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, rotary_dim): Llama's half-split layout
    return (angles.cos() * magnitude).to(dtype), (angles.sin() * magnitude).to(dtype)


class RopeTable:
    """rope_cos_sin for one config, read from cos/sin rows computed once per dtype and device (bit-identical: the
    same fp64 angles, rounded once), so a decode step only gathers. Dynamic NTK and LongRoPE pick their frequencies
    by the call's furthest position, so they are computed per call."""

    def __init__(self, config: ModelConfig, angle_dtype: torch.dtype = torch.float64):
        self.config = config
        self.angle_dtype = angle_dtype
        scaling = config.rope_scaling
        self.per_call = scaling is not None and scaling.kind in ("dynamic-ntk", "longrope")
        self.tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        lowest, highest = (int(p) for p in positions.aminmax())
        if self.per_call or lowest < 0:  # a negative position (padding a caller left unmasked) has no table row
            return rope_cos_sin(self.config, positions, dtype, self.angle_dtype)
        cos, sin = self.tables.get((dtype, positions.device), (None, None))
        needed = highest + 1
        if cos is None or cos.shape[0] < needed:
            rows = max(needed, self.config.max_position_embeddings, 2 * (0 if cos is None else cos.shape[0]))
            with torch.inference_mode(False):  # a plain tensor, usable by autograd (training) as well
                cos, sin = rope_cos_sin(self.config, torch.arange(rows, device=positions.device)[None], dtype,
                                        self.angle_dtype)
            cos, sin = cos[0, 0], sin[0, 0]  # (rows, rotary_dim)
            self.tables[(dtype, positions.device)] = cos, sin
        return cos[positions][:, None], sin[positions][:, None]  # (B, 1, T, rotary_dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head (all of them unless RoPE is partial); the rest pass."""
    if cos.shape[-1] < x.shape[-1]:
        rotary, rest = x.split([cos.shape[-1], x.shape[-1] - cos.shape[-1]], dim=-1)
        return torch.cat([apply_rope(rotary, cos, sin), rest], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    wide = compute_dtype(x.dtype)
    return (x.to(wide) * cos.to(wide) + rotated.to(wide) * sin.to(wide)).to(x.dtype)


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
    return table[..., :d_model]  # fp64: the caller casts once to its own precision


# --- the KV cache and the attention context ------------------------------------------------------


@dataclass
class AttentionContext:
    """What every layer of one forward call shares: where the new tokens go and what they may see."""

    allowed: torch.Tensor  # (B, 1, T, S) bool
    query_positions: torch.Tensor  # (B, T)
    key_positions: torch.Tensor  # (B, S)
    cache: TorchKVCache | None = None
    slots: torch.Tensor | None = None  # (B, T) cache slots of the new tokens
    first_slot: int | None = None  # every row's new tokens go to slots first_slot.. (None: rows differ)
    kv_round_trip: Callable[[torch.Tensor], torch.Tensor] | None = None  # no cache: what a quantized cache stores

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, Hkv, T, D) keys/values and return every key/value the queries may read."""
        if self.cache is None:
            return (k, v) if self.kv_round_trip is None else (self.kv_round_trip(k), self.kv_round_trip(v))
        return self.cache.store(layer, self.slots, self.first_slot, k, v, self.allowed.shape[-1])

    def attend(self, kernel, layer: int, q, k, v, slopes: torch.Tensor | None, scale: float,
               window: int | None = None) -> torch.Tensor:
        """Store the new keys/values and run the kernel: (B, H, T, D) queries -> (B, H, T, D); `window`: a sliding
        window (keys less than that many positions before their query)."""
        k, v = self.keys_values(layer, k, v)  # (B, Hkv, S, D)
        allowed = within_window(self.allowed, self.query_positions, self.key_positions, window)
        return kernel(q, k, v, allowed, alibi_bias(slopes, self.query_positions, self.key_positions), scale)


def within_window(allowed: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor,
                  window: int | None) -> torch.Tensor:
    """`allowed` (B, 1, T, S) narrowed to keys less than `window` positions before their query (None: unchanged)."""
    if window is None:
        return allowed
    distance = query_positions[:, None, :, None] - key_positions[:, None, None, :]
    return allowed & (distance < window)


def alibi_bias(slopes: torch.Tensor | None, query_positions: torch.Tensor, key_positions: torch.Tensor):
    """(B, H, T, S) ALiBi bias, slope * (key position - query position), by position, not slot; None without ALiBi."""
    if slopes is None:
        return None
    distance = key_positions[:, None, :] - query_positions[:, :, None]  # (B, T, S)
    return slopes[None, :, None, None] * distance[:, None].to(slopes.dtype)


@dataclass
class AttentionGroup:
    """Packed queries that share one kernel call: single tokens of several sequences, each its own batch row
    (T = 1), or the tokens of one sequence (a prefill chunk: one batch row of T queries)."""

    index: torch.Tensor  # (n,) the queries' places in the packed step
    one_per_row: bool
    allowed: torch.Tensor  # (G, 1, T, S)
    query_positions: torch.Tensor  # (G, T)
    key_positions: torch.Tensor  # (G, S)
    read: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer -> keys, values (G, Hkv, S, D)


def attention_groups(seqs: torch.Tensor, counts: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:
    """Split packed tokens (N,) by sequence: every single-token sequence in one group, each longer one alone,
    so a prefill chunk reads its sequence's keys once rather than once per token."""
    single = counts[seqs] == 1
    groups = [(single.nonzero()[:, 0], True)] if bool(single.any()) else []
    for seq in (counts > 1).nonzero()[:, 0].tolist():
        groups.append(((seqs == seq).nonzero()[:, 0], False))
    return groups


@dataclass
class PackedContext(AttentionContext):
    """N packed tokens of several sequences, run as one (1, N) call. `write` stores the new keys/values of
    every token; attention then runs per group (AttentionGroup), each query over its own sequence's keys."""

    write: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
    groups: list[AttentionGroup] | None = None

    def attend(self, kernel, layer, q, k, v, slopes, scale, window=None):
        self.write(layer, k[0].transpose(0, 1), v[0].transpose(0, 1))  # (N, Hkv, D) each
        out = torch.empty_like(q)  # (1, H, N, D)
        for group in self.groups:
            queries = q[0][:, group.index]  # (H, n, D)
            queries = queries.transpose(0, 1)[:, :, None] if group.one_per_row else queries[None]  # (G, H, T, D)
            keys, values = group.read(layer)
            bias = alibi_bias(slopes, group.query_positions, group.key_positions)
            allowed = within_window(group.allowed, group.query_positions, group.key_positions, window)
            result = kernel(queries, keys, values, allowed, bias, scale)  # (G, H, T, D)
            out[0][:, group.index] = result[:, :, 0].transpose(0, 1) if group.one_per_row else result[0]
        return out


def causal_mask(query_slots: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, S): a query at slot s sees valid keys at slots <= s, and always itself (so padding never NaNs)."""
    key_slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    before = key_slots[None, None, :] <= query_slots[:, :, None]
    itself = key_slots[None, None, :] == query_slots[:, :, None]
    return (before & (key_valid[:, None, :] | itself))[:, None]


def write_slots(buffer: torch.Tensor, slots: torch.Tensor, first_slot: int | None, new: torch.Tensor) -> None:
    """buffer[b, ..., slots[b, t], :] = new[b, ..., t, :] for a (B, [Hkv,] C[, D]) buffer and (B, [Hkv,] T[, D]) new
    values: a slice copy when every row writes the same slots (first_slot..), else a scatter by row."""
    slot_dim = 1 if buffer.dim() == 2 else 2
    if first_slot is not None:
        buffer.narrow(slot_dim, first_slot, slots.shape[1]).copy_(new)
        return
    rows = torch.arange(slots.shape[0], device=slots.device)[:, None]
    # advanced indices (rows, slots) around a slice put (B, T) first: assign (B, T, Hkv, D)
    if slot_dim == 1:
        buffer[rows, slots] = new
    else:
        buffer[rows, :, slots] = new.transpose(1, 2)


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

    def reset(self, rows: torch.Tensor) -> None:
        rows = rows.to(self._lengths.device)
        self.valid[rows] = False
        self._lengths = self._lengths.index_fill(0, rows, 0)  # not in place: forward leaves an inference tensor

    def begin(self, positions: torch.Tensor, token_mask: torch.Tensor, fixed_shape: bool = False) -> AttentionContext:
        """Reserve slots for (B, T) new tokens and build the mask every layer uses. fixed_shape: a context whose
        shapes and Python values do not depend on what the rows hold (new slots scattered by row, attention over
        every slot, masked), so one compiled graph serves every step."""
        n_new = positions.shape[1]
        self.check_room(n_new)
        shortest, longest = (int(n) for n in self._lengths.aminmax())
        first_slot = shortest if shortest == longest and not fixed_shape else None
        slots = self._lengths[:, None] + torch.arange(n_new, device=positions.device)  # (B, T)
        write_slots(self.valid, slots, first_slot, token_mask)
        write_slots(self.positions, slots, first_slot, positions)
        self._lengths = self._lengths + n_new
        seen = self.capacity if fixed_shape else longest + n_new  # attend over the slots any row has filled
        allowed = causal_mask(slots, self.valid[:, :seen])
        return AttentionContext(allowed, positions, self.positions[:, :seen], self, slots, first_slot=first_slot)

    def store(self, layer: int, slots: torch.Tensor, first_slot: int | None, k: torch.Tensor, v: torch.Tensor,
              seen: int):
        write_slots(self.k[layer], slots, first_slot, k.to(self.k.dtype))
        write_slots(self.v[layer], slots, first_slot, v.to(self.v.dtype))
        return self.k[layer, :, :, :seen], self.v[layer, :, :, :seen]

    def begin_packed(self, positions: torch.Tensor, rows: torch.Tensor) -> PackedContext:
        """Append packed tokens (N,) to their rows (forward_packed in base.py) and build their attention context."""
        rank, counts = rank_within(rows, self._lengths.shape[0])
        needed = self._lengths + counts
        if bool((needed > self.capacity).any()):
            row = int((needed > self.capacity).nonzero()[0])
            raise CacheFullError(f"KV cache full: row {row} holds {int(self._lengths[row])} of {self.capacity} "
                                 f"slots and {int(counts[row])} more tokens were given")
        slots = self._lengths[rows] + rank  # (N,)
        self.valid[rows, slots] = True
        self.positions[rows, slots] = positions
        self._lengths = needed

        def write(layer, k, v):
            self.k[layer][rows, :, slots] = k.to(self.k.dtype)
            self.v[layer][rows, :, slots] = v.to(self.v.dtype)

        def group(index: torch.Tensor, one_per_row: bool) -> AttentionGroup:
            shape = (-1, 1) if one_per_row else (1, -1)  # (G, T)
            group_rows = rows[index] if one_per_row else rows[index[:1]]
            seen = int(needed[group_rows].max())
            allowed = causal_mask(slots[index].view(shape), self.valid[group_rows, :seen])
            return AttentionGroup(index, one_per_row, allowed, positions[index].view(shape),
                                  self.positions[group_rows, :seen],
                                  lambda layer: (self.k[layer][group_rows, :, :seen], self.v[layer][group_rows, :, :seen]))

        groups = [group(index, one) for index, one in attention_groups(rows, counts)]
        return PackedContext(None, positions[None], None, write=write, groups=groups)


class TorchPagedKVCache(PagedKVCache):
    """The block pool, stored slot-major: keys and values (n_layers, n_blocks * block_size, Hkv, D), and the
    position each slot holds. Which slots belong to which sequence is only ever said by the block tables."""

    def __init__(self, config: ModelConfig, n_blocks: int, block_size: int, fill: float, dtype, device):
        shape = (config.n_layers, n_blocks * block_size, config.n_kv_heads, config.head_dim)
        self.k = torch.full(shape, fill, dtype=dtype, device=device)
        self.v = torch.full(shape, fill, dtype=dtype, device=device)
        self.slot_positions = torch.zeros(n_blocks * block_size, dtype=torch.long, device=device)
        super().__init__(n_blocks, block_size)

    @property
    def allocated_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def copy_blocks(self, source: torch.Tensor, target: torch.Tensor) -> None:
        source, target = self.block_slots(source.to(self.k.device)), self.block_slots(target.to(self.k.device))
        for pool in (self.k, self.v):
            pool[:, target] = pool[:, source]
        self.slot_positions[target] = self.slot_positions[source]

    def begin(self, positions, seqs, block_tables, context_lens) -> PackedContext:
        """Write packed tokens through their block tables (forward_paged in base.py); build their context."""
        logical, counts, tables = self.new_token_slots(seqs, block_tables, context_lens)
        new_slots = self.slot_mapping(tables[seqs], logical)
        self.slot_positions[new_slots] = positions

        def write(layer, k, v):
            self.k[layer][new_slots] = k.to(self.k.dtype)
            self.v[layer][new_slots] = v.to(self.v.dtype)

        def group(index: torch.Tensor, one_per_row: bool) -> AttentionGroup:
            shape = (-1, 1) if one_per_row else (1, -1)  # (G, T)
            group_seqs = seqs[index] if one_per_row else seqs[index[:1]]
            held = context_lens[group_seqs]  # (G,) tokens each sequence holds once this step is written
            span = int(-(-int(held.max()) // self.block_size)) * self.block_size
            key_logical = torch.arange(span, device=seqs.device)  # (S,)
            key_slots = self.physical_slots(tables[group_seqs, : span // self.block_size],
                                            key_logical.expand(len(group_seqs), -1))  # (G, S)
            key_valid = key_logical[None, :] < held[:, None]
            allowed = key_valid[:, None, :] & (key_logical[None, None, :] <= logical[index].view(shape)[:, :, None])
            keep = key_valid[:, None, :, None]

            def read(layer):
                # a sequence's slots past its length are never read: zeroed, not left to 0 * NaN in P @ V
                keys = torch.where(keep, self.k[layer][key_slots].transpose(1, 2), 0.0)  # (G, Hkv, S, D)
                values = torch.where(keep, self.v[layer][key_slots].transpose(1, 2), 0.0)
                return keys, values

            return AttentionGroup(index, one_per_row, allowed[:, None], positions[index].view(shape),
                                  self.slot_positions[key_slots], read)

        groups = [group(index, one) for index, one in attention_groups(seqs, counts)]
        return PackedContext(None, positions[None], None, write=write, groups=groups)


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
        wide = x.to(compute_dtype(x.dtype))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class PlusOneRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the stored weight is an offset from 1, and the product is taken in fp32 before the cast."""

    def forward(self, x):
        wide = x.to(compute_dtype(x.dtype))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.to(wide.dtype))).to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.d_model
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    if config.norm == "rmsnorm-plus-one":
        return PlusOneRMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


def default_attention(config: ModelConfig) -> Attention:
    """SDPA, unless attention scores are soft-capped: only the naive kernel exposes the scores to cap."""
    return Attention.NAIVE if config.attn_softcap is not None else Attention.SDPA


@dataclass
class FusedLinear:
    """Several Linears over the same input as one: their weights stacked by output row (one matmul, one read of the
    input), with each part's output width. A plain attribute, not a submodule: the state dict, quantization and
    weight counts keep seeing the separate layers, whose weights are views of these rows."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    widths: list[int]


def fuse_linears(linears: tuple[nn.Linear, ...]) -> FusedLinear | None:
    """The linears as one FusedLinear, their parameters rebound to views of it; None unless all are plain fp/bf
    weights of one dtype (a quantized layer keeps its own kernel)."""
    plain = all(type(m) is nn.Linear and type(m.weight.data) is torch.Tensor for m in linears)
    if not plain or len({(m.weight.dtype, m.weight.device, m.bias is None) for m in linears}) != 1:
        return None
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
        widths = [m.out_features for m in linears]
        for linear, rows, part_bias in zip(linears, weight.split(widths), [None] * len(linears) if bias is None
                                           else bias.split(widths)):
            linear.weight = nn.Parameter(rows, requires_grad=linear.weight.requires_grad)
            if part_bias is not None:
                linear.bias = nn.Parameter(part_bias, requires_grad=linear.bias.requires_grad)
    return FusedLinear(weight, bias, widths)


def fused_outputs(x: torch.Tensor, fused: FusedLinear | None, linears: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """Each linear's output for input x: one matmul when fused, else one call per layer."""
    if fused is None:
        return tuple(linear(x) for linear in linears)
    return F.linear(x, fused.weight, fused.bias).split(fused.widths, dim=-1)


def fuse_projections(model: Transformer) -> None:
    """Fuse each layer's q/k/v and gate/up projections (for inference: call after the model's final dtype, device
    and quantization are set; a later .to() would copy the separate weights away from the fused rows)."""
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        attention.fused = fuse_linears((attention.q_proj, attention.k_proj, attention.v_proj))
        if mlp.gated:
            mlp.fused = fuse_linears((mlp.gate_proj, mlp.up_proj))


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, attention: Attention):
        super().__init__()
        self.config = config
        self.kernel = IMPLEMENTATIONS[attention]
        if config.attn_softcap is not None:
            if attention != Attention.NAIVE:
                raise UnsupportedModel(f"attention soft-capping (Gemma 2) needs the scores materialized: attention "
                                       f"naive only, not {attention.value}")
            self.kernel = partial(naive_attention, score_cap=config.attn_softcap)
        hd = config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * hd, config.d_model, bias=config.out_bias)
        self.fused: FusedLinear | None = None  # q, k, v in one matmul (fuse_projections)
        if config.qk_norm:
            self.q_norm, self.k_norm = make_norm(config, hd), make_norm(config, hd)
        if config.position == "alibi":
            self.register_buffer("slopes", alibi_slopes(config.n_heads), persistent=False)

    def forward(self, x, layer: int, ctx: AttentionContext, rope: tuple[torch.Tensor, torch.Tensor] | None):
        B, T, _ = x.shape
        cfg = self.config
        q, k, v = fused_outputs(x, self.fused, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # keys are rotated before they are cached, at their own positions
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        slopes = self.slopes if cfg.position == "alibi" else None
        scale = 1.0 / math.sqrt(cfg.query_pre_attn_scalar or cfg.head_dim)
        out = ctx.attend(self.kernel, layer, q, k, v, slopes, scale, cfg.window(layer))  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.mlp in ("swiglu", "geglu")
        self.activation = {"swiglu": F.silu, "geglu": partial(F.gelu, approximate="tanh"),
                           "gelu": partial(F.gelu, approximate="tanh"), "gelu-exact": F.gelu}[config.mlp]
        if self.gated:
            self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=not self.gated)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=not self.gated)
        self.fused: FusedLinear | None = None  # gate and up in one matmul (fuse_projections)

    def forward(self, x):
        if self.gated:
            gate, up = fused_outputs(x, self.fused, (self.gate_proj, self.up_proj))
            return self.down_proj(self.activation(gate) * up)
        return self.down_proj(self.activation(self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attention: Attention):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = SelfAttention(config, attention)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)
        self.parallel, self.sandwich = config.parallel_residual, config.sandwich_norms
        if self.sandwich:  # Gemma's names: post_attention_layernorm norms the attention's output
            self.pre_feedforward_layernorm = make_norm(config)
            self.post_feedforward_layernorm = make_norm(config)

    def forward(self, x, layer, ctx, rope):
        attended = self.self_attn(self.input_layernorm(x), layer, ctx, rope)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attended)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        if self.parallel:  # both branches read the layer's input
            return x + attended + self.mlp(self.post_attention_layernorm(x))
        x = x + attended
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
    def __init__(self, config: ModelConfig, attention: Attention | None = None):
        super().__init__()
        self.config = config
        self.model = Body(config, attention or default_attention(config))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.compute_rope_angles_in(torch.float64)

    def compute_rope_angles_in(self, angle_dtype: torch.dtype) -> None:
        """Rotary angles in float64 by default; the harness's fp32/bf16/fp16 yardsticks take fp32, as engines do."""
        self.rope_tables = {local: RopeTable(self.config.local_rope() if local else self.config, angle_dtype)
                            for local in (False, True)}

    def forward(self, tokens: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """(B, T) tokens -> (B, T, V) logits, in the model's dtype."""
        return self.run(tokens, ctx, self.ropes(ctx.query_positions))

    def ropes(self, positions: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], ...] | None:
        """run's RoPE tables for (B, T) positions: None without RoPE, else (global cos/sin, sliding layers' cos/sin)."""
        cfg = self.config
        if cfg.position != "rope":
            return None
        wide = compute_dtype(self.model.embed_tokens.weight.dtype)
        rope = self.rope_tables[False].cos_sin(positions, wide)
        local = rope if cfg.local_rope_theta is None else self.rope_tables[True].cos_sin(positions, wide)
        return rope, local

    def run(self, tokens: torch.Tensor, ctx: AttentionContext, ropes) -> torch.Tensor:
        """The forward pass given the RoPE tables: ropes is None or (global cos/sin, sliding layers' cos/sin)."""
        cfg, body = self.config, self.model
        x = body.embed_tokens(tokens)
        if cfg.embed_scale:
            x = x * torch.tensor(math.sqrt(cfg.d_model), dtype=x.dtype)
        if cfg.position == "learned":
            x = x + body.embed_positions(ctx.query_positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_embedding(ctx.query_positions, cfg.d_model).to(x.dtype)
        for index, layer in enumerate(body.layers):
            rope = None if ropes is None else ropes[index in cfg.sliding_layers]
            x = layer(x, index, ctx, rope)
        logits = self.lm_head(body.norm(x))
        return logits if cfg.logit_softcap is None else softcap(logits, cfg.logit_softcap)

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The state dict as a checkpoint stores it (a tied head is stored once, as the embedding)."""
        weights = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            weights.pop("lm_head.weight")
        return weights


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `config` stores, with its shape (a tied head is stored once, as the embedding)."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = Transformer(config)
    return {name: tuple(tensor.shape) for name, tensor in model.export_weights().items()}


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
