"""Backends with one planted fault each: the suite meant to catch a fault must fail on it.

Each is the reference backend with a single change; tests/test_planted_faults.py registers them and asserts
which tests of the KV-cache suite fail.
"""
from __future__ import annotations

from backends.torch_ref.backend import TorchBackend, TorchRunner
from backends.torch_ref.model import TorchPagedKVCache


class RopeOffByOneRunner(TorchRunner):
    """Positions of tokens after the first cached call are off by one (a classic cache-offset bug)."""

    def forward(self, cache, tokens, positions, token_mask=None):
        shift = 1 if int(cache.lengths.max()) > 0 else 0
        return super().forward(cache, tokens, positions + shift, token_mask)


class IgnoresPaddingRunner(TorchRunner):
    """The padding mask is dropped: padded slots are attended to."""

    def forward(self, cache, tokens, positions, token_mask=None):
        return super().forward(cache, tokens, positions, None)


class NoRollbackRunner(TorchRunner):
    """truncate() is a no-op: rejected speculative tokens stay in the cache."""

    def new_cache(self, batch_size, capacity):
        cache = super().new_cache(batch_size, capacity)
        cache.truncate = lambda lengths: None
        return cache


def planted(name: str, runner_cls: type[TorchRunner]) -> type[TorchBackend]:
    """A reference backend named `name` whose runner is `runner_cls`."""
    return type(f"Planted{runner_cls.__name__}", (TorchBackend,), {"name": name, "runner_class": runner_cls})


PLANTED = {
    "rope-off-by-one": planted("rope-off-by-one", RopeOffByOneRunner),
    "ignores-padding": planted("ignores-padding", IgnoresPaddingRunner),
    "no-rollback": planted("no-rollback", NoRollbackRunner),
}


class BlockTableOffByOneCache(TorchPagedKVCache):
    """New keys and values are written through the block table entry after the right one (the slot mapping
    indexes the table one block too far; reads are right)."""

    def slot_mapping(self, tables, logical):
        last = tables.shape[1] * self.block_size - 1
        return super().slot_mapping(tables, (logical + self.block_size).clamp(max=last))


class BlockTableOffByOneRunner(TorchRunner):
    def new_paged_cache(self, n_blocks, block_size, fill=0.0):
        return BlockTableOffByOneCache(self.config, n_blocks, block_size, fill, self.dtype, self.device)


class RowNotResetRunner(TorchRunner):
    """reset() does nothing: a row taken over by a new request keeps the length (and the keys) of the last one."""

    def new_cache(self, batch_size, capacity):
        cache = super().new_cache(batch_size, capacity)
        cache.reset = lambda rows: None
        return cache


PLANTED["block-table-off-by-one"] = planted("block-table-off-by-one", BlockTableOffByOneRunner)
PLANTED["row-not-reset"] = planted("row-not-reset", RowNotResetRunner)
