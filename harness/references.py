"""References the harness computes itself, never the backend under test: the reference PyTorch model in float64
on the same weights, and, for a lossy strategy, the same model with that strategy's number format simulated
exactly (dequantize, then multiply in float64); and the same model run in fp32, bf16 or fp16 (naive attention),
whose error against float64 is what a correct implementation of that precision achieves (the yardstick of
harness/oracles.py's assert_by_precision_reference).

The simulated formats follow how backends/onnxrt/quantize.py has ONNX Runtime quantize every MatMul weight
(tests/test_trained_scale.py checks them against ONNX Runtime's own quantizers):
- int4-block32/128 (MatMulNBits, symmetric): per output channel, blocks of 32/128 input weights; the block's
  scale is its largest-magnitude weight / -8, each weight round(w / scale) + 8 clipped to 0..15.
- int8-dynamic (quantize_dynamic, QUInt8 per channel): per output channel, scale = (max(0, w) - min(0, w)) / 255,
  zero point round(-min / scale); activations quantized per call and tensor by ONNX's DynamicQuantizeLinear
  (uint8, same rule over the whole input of the MatMul), then an exact integer product.
- int4-gptq-block128: the int4-block128 format holding the blocks GPTQ chose (backends/torch_ref/quantize.py).
- fp16-kv: every weight fp64; keys and values rounded to fp16 where they are stored.
int4 at accuracy level 4 also rounds activations to int8 inside the kernel; that step is not simulated (MLAS's
kernel choice depends on the CPU), so the int4 oracle is the weights' own error: the larger share by far.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from backends.base import KVCache, ModelRunner
from backends.checkpoint import Checkpoint
from backends.quant.formats import Int4Blocks, uint8_affine
from backends.strategies import Attention, Quant, Strategy
from backends.torch_ref.backend import build_model
from backends.torch_ref.model import TorchKVCache, full_sequence_context
from backends.torch_ref.quantize import Fp16KVCache, fp16_round_trip, gptq_blocks

INT4_BLOCKS = {Quant.INT4_BLOCK32: 32, Quant.INT4_BLOCK128: 128}
SIMULATED = (Quant.INT8_DYNAMIC, *INT4_BLOCKS, Quant.INT4_GPTQ_BLOCK128, Quant.FP16_KV)


def int4_block_dequantized(weight: torch.Tensor, block: int) -> torch.Tensor:
    """(out, in) weight -> its int4 block-quantized value (backends/quant/formats.py's MatMulNBits format), blocks
    of `block` along the input dimension; like MatMulNBits, a short last block is padded with zeros."""
    in_features = weight.shape[1]
    padded = torch.nn.functional.pad(weight, (0, -in_features % block))
    return Int4Blocks.quantize(padded, block).dequantize()[:, :in_features]


class SimulatedLinear(nn.Module):
    """A Linear layer computing in float64 with a lossy format's weights (and activations) simulated."""

    def __init__(self, linear: nn.Linear, quant: Quant, stored: Int4Blocks | None = None):
        """`stored`: the int4 blocks a calibrated method chose for this layer (else round to nearest)."""
        super().__init__()
        weight = linear.weight.detach().double()
        self.quantize_activations = quant == Quant.INT8_DYNAMIC
        if quant == Quant.INT8_DYNAMIC:
            q, scale, zero_point = uint8_affine(weight, dim=1)  # per output channel
            self.register_buffer("weight_q", q - zero_point)
            self.register_buffer("weight_scale", scale.T)  # (1, out)
        elif stored is not None:
            self.register_buffer("weight", stored.dequantize())
        else:
            self.register_buffer("weight", int4_block_dequantized(weight, INT4_BLOCKS[quant]))
        self.bias = None if linear.bias is None else linear.bias.detach().double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_activations:
            q, scale, zero_point = uint8_affine(x, dim=None)
            y = ((q - zero_point) @ self.weight_q.T) * (scale * self.weight_scale)  # integer products: exact in fp64
        else:
            y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


def simulate_format(model: nn.Module, quant: Quant, checkpoint: Checkpoint) -> nn.Module:
    """Swap every Linear (the MatMul weights ONNX Runtime quantizes, lm_head included) for its simulated format."""
    chosen = gptq_blocks(checkpoint) if quant == Quant.INT4_GPTQ_BLOCK128 else {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                stored = chosen.get(f"{name}.{child_name}" if name else child_name)
                setattr(module, child_name, SimulatedLinear(child, quant, stored))
    return model


PRECISIONS = {Quant.FP32: torch.float32, Quant.BF16: torch.bfloat16, Quant.FP16: torch.float16}


class ReferenceRunner(ModelRunner):
    """The reference model (naive attention) on the checkpoint's weights in `dtype`, optionally with a lossy
    format simulated (float64 only); the contract's cache semantics, so it can be run through the same calls as
    any backend. In float64 nothing rounds to fp32: model.py computes norms and rotations in at least the model's
    precision."""

    def __init__(self, checkpoint: Checkpoint, quant: Quant = Quant.FP32, dtype: torch.dtype = torch.float64):
        if quant != Quant.FP32 and quant not in SIMULATED:
            raise ValueError(f"no simulated format for {quant.value!r}; simulated: {', '.join(q.value for q in SIMULATED)}")
        super().__init__(checkpoint, Strategy(quant, Attention.NAIVE))
        self.dtype = dtype
        self.model = build_model(checkpoint, Attention.NAIVE).to(dtype)
        if dtype != torch.float64:
            # A precision's yardstick is what a standard implementation of it achieves: transformers, vLLM and
            # onnxruntime-genai's model builder all compute the rotary angles in fp32, whose rounding grows with
            # the position (~1e-5 rad at 255); float64 angles (ours) are more exact than that, not the bar.
            self.model.compute_rope_angles_in(torch.float32)
        self.fp16_kv = quant == Quant.FP16_KV
        if quant not in (Quant.FP32, Quant.FP16_KV):
            simulate_format(self.model, quant, checkpoint)

    def new_cache(self, batch_size: int, capacity: int) -> TorchKVCache:
        if self.fp16_kv:
            return Fp16KVCache(self.config, batch_size, capacity, torch.device("cpu"), self.dtype)
        return TorchKVCache(self.config, batch_size, capacity, self.dtype, torch.device("cpu"))

    @staticmethod
    def _mask(tokens: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        return torch.ones_like(tokens, dtype=torch.bool) if token_mask is None else token_mask

    @torch.inference_mode()
    def forward(self, cache: KVCache, tokens, positions, token_mask=None) -> torch.Tensor:
        return self.model(tokens, cache.begin(positions, self._mask(tokens, token_mask)))

    @torch.inference_mode()
    def forward_full(self, tokens, positions, token_mask=None) -> torch.Tensor:
        context = full_sequence_context(positions, self._mask(tokens, token_mask))
        context.kv_round_trip = fp16_round_trip if self.fp16_kv else None
        return self.model(tokens, context)


_REFERENCES: dict[tuple[int, Quant, torch.dtype], ReferenceRunner] = {}


def _reference(checkpoint: Checkpoint, quant: Quant, dtype: torch.dtype) -> ReferenceRunner:
    """Built once per process, checkpoint, format and dtype (checkpoints live for the session)."""
    key = (id(checkpoint), quant, dtype)
    if key not in _REFERENCES:
        _REFERENCES[key] = ReferenceRunner(checkpoint, quant, dtype)
    return _REFERENCES[key]


def float64_reference(checkpoint: Checkpoint, quant: Quant = Quant.FP32) -> ReferenceRunner:
    """The exact reference: float64, with a lossy format simulated when `quant` is one of SIMULATED."""
    return _reference(checkpoint, quant, torch.float64)


def plain_reference(checkpoint: Checkpoint, quant: Quant) -> ReferenceRunner | None:
    """The harness's plain path for a strategy's number format: the format simulated exactly in float64 (SIMULATED),
    or the reference model run in that precision (PRECISIONS); None for a format the harness does not compute."""
    if quant in SIMULATED:
        return float64_reference(checkpoint, quant)
    if quant in PRECISIONS:
        return precision_reference(checkpoint, quant)
    return None


def precision_reference(checkpoint: Checkpoint, quant: Quant) -> ReferenceRunner:
    """The reference model run in the precision `quant` names (fp32, bf16, fp16): what a correct implementation
    of that precision achieves, computed by the harness, not by the backend under test."""
    if quant not in PRECISIONS:
        accepted = ", ".join(q.value for q in PRECISIONS)
        raise ValueError(f"no reference precision for {quant.value!r}; accepted: {accepted}")
    return _reference(checkpoint, Quant.FP32, PRECISIONS[quant])
