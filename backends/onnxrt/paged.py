"""Paged KV on ONNX Runtime (capabilities `batching:paged`, `batching:paged-prefix`): the block pool and the
session of the paged graph (paged_graph.py).

The pool keeps one OrtValue per layer and kind, (n_blocks * block_size, Hkv, D), filled once with the caller's
value; each step binds it as both the pool input and the present output, so the new keys and values are scattered
in place. The host resolves each step's block tables to pool slots (base.PagedKVCache) and keeps the position each
slot holds, as backends/torch_ref/model.TorchPagedKVCache does.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from backends.base import PagedKVCache
from backends.checkpoint import Checkpoint
from backends.strategies import Strategy

from .graph import layer_names
from .paged_graph import input_names, output_names
from .runner import ELEMENT_TYPES, open_variant, run_in_place


class OrtPagedKVCache(PagedKVCache):
    """A pool any runner of a model of the same shape can use (models sharing a pool and its prefix cache)."""

    def __init__(self, session: PagedSession, n_blocks: int, block_size: int, fill: float):
        cfg = session.config
        shape = (n_blocks * block_size, cfg.n_kv_heads, cfg.head_dim)
        self.dtype = session.pool_dtype
        self.values = [ort.OrtValue.ortvalue_from_numpy(np.full(shape, fill, self.dtype), session.device, 0)
                       for _ in session.pool_names]
        self.slot_positions = torch.zeros(n_blocks * block_size, dtype=torch.long)
        self.bindings: dict = {}  # (session, rows) -> (its binding of this pool, its other inputs): run_in_place
        super().__init__(n_blocks, block_size)

    @property
    def allocated_bytes(self) -> int:
        return sum(int(np.prod(value.shape())) for value in self.values) * np.dtype(self.dtype).itemsize

    def copy_blocks(self, source: torch.Tensor, target: torch.Tensor) -> None:
        source, target = self.block_slots(source.cpu()).numpy(), self.block_slots(target.cpu()).numpy()
        for value in self.values:
            pool = value.numpy()  # a view of a CPU pool; a host copy of a device pool, written back below
            pool[target] = pool[source]
            if value.device_name().lower() != "cpu":
                value.update_inplace(pool)
        self.slot_positions[torch.from_numpy(target)] = self.slot_positions[torch.from_numpy(source)]

    def key_slots(self, tables: torch.Tensor, span: int) -> torch.Tensor:
        """(N, span) pool slots of logical slots 0 .. span-1 through each token's sequence's table (N, M)."""
        return self.physical_slots(tables, torch.arange(span).expand(tables.shape[0], span))


class PagedSession:
    """An onnxruntime session of the paged graph of one checkpoint under one strategy."""

    def __init__(self, checkpoint: Checkpoint, strategy: Strategy):
        self.config = checkpoint.config
        self.session = open_variant(checkpoint, strategy, "paged", input_names(self.config), output_names(self.config))
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.pool_names = layer_names(self.config, "pool")
        self.present_names = layer_names(self.config, "present_pool")
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.pool_dtype = ELEMENT_TYPES[inputs[self.pool_names[0]].type]

    def check_pool(self, cache) -> None:
        cfg = self.config
        shape = [cfg.n_kv_heads, cfg.head_dim]
        if not (isinstance(cache, OrtPagedKVCache) and len(cache.values) == len(self.pool_names)
                and cache.dtype == self.pool_dtype and cache.values[0].shape()[1:] == shape):
            raise TypeError(f"cache of type {type(cache).__name__} is not an onnxrt block pool of this model's shape "
                            f"({len(self.pool_names)} tensors of (slots, {shape[0]}, {shape[1]}) "
                            f"{self.pool_dtype.__name__})")

    def run(self, cache: OrtPagedKVCache, tokens, positions, seqs, block_tables, context_lens) -> torch.Tensor:
        """forward_paged (base.py): (N,) packed tokens -> (N, V) logits, one run of the paged graph per group of
        sequences that bring the same number of tokens. The logits are gathered in numpy: torch's threads, woken
        for the copy, would wait for cores onnxruntime's threads still spin on after a run."""
        self.check_pool(cache)
        tokens, positions, seqs, block_tables, context_lens = (
            x.cpu().long() for x in (tokens, positions, seqs, block_tables, context_lens))
        logical, counts, tables = cache.new_token_slots(seqs, block_tables, context_lens)
        new_slots = cache.slot_mapping(tables[seqs], logical)  # (N,)
        cache.slot_positions[new_slots] = positions
        order = torch.argsort(seqs, stable=True)  # by sequence, each sequence's tokens in their order
        first = counts.cumsum(0) - counts  # where each sequence's tokens start in `order`
        logits = np.empty((len(tokens), self.config.vocab_size), np.float32)
        for count in counts.unique().tolist():
            if count == 0:  # sequences the step brings no tokens of
                continue
            group = (counts == count).nonzero()[:, 0]
            index = order[first[group, None] + torch.arange(count)]  # (b, T) the group's tokens
            span = int(context_lens[group].max())
            key_slots = cache.key_slots(tables[group], span)  # (b, S)
            feeds = {"input_ids": tokens[index], "position_ids": positions[index], "slot_mapping": new_slots[index],
                     "key_slots": key_slots,  # its sequence's slots up to its own:
                     "key_allowed": torch.arange(span)[None, None, :] <= logical[index][:, :, None],
                     "key_position_ids": cache.slot_positions[key_slots]}
            out = run_in_place(self.session, feeds, list(zip(self.pool_names, self.present_names, cache.values)),
                               cache.bindings, (*index.shape, self.config.vocab_size))
            logits[index.numpy()] = out.numpy()
        return torch.from_numpy(logits)
