"""The onnxrt backend with one planted fault each: the cross-backend suite must fail on every one.

Each wraps the real runner and changes one thing on the way in or out, as a bug in an engine would.
"""
from __future__ import annotations

import torch

from backends.base import ModelRunner
from backends.onnxrt import OnnxRuntimeBackend
from backends.onnxrt.paged import OrtPagedKVCache
from backends.onnxrt.runner import OrtRunner
from backends.strategies import Quant


class WrappedRunner(ModelRunner):
    def __init__(self, inner: ModelRunner):
        super().__init__(inner.checkpoint, inner.strategy)
        self.inner = inner

    def new_cache(self, batch_size, capacity):
        return self.inner.new_cache(batch_size, capacity)

    def forward(self, cache, tokens, positions, token_mask=None):
        return self.inner.forward(cache, tokens, positions, token_mask)

    def forward_full(self, tokens, positions, token_mask=None):
        return self.inner.forward_full(tokens, positions, token_mask)


class ShiftedPositions(WrappedRunner):
    """Tokens after the first cached call get their position plus one (a cache-offset bug)."""

    def forward(self, cache, tokens, positions, token_mask=None):
        shift = 1 if int(cache.lengths.max()) > 0 else 0
        return self.inner.forward(cache, tokens, positions + shift, token_mask)


class IgnoresPadding(WrappedRunner):
    """The padding mask is dropped, so real tokens attend to the left padding."""

    def forward(self, cache, tokens, positions, token_mask=None):
        return self.inner.forward(cache, tokens, positions, None)


class ScrambledLowPrecision(WrappedRunner):
    """Lossy strategies return the vocabulary columns in a wrong order (output channels misplaced by a
    quantizer); fp32 is left right, so only the lossy-strategy rules can catch it."""

    def forward(self, cache, tokens, positions, token_mask=None):
        return self.scramble(self.inner.forward(cache, tokens, positions, token_mask))

    def forward_full(self, tokens, positions, token_mask=None):
        return self.scramble(self.inner.forward_full(tokens, positions, token_mask))

    def scramble(self, logits: torch.Tensor) -> torch.Tensor:
        if self.strategy.quant == Quant.FP32:
            return logits
        order = torch.randperm(logits.shape[-1], generator=torch.Generator().manual_seed(0))
        return logits[..., order]


def planted(name: str, runner_cls: type[WrappedRunner]) -> type[OnnxRuntimeBackend]:
    def load(self, checkpoint, strategy):
        return runner_cls(OnnxRuntimeBackend.load(self, checkpoint, strategy))

    return type(f"Planted{runner_cls.__name__}", (OnnxRuntimeBackend,), {"name": name, "load": load})


class GatherOffByOneCache(OrtPagedKVCache):
    """The paged graph gathers each query's keys and values through the block-table entry after the right one
    (writes are right): a block-table off-by-one in the gather."""

    def key_slots(self, tables, span):
        shifted = torch.cat([tables[:, 1:], tables[:, -1:]], dim=1)
        return super().key_slots(shifted, span)


class GatherOffByOneRunner(OrtRunner):
    paged_cache_class = GatherOffByOneCache


class PlantedGatherOffByOne(OnnxRuntimeBackend):
    name = "onnxrt-gather-off-by-one"

    def load(self, checkpoint, strategy):
        runner = OnnxRuntimeBackend.load(self, checkpoint, strategy)
        return GatherOffByOneRunner(runner.checkpoint, runner.strategy, runner.path)


PLANTED = {
    "onnxrt-shifted-positions": planted("onnxrt-shifted-positions", ShiftedPositions),
    "onnxrt-ignores-padding": planted("onnxrt-ignores-padding", IgnoresPadding),
    "onnxrt-scrambled-lowp": planted("onnxrt-scrambled-lowp", ScrambledLowPrecision),
    "onnxrt-gather-off-by-one": PlantedGatherOffByOne,
}
