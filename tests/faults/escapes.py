"""Faults of the four kinds that once escaped the suites (issue 13), one or more per kind; each is caught by the
suite meant for it, with a message naming the area.

1. Low precision: an accumulator, the rotary angles or the KV cache in a narrower format than the strategy names,
   in every path of the backend (its own recompute path too, so only a yardstick the harness computes shows it).
2. Sampling parameters: temperature, top-k and top-p applied wrongly, in the draft or in the shared filter.
3. Rollback of ragged rows: rows rolled back by different amounts.
4. Positions and padding: positions that are not "slot + a per-row constant", padding after the prefill.
"""
from __future__ import annotations

import math

import pytest
import torch

from backends.algorithms import generation, rejection_sampler, speculative
from backends.algorithms.generation import Sampling
from backends.strategies import Attention
from backends.torch_ref.attention import FlashAttention
from backends.torch_ref.backend import TorchBackend, TorchRunner
from backends.torch_ref.model import Transformer, TorchKVCache, full_sequence_context, rope_frequencies

from . import Fault
from .kv_cache import planted


# --- 1. low precision ------------------------------------------------------------------------------


def bf16_round_trip(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


class Bf16RoundedKVCache(TorchKVCache):
    """Keys and values rounded to bf16 as they are stored, in tensors of the strategy's type (4 bytes an element
    in fp32: the KV-bytes check cannot see it)."""

    def store(self, layer, slots, first_slot, k, v, seen):
        return super().store(layer, slots, first_slot, bf16_round_trip(k), bf16_round_trip(v), seen)


class Bf16KVRunner(TorchRunner):
    """The KV cache holds bf16 values whatever the strategy names; the recompute path rounds K/V the same way."""

    def new_cache(self, batch_size, capacity):
        return Bf16RoundedKVCache(self.config, batch_size, capacity, self.dtype, self.device)

    @torch.inference_mode()
    def forward_full(self, tokens, positions, token_mask=None):
        tokens, positions, mask = self._inputs(tokens, positions, token_mask)
        context = full_sequence_context(positions, mask)
        context.kv_round_trip = bf16_round_trip
        return self.model(tokens, context).float()


class RopeAnglesInModelDtype(Transformer):
    """Rotary angles (position x inverse frequency) computed in the model's dtype, not in float64."""

    def forward(self, tokens, ctx):
        dtype = self.model.embed_tokens.weight.dtype
        inv_freq, _ = rope_frequencies(self.config, int(ctx.query_positions.max()) + 1)
        angles = ctx.query_positions.to(dtype)[..., None] * inv_freq.to(dtype)  # (B, T, rotary_dim/2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        rope = (angles.cos(), angles.sin())
        return self.run(tokens, ctx, (rope, rope))


class LowPrecisionRopeRunner(TorchRunner):
    def __init__(self, checkpoint, strategy, device):
        super().__init__(checkpoint, strategy, device)
        self.model.__class__ = RopeAnglesInModelDtype


class NarrowAccumulatorFlash(FlashAttention):
    """The online softmax's running sum and output kept in the inputs' dtype (bf16, fp16) between key tiles."""

    @staticmethod
    def update(m, l, acc, scores, v_tile):
        m, l, acc = FlashAttention.update(m, l, acc, scores, v_tile)
        narrow = v_tile.dtype
        return m, l.to(narrow).to(l.dtype), acc.to(narrow).to(acc.dtype)


class NarrowAccumulatorFlashBackend(TorchBackend):
    name = "flash-accumulates-in-input-dtype"

    def attention_kernels(self):
        return {**super().attention_kernels(), Attention.FLASH: NarrowAccumulatorFlash()}


# --- 2. sampling parameters: patches into the shared sampling code -----------------------------------

SAMPLING_MODULES = (generation, rejection_sampler)  # each binds filter_logits by name
correct_filter = generation.filter_logits


def patch_filter(monkeypatch: pytest.MonkeyPatch, faulty) -> None:
    for module in SAMPLING_MODULES:
        monkeypatch.setattr(module, "filter_logits", faulty)


def top_p_one_token_short(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Top-p drops the token that carries the kept mass past top_p (where more than one is kept)."""
    kept = correct_filter(logits, sampling)
    if sampling.top_p < 1.0:
        least = kept.masked_fill(kept.isinf(), math.inf).argmin(dim=-1, keepdim=True)
        several = (~kept.isinf()).sum(dim=-1, keepdim=True) > 1
        kept = kept.scatter(-1, least, torch.where(several, -math.inf, kept.gather(-1, least)))
    return kept


def top_k_after_top_p(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Top-p over the whole tempered distribution first, then top-k of what is left."""
    after_top_p = correct_filter(logits, Sampling(sampling.temperature, 0, sampling.top_p))
    return correct_filter(after_top_p, Sampling(1.0, sampling.top_k, 1.0))


def temperature_after_filters(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Top-k and top-p chosen on the untempered logits; the temperature applied to what they keep."""
    return correct_filter(logits, Sampling(1.0, sampling.top_k, sampling.top_p)) / sampling.temperature


def draft_samples_untempered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The draft model reports its tempered, filtered distribution q but draws its token from the untempered one
    (the draft's draw is the only `draw` speculative.py calls; `distribution` is its q, computed just before)."""
    last = {}

    def distribution(logits, sampling):
        last["untempered"] = rejection_sampler.distribution(logits, Sampling(1.0, sampling.top_k, sampling.top_p))
        return rejection_sampler.distribution(logits, sampling)

    monkeypatch.setattr(speculative, "distribution", distribution)
    monkeypatch.setattr(speculative, "draw", lambda q, uniforms: rejection_sampler.draw(last["untempered"], uniforms))


# --- 3. rollback of ragged rows ----------------------------------------------------------------------


class FirstRowRollbackCache(TorchKVCache):
    """truncate() rolls every row back by as many slots as the first row (a per-row amount taken as a scalar)."""

    def truncate(self, lengths):
        shortened_by = self.lengths[0] - lengths.to(self.lengths)[0]
        super().truncate(self.lengths - shortened_by)


class FirstRowRollbackRunner(TorchRunner):
    def new_cache(self, batch_size, capacity):
        return FirstRowRollbackCache(self.config, batch_size, capacity, self.dtype, self.device)


# --- 4. positions and padding -------------------------------------------------------------------------


def slot_positions(positions: torch.Tensor, first_slot: torch.Tensor) -> torch.Tensor:
    """Positions rebuilt as slot + a per-row offset, the offset read at each row's last token of the call."""
    slots = first_slot[:, None] + torch.arange(positions.shape[1])
    return slots + (positions[:, -1:] - slots[:, -1:])


class SlotPositionsRunner(TorchRunner):
    """Ignores the positions given inside a call: they are taken to be consecutive (true of plain prompts and of
    single decode tokens, not of positions with gaps)."""

    def forward(self, cache, tokens, positions, token_mask=None):
        return super().forward(cache, tokens, slot_positions(positions, cache.lengths.cpu()), token_mask)

    def forward_full(self, tokens, positions, token_mask=None):
        return super().forward_full(tokens, slot_positions(positions, torch.zeros(len(positions), dtype=torch.long)),
                                    token_mask)


class PrefillOnlyPaddingRunner(TorchRunner):
    """The padding mask is applied to the first call into a cache only: padding after the prefill is attended."""

    def forward(self, cache, tokens, positions, token_mask=None):
        return super().forward(cache, tokens, positions, token_mask if int(cache.lengths.max()) == 0 else None)


KV_SUITE = "suites/test_kv_cache.py"
SPECULATIVE_SUITE = "suites/test_speculative.py"
PRECISION_MESSAGE = "*KV cache: {quant}*yardstick: the harness's reference model*exceeds 3.0 x plain error*"

FAULTS = [
    Fault("kv-cache-bf16-when-fp32", "kv-cache", "the KV cache rounds keys and values to bf16 under fp32 "
          "(in 4-byte elements), and so does the recompute path", KV_SUITE, "low_precision and fp32",
          PRECISION_MESSAGE.format(quant="fp32"), backend=planted("kv-cache-bf16-when-fp32", Bf16KVRunner),
          args=("--quant", "fp32")),
    Fault("rope-angles-in-bf16", "kv-cache", "rotary angles computed in bf16 under bf16", KV_SUITE,
          "low_precision and bf16", PRECISION_MESSAGE.format(quant="bf16"),
          backend=planted("rope-angles-in-bf16", LowPrecisionRopeRunner), args=("--quant", "bf16")),
    Fault("flash-accumulates-in-input-dtype", "flash-attention", "the flash kernel keeps its running sum and "
          "output in bf16 between key tiles", "suites/test_flash_attention.py",
          "q_len_differs and flash and bf16 and 8192", "*optimized error*exceeds 2.0 x plain error*",
          backend=NarrowAccumulatorFlashBackend),
    Fault("draft-samples-untempered", "sampling", "the draft draws from its untempered distribution but reports "
          "the tempered one", SPECULATIVE_SUITE, "sampling_matches and t0.7",
          "*sampling: speculative, temperature 0.7, top-k 4, top-p 0.8: *", patch=draft_samples_untempered),
    Fault("top-p-one-token-short", "sampling", "top-p keeps one token too few", SPECULATIVE_SUITE,
          "sampling_matches and t1.5", "*sampling: *temperature 1.5, top-k 3, top-p 0.7: *",
          patch=lambda monkeypatch: patch_filter(monkeypatch, top_p_one_token_short)),
    Fault("top-k-after-top-p", "sampling", "top-k applied after top-p", SPECULATIVE_SUITE,
          "sampling_matches and t1.5", "*sampling: *temperature 1.5, top-k 3, top-p 0.7: *",
          patch=lambda monkeypatch: patch_filter(monkeypatch, top_k_after_top_p)),
    Fault("temperature-after-top-p", "sampling", "the temperature applied after top-k and top-p chose the tokens",
          SPECULATIVE_SUITE, "sampling_matches and t0.7", "*sampling: *temperature 0.7, top-k 4, top-p 0.8: *",
          patch=lambda monkeypatch: patch_filter(monkeypatch, temperature_after_filters)),
    Fault("rollback-by-first-row", "kv-cache", "truncate() rolls every row back by the first row's amount",
          KV_SUITE, "truncated_by_different_amounts", "*KV cache: rows rolled back by 1, 5 and 3 slots*",
          backend=planted("rollback-by-first-row", FirstRowRollbackRunner)),
    Fault("positions-from-slots", "kv-cache", "positions inside a call rebuilt as consecutive slots plus an offset",
          KV_SUITE, "gaps and default-target", "*KV cache: positions 128.. with gaps*",
          backend=planted("positions-from-slots", SlotPositionsRunner)),
    Fault("padding-masked-in-prefill-only", "kv-cache", "token_mask ignored after the first call into a cache",
          KV_SUITE, "padding_inside and default-target", "*KV cache: padding inside and after the prefill*",
          backend=planted("padding-masked-in-prefill-only", PrefillOnlyPaddingRunner)),
    Fault("rope-angles-in-fp16", "cross-backend", "rotary angles computed in fp16 under fp16",
          "suites/test_cross_backend.py", "low_precision and fp16",
          "*cross-backend: fp16 against the harness's reference model in it*exceeds 2.0 x plain error*",
          backend=planted("rope-angles-in-fp16", LowPrecisionRopeRunner), args=("--quant", "fp16")),
]
