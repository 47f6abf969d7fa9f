"""Batching faults: a runner or cache with one change, or one function of the block manager swapped for a faulty
copy; suites/test_batching.py on tiny-random (the outcomes below are for that model, whatever the default is)."""
from __future__ import annotations

import hashlib

import torch

from backends.algorithms.serving import block_manager, runner
from backends.onnxrt import OnnxRuntimeBackend
from backends.onnxrt.paged import OrtPagedKVCache
from backends.onnxrt.runner import OrtRunner
from backends.torch_ref.model import TorchPagedKVCache
from backends.torch_ref.backend import TorchRunner

from . import Fault
from .kv_cache import planted

SUITE = "suites/test_batching.py"
MODEL = ("--model", "tiny-random")


def batching(*names: str) -> tuple[str, ...]:
    return (*MODEL, *(arg for name in names for arg in ("--batching", name)))


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


class GatherOffByOneCache(OrtPagedKVCache):
    """onnxrt's paged graph gathers each sequence's keys and values through the block-table entry after the right
    one (writes are right): a block-table off-by-one in the gather."""

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


def hash_without_parent(monkeypatch):
    """A block is identified by its own tokens alone: a prompt whose first block equals another's second block
    takes that block (computed after another block, at other positions)."""
    monkeypatch.setattr(block_manager, "block_hash",
                        lambda parent, tokens, salt: hashlib.sha256(repr((tokens, salt)).encode()).digest())


def hash_without_salt(monkeypatch):
    """The block hash leaves out the salt: another model serving the same prompts takes the first model's blocks."""
    monkeypatch.setattr(block_manager, "block_hash",
                        lambda parent, tokens, salt: hashlib.sha256(repr((parent, tokens)).encode()).digest())


def blocks_never_released(monkeypatch):
    """A finished (or preempted) sequence's blocks are never given back."""
    monkeypatch.setattr(block_manager.BlockManager, "release", lambda self, seq: None)


def copy_on_write_skipped(monkeypatch):
    """Parallel samples write their first tokens into the prompt's shared partial block (no copy on write): each
    overwrites the others' keys and values at the same slots."""
    monkeypatch.setattr(block_manager.BlockManager, "copy_on_write", lambda self, seq, index: None)


def shared_block_reference_kept(monkeypatch):
    """Copy-on-write gives the sample its own block but never drops its reference to the shared one, which
    therefore outlives every sequence (a leak)."""
    def copy_on_write(self, seq, index):
        table = self.tables[seq]
        private = self.take()
        self.pending_copies.append((table[index], private))
        table[index] = private
        self.copies_on_write += 1

    monkeypatch.setattr(block_manager.BlockManager, "copy_on_write", copy_on_write)


def logits_of_the_token_before_the_last(monkeypatch):
    """Packed steps take each chunk's logits one token early (the index of its last token off by one), so a prefill
    chunk samples from its second-to-last token and a decode token from the previous sequence's."""
    faithful = runner.packed_inputs

    def packed_inputs(chunks):
        tokens, positions, last = faithful(chunks)
        return tokens, positions, [max(index - 1, 0) for index in last]

    monkeypatch.setattr(runner, "packed_inputs", packed_inputs)


FAULTS = [
    Fault("onnxrt-gather-off-by-one", "batching", GatherOffByOneCache.__doc__, SUITE, "paged_step or random-arrivals",
          "FAILED *test_batching.py::test_paged_step_matches_contiguous*", backend=PlantedGatherOffByOne,
          base_backend="onnxrt", args=batching("paged"), outcomes={"failed": 2}),
    Fault("block-table-off-by-one", "batching", BlockTableOffByOneCache.__doc__, SUITE,
          "paged_step or random-arrivals", "FAILED *test_batching.py::test_paged_step_matches_contiguous*",
          backend=planted("block-table-off-by-one", BlockTableOffByOneRunner), args=batching("paged"),
          outcomes={"failed": 2}),
    Fault("row-not-reset", "batching", RowNotResetRunner.__doc__, SUITE, "random-arrivals",
          "FAILED *test_batching.py::test_each_request_as_alone* - *tokens * differ from its tokens alone*",
          backend=planted("row-not-reset", RowNotResetRunner), args=batching("continuous"), outcomes={"failed": 1}),
    Fault("prefix-hash-ignores-parent", "batching", hash_without_parent.__doc__, SUITE, "prefix_cache",
          "*a block equal to another's second block was taken for a first block*", patch=hash_without_parent,
          args=MODEL, outcomes={"failed": 1}),
    Fault("prefix-hash-ignores-salt", "batching", hash_without_salt.__doc__, SUITE, "salt",
          "*the other model found * tokens of the first model's blocks in the cache*", patch=hash_without_salt,
          args=MODEL, outcomes={"failed": 1}),
    Fault("blocks-never-released", "batching", blocks_never_released.__doc__, SUITE, "random-arrivals or burst",
          "*blocks still held after every request finished*", patch=blocks_never_released,
          args=batching("paged"), outcomes={"failed": 2}),
    Fault("copy-on-write-skipped", "batching", copy_on_write_skipped.__doc__, SUITE, "parallel_samples",
          "*sample * of * (parallel samples: the prompt's blocks shared, copy-on-write)*differ*",
          patch=copy_on_write_skipped, args=batching("paged"), outcomes={"failed": 2}),
    Fault("shared-block-reference-kept", "batching", shared_block_reference_kept.__doc__, SUITE, "parallel_samples",
          "*block reference counts disagree with the block tables*", patch=shared_block_reference_kept,
          args=batching("paged"), outcomes={"failed": 2}),
    Fault("packed-logits-one-token-early", "batching", logits_of_the_token_before_the_last.__doc__, SUITE,
          "arrives-during-prefill", "FAILED *test_batching.py::test_each_request_as_alone* - *differ from its tokens*",
          patch=logits_of_the_token_before_the_last, args=batching("continuous", "paged")),
]
