"""Reference backends with one planted quantization fault each; tests/test_quantization_faults.py shows that
suites/test_quantization.py fails on every one of them."""
from __future__ import annotations

import torch

from backends.quant.formats import INT4_ZERO_POINT, Int8Channels
from backends.strategies import Quant
from backends.torch_ref.backend import TorchBackend, TorchRunner
from backends.torch_ref.quantize import Fp8Linear, Int4Linear, Int8KVCache, unpack_nibbles


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


def clipping_quantize(x: torch.Tensor) -> Int8Channels:
    """Scales from the mean magnitude (3 x mean / 127): outliers are clipped to the largest code."""
    scales = 3 * x.float().abs().mean(-1, keepdim=True) / 127
    codes = torch.round(x.float() / torch.where(scales == 0, 1, scales)).clamp(-127, 127).to(torch.int8)
    return Int8Channels(codes, scales)


class ClippingInt8KVCache(Int8KVCache):
    quantize = staticmethod(clipping_quantize)


def swapping_runner(original: type, faulty: type) -> type[TorchRunner]:
    """A runner whose `original` modules compute as `faulty` (same stored buffers, a different kernel)."""

    class Runner(TorchRunner):
        def __init__(self, *args):
            super().__init__(*args)
            for module in self.model.modules():
                if type(module) is original:
                    module.__class__ = faulty

    return Runner


class ClippingKVRunner(TorchRunner):
    def new_cache(self, batch_size, capacity):
        if self.strategy.quant == Quant.INT8_KV:
            return ClippingInt8KVCache(self.config, batch_size, capacity, self.device)
        return super().new_cache(batch_size, capacity)


def planted(name: str, runner_cls: type[TorchRunner]) -> type[TorchBackend]:
    return type(f"Planted{name.title().replace('-', '')}", (TorchBackend,), {"name": name, "runner_class": runner_cls})


PLANTED = {
    "scales-wrong-axis": planted("scales-wrong-axis", swapping_runner(Fp8Linear, ScalesOnInputAxisFp8)),
    "zero-point-off-by-one": planted("zero-point-off-by-one", swapping_runner(Int4Linear, ZeroPointOffByOneInt4)),
    "groups-shifted": planted("groups-shifted", swapping_runner(Int4Linear, ShiftedGroupsInt4)),
    "kv-clips": planted("kv-clips", ClippingKVRunner),
}
