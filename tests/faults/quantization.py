"""Quantization faults: the reference backend whose quantized modules compute with one change (same stored
buffers, a faulty kernel); suites/test_quantization.py judges each kernel against dequantize-then-matmul of its
stored weights, and the int8 KV quantizer against half a step."""
from __future__ import annotations

import torch

from backends.quant.formats import INT4_ZERO_POINT, Int8Channels
from backends.strategies import Quant
from backends.torch_ref.backend import TorchRunner
from backends.torch_ref.quantize import Fp8Linear, Int4Linear, Int8KVCache, unpack_nibbles

from . import Fault
from .kv_cache import planted

SUITE = "suites/test_quantization.py"
KERNEL_DIFFERS = "*the {quant} kernel differs from dequantize-then-matmul*"


class ScalesOnInputAxisFp8(Fp8Linear):
    """The per-output-channel scales are applied along the input axis."""

    def weight_fp32(self):
        return self.values.float() * self.scales[: self.in_features].view(1, -1)


class ZeroPointOffByOneInt4(Int4Linear):
    """Codes are centred on 7 instead of the stored zero point 8."""

    def weight_fp32(self):
        codes = unpack_nibbles(self.packed).view(self.out_features, -1, self.block)
        return ((codes.float() - (INT4_ZERO_POINT - 1)) * self.scales[..., None]).view(self.out_features, -1)


class ShiftedGroupsInt4(Int4Linear):
    """Each block's scale is applied one weight late: group boundaries shifted by one."""

    def weight_fp32(self):
        per_weight = self.scales.repeat_interleave(self.block, dim=1).roll(1, dims=1)
        return (unpack_nibbles(self.packed).float() - INT4_ZERO_POINT) * per_weight


class SwappedNibblesInt4(Int4Linear):
    """The two codes of each packed byte are read in the wrong order (high nibble first)."""

    def weight_fp32(self):
        codes = unpack_nibbles(self.packed).view(self.out_features, -1, 2).flip(-1)
        per_weight = self.scales.repeat_interleave(self.block, dim=1)
        return (codes.reshape(self.out_features, -1).float() - INT4_ZERO_POINT) * per_weight


def clipping_quantize(x: torch.Tensor) -> Int8Channels:
    """Scales from the mean magnitude (3 x mean / 127): outliers are clipped to the largest code."""
    scales = 3 * x.float().abs().mean(-1, keepdim=True) / 127
    codes = torch.round(x.float() / torch.where(scales == 0, 1, scales)).clamp(-127, 127).to(torch.int8)
    return Int8Channels(codes, scales)


class ClippingInt8KVCache(Int8KVCache):
    quantize = staticmethod(clipping_quantize)


class ClippingKVRunner(TorchRunner):
    def new_cache(self, batch_size, capacity):
        if self.strategy.quant == Quant.INT8_KV:
            return ClippingInt8KVCache(self.config, batch_size, capacity, self.device)
        return super().new_cache(batch_size, capacity)


def swapping_runner(original: type, faulty: type) -> type[TorchRunner]:
    """A runner whose `original` modules compute as `faulty` (same stored buffers, a different kernel)."""

    class Runner(TorchRunner):
        def __init__(self, *args):
            super().__init__(*args)
            for module in self.model.modules():
                if type(module) is original:
                    module.__class__ = faulty

    Runner.__name__ = f"{faulty.__name__}Runner"
    return Runner


def kernel_fault(name: str, original: type, faulty: type, quant: str) -> Fault:
    return Fault(name, "quantization", faulty.__doc__, SUITE, "dequantize_then_matmul",
                 KERNEL_DIFFERS.format(quant=quant), backend=planted(name, swapping_runner(original, faulty)),
                 args=("--quant", quant), outcomes={"failed": 1})


FAULTS = [
    kernel_fault("fp8-scales-wrong-axis", Fp8Linear, ScalesOnInputAxisFp8, "fp8"),
    kernel_fault("int4-zero-point-off-by-one", Int4Linear, ZeroPointOffByOneInt4, "int4-block32"),
    kernel_fault("int4-groups-shifted", Int4Linear, ShiftedGroupsInt4, "int4-block32"),
    kernel_fault("int4-nibbles-swapped", Int4Linear, SwappedNibblesInt4, "int4-block128"),
    Fault("kv-int8-clips", "quantization", clipping_quantize.__doc__, SUITE, "kv_quantizer",
          "*the KV quantizer moves an element by more than half a step*",
          backend=planted("kv-int8-clips", ClippingKVRunner), args=("--quant", "int8-kv"), outcomes={"failed": 1}),
]
