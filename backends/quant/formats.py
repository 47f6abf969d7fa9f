"""The stored weight and cache formats of the quantization strategies, one definition each.

Every format is a dataclass holding exactly what is stored (codes and scales) with `dequantize()` (the value
the stored bits stand for, in float64: the oracle every kernel is judged against) and `nbytes` (scales included).

- int4 blocks (int4-block32/128, int4-gptq-block128): ONNX Runtime's MatMulNBits symmetric layout. Per output
  channel, blocks of `block` consecutive input weights share a float32 scale: the block's largest-magnitude
  weight (with its sign) / -8; each weight is stored as round(w / scale) + 8 clipped to 0..15 (zero point 8),
  two codes per byte, the even-indexed element in the low nibble. MatMulNBits pads a short last block with
  zeros; here a block size that does not divide the input dimension is refused instead.
- int8 per channel (int8-weight's storage when torchao is absent, and the KV cache): symmetric, scale =
  absmax / 127 along the quantized axis, codes round(x / scale) in -127..127.
- fp8 e4m3 per channel: scale = absmax / 448 (e4m3's largest finite value) per output channel; the weight
  divided by its scale is stored as float8_e4m3fn.
- uint8 affine (ONNX Runtime's QUInt8, onnxrt's int8-dynamic weights per output channel and its activations per
  tensor): scale = (max(0, x) - min(0, x)) / 255 in float32, zero point round(-min / scale), codes 0..255.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.base import UnsupportedModel

INT4_ZERO_POINT = 8
INT4_MAX_CODE = 15
INT8_MAX_CODE = 127
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


class FormatError(UnsupportedModel):
    """A tensor cannot be stored in the requested format; the message names the value and what is accepted
    (a backend loading a model under the format reports it as a model the strategy cannot express)."""


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """A zero scale (an all-zero block) divides as 1: its codes are the zero point and it dequantizes to 0."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


# --- int4 blocks (MatMulNBits) -----------------------------------------------------------------------


def check_block(in_features: int, block: int) -> None:
    if block <= 0 or in_features % block:
        divisors = [b for b in (16, 32, 64, 128, 256) if in_features % b == 0]
        raise FormatError(f"group size {block} does not divide the input dimension {in_features}; "
                          f"accepted here: {', '.join(map(str, divisors)) or 'none of 16..256'}")


def int4_block_scales(weight: torch.Tensor, block: int) -> torch.Tensor:
    """(out, in) -> (out, in/block) float32 scales: each block's signed largest-magnitude weight / -8."""
    out_features, in_features = weight.shape
    check_block(in_features, block)
    blocks = weight.float().view(out_features, -1, block)
    largest = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))[..., 0]
    return largest / -INT4_ZERO_POINT


def int4_codes(weight: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """(out, in) codes 0..15 (uint8, one per byte) of `weight` under per-block `scales` (out, in/block)."""
    per_weight = _nonzero(scales.float()).repeat_interleave(block, dim=1)
    return (torch.round(weight.float() / per_weight) + INT4_ZERO_POINT).clamp(0, INT4_MAX_CODE).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 -> (out, in/2) bytes, the even-indexed code in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


@dataclass
class Int4Blocks:
    packed: torch.Tensor  # (out, in/2) uint8
    scales: torch.Tensor  # (out, in/block) float32
    block: int

    @classmethod
    def quantize(cls, weight: torch.Tensor, block: int, scales: torch.Tensor | None = None) -> Int4Blocks:
        """Round to nearest under the format's own scales, or under `scales` given (GPTQ chooses them)."""
        scales = int4_block_scales(weight, block) if scales is None else scales.float()
        return cls(pack_nibbles(int4_codes(weight, scales, block)), scales, block)

    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.packed)

    def dequantize(self) -> torch.Tensor:
        centred = self.codes().double() - INT4_ZERO_POINT
        return centred * self.scales.double().repeat_interleave(self.block, dim=1)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales.numel() * self.scales.element_size()


# --- int8 and fp8 per channel ------------------------------------------------------------------------


@dataclass
class Int8Channels:
    """Symmetric int8 along the last axis: one scale per row of every other axis."""

    codes: torch.Tensor  # (..., n) int8
    scales: torch.Tensor  # (..., 1) float32

    @classmethod
    def quantize(cls, x: torch.Tensor) -> Int8Channels:
        scales = x.float().abs().amax(-1, keepdim=True) / INT8_MAX_CODE
        codes = torch.round(x.float() / _nonzero(scales)).clamp(-INT8_MAX_CODE, INT8_MAX_CODE).to(torch.int8)
        return cls(codes, scales)

    def dequantize(self) -> torch.Tensor:
        return self.codes.double() * self.scales.double()

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


@dataclass
class Fp8Channels:
    values: torch.Tensor  # (out, in) float8_e4m3fn
    scales: torch.Tensor  # (out, 1) float32

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Fp8Channels:
        scales = weight.float().abs().amax(-1, keepdim=True) / FP8_MAX
        return cls((weight.float() / _nonzero(scales)).to(torch.float8_e4m3fn), scales)

    def dequantize(self) -> torch.Tensor:
        return self.values.double() * self.scales.double()

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.scales.numel() * self.scales.element_size()


# --- uint8 affine (ONNX Runtime's QUInt8) ----------------------------------------------------------


def uint8_affine(x: torch.Tensor, dim: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero_point) of ONNX's uint8 affine quantization; per tensor (dim None) or along `dim`'s rows.
    The range always includes 0, so 0 is exact."""
    if dim is None:
        low, high = x.min().clamp(max=0), x.max().clamp(min=0)
    else:
        low, high = x.amin(dim, keepdim=True).clamp(max=0), x.amax(dim, keepdim=True).clamp(min=0)
    scale = ((high - low) / 255).float().double()  # ONNX Runtime keeps scales in float32
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero_point = torch.round(-low / safe).clamp(0, 255)
    q = (torch.round(x / safe) + zero_point).clamp(0, 255)
    return q, scale, zero_point
