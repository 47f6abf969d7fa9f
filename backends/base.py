"""The adapter contract every backend implements.

A backend loads a checkpoint under a named strategy and returns a `ModelRunner`. The runner makes
KV caches and runs tokens through the model. Batches are ragged from the start: each row has its
own positions, its own cache length and its own padding, so left padding, continuous batching and
speculative verification need no new primitive.

Cache semantics (every backend): a cache holds `capacity` slots per row. `forward` appends the T
new tokens of row b at slots `lengths[b] .. lengths[b] + T - 1`, applies the positions given
(not the slot numbers), and a query at slot s attends to the valid slots <= s of its own row.
`truncate` rolls rows back (speculative rejection), `reset` empties rows for reuse by another sequence.
Writing past `capacity` raises CacheFullError. An engine that derives positions and padding from the tokens it holds
declares neither `explicit-positions` nor `padding-mask` and refuses, in one line naming the capability, positions
that do not continue each row from its length or a mask with padding.

Serving (backends/serving/) needs two more abilities, each a declared capability with its own small ABC:

- `PackedStepRunner.forward_packed` (capability `batching:continuous`): one step whose tokens come from
  several rows at once, packed into one dimension with a row and a position per token (vLLM's flattened
  batch, FlashAttention's varlen): a prefill chunk of one row beside single decode tokens of others, with no
  padding computed or stored. Row r's tokens in the step are appended, in order, at `lengths[r]`, ...
- `PagedRunner` (capabilities `batching:paged`, `batching:paged-prefix`): a pool of fixed-size KV blocks
  (`new_paged_cache`) and `forward_paged`, which reads and writes each sequence's K/V through its block
  table (the blocks holding its logical slots 0, 1, ... in order). The runner owns no per-sequence state: the
  block manager above it decides which blocks a sequence holds and how many tokens it has.
  `PagedKVCache.copy_blocks` copies whole blocks (copy-on-write of a block that parallel samples shared).

Every backend runs `batching:sequential` and `batching:static` with the core methods alone.

A peer engine with its own speculative decoding (transformers' assisted generation) declares
`speculative:native` and implements `NativeSpeculativeRunner`, so the speculative bench can time it beside
backends/algorithms/speculative.py on the same prompts and draft.
"""
from __future__ import annotations

import importlib

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from .checkpoint import Checkpoint, ModelConfig
from .strategies import Execution, Quant, Strategy


class CacheFullError(RuntimeError):
    """More tokens were given than the cache has slots for."""


class UnsupportedModel(ValueError):
    """The backend cannot express this model configuration or strategy; the message says what."""


class BackendUnavailable(UnsupportedModel):
    """A package the backend needs is not installed (the plugin reports it as a skip naming the package)."""


def import_package(module: str, package: str | None = None):
    """Import `module`, or raise BackendUnavailable naming the package that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = package or module
        raise BackendUnavailable(f"{package} is not installed ({error}); pip install {package}") from None


class KVCache(ABC):
    """Per-row key/value storage owned by one runner."""

    @property
    @abstractmethod
    def capacity(self) -> int:
        """Slots per row."""

    @property
    @abstractmethod
    def lengths(self) -> torch.Tensor:
        """(B,) int64: slots filled in each row (padding included)."""

    @abstractmethod
    def truncate(self, lengths: torch.Tensor) -> None:
        """Roll each row back to `lengths[b]` slots (never forward)."""

    @abstractmethod
    def reset(self, rows: torch.Tensor) -> None:
        """Empty the given rows (length 0, no valid slot), so a new sequence can take them over."""

    @property
    @abstractmethod
    def allocated_bytes(self) -> int:
        """Bytes of the key/value tensors actually allocated."""

    @property
    @abstractmethod
    def element_bytes(self) -> int:
        """Bytes per stored key or value element (4 for fp32, 2 for bf16/fp16, ...)."""

    def check_room(self, n_new: int) -> None:
        longest = int(self.lengths.max()) if self.lengths.numel() else 0
        if longest + n_new > self.capacity:
            raise CacheFullError(
                f"KV cache full: a row holds {longest} of {self.capacity} slots and {n_new} more tokens were given"
            )


class ModelRunner(ABC):
    """A model loaded by a backend under one strategy."""

    def __init__(self, checkpoint: Checkpoint, strategy: Strategy):
        self.checkpoint = checkpoint
        self.strategy = strategy

    @property
    def config(self) -> ModelConfig:
        return self.checkpoint.config

    @property
    def implementation(self) -> str:
        """What computes this strategy (a library's method, a kernel, dequantize-then-matmul): a table column."""
        return f"{type(self).__name__} {self.strategy.quant.value}"

    @abstractmethod
    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """An empty cache for `batch_size` rows of `capacity` slots each."""

    @abstractmethod
    def forward(
        self,
        cache: KVCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run (B, T) new tokens at (B, T) positions, write their K/V into `cache`, return (B, T, V) fp32 logits.

        `token_mask` (B, T) bool marks real tokens; False slots (padding) are written but never attended to.
        """

    @abstractmethod
    def forward_full(
        self, tokens: torch.Tensor, positions: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The oracle path: the whole (B, T) sequence with no cache, returning (B, T, V) fp32 logits."""


class PackedStepRunner(ABC):
    """Capability `batching:continuous`: mixed prefill/decode steps over a contiguous cache, without padding."""

    @abstractmethod
    def forward_packed(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                       rows: torch.Tensor) -> torch.Tensor:
        """Run N packed tokens, (N,) each: token i belongs to cache row `rows[i]` at position `positions[i]`.

        A row's tokens are appended in the order they appear, at slots lengths[row], lengths[row] + 1, ...;
        rows absent from `rows` are untouched. Returns (N, V) fp32 logits.
        """


class NativeSpeculativeRunner(ABC):
    """Capability `speculative:native`: the engine's own greedy generation, plain or speculative."""

    @abstractmethod
    def generate_native(self, prompt: list[int], max_new_tokens: int, k: int = 0,
                        draft: ModelRunner | None = None) -> list[int]:
        """Exactly max_new_tokens greedy tokens after `prompt` by the engine's own generate loop: plainly (k = 0),
        with k draft tokens per round from `draft` (a runner of this backend), or, without a draft, by prompt
        lookup with k tokens per round."""


class PagedKVCache(ABC):
    """A pool of `n_blocks` blocks of `block_size` slots each, shared by every sequence through block tables.

    The addressing of `PagedRunner.forward_paged` is written here once, for every backend: `new_token_slots`
    checks a step's block tables and places its tokens, `physical_slots` resolves logical slots to pool slots."""

    def __init__(self, n_blocks: int, block_size: int):
        self.n_blocks, self.block_size = n_blocks, block_size

    @property
    @abstractmethod
    def allocated_bytes(self) -> int:
        """Bytes of the key/value pool actually allocated."""

    @abstractmethod
    def copy_blocks(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy every slot (keys, values, positions) of blocks `source` (K,) into blocks `target` (K,), pair by pair;
        no target is a source."""

    def block_slots(self, blocks: torch.Tensor) -> torch.Tensor:
        """The pool slots (K * block_size,) of blocks (K,), block by block."""
        return (blocks[:, None] * self.block_size + torch.arange(self.block_size, device=blocks.device)).flatten()

    def physical_slots(self, tables: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
        """Pool slots of logical slots (..., S) through the block tables (..., M) of their sequences."""
        blocks = tables.gather(-1, logical // self.block_size)
        return blocks * self.block_size + logical % self.block_size

    def slot_mapping(self, tables: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
        """Pool slots (N,) where new tokens at logical slots (N,) are written (vLLM's slot mapping)."""
        return self.physical_slots(tables, logical[:, None])[:, 0]

    def new_token_slots(self, seqs: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For forward_paged's packed tokens: each token's logical slot (N,), each sequence's token count in the step
        (R,), and the block tables cut to the blocks the longest context needs, entries past a sequence's end set
        to block 0 (a reader masks them). A table that lacks a block its context needs is a ValueError."""
        rank, counts = rank_within(seqs, block_tables.shape[0])
        logical = context_lens[seqs] - counts[seqs] + rank  # (N,)
        width = int(-(-int(context_lens[seqs].max()) // self.block_size))  # blocks the longest sequence needs
        tables = block_tables[:, :width]
        needed = torch.arange(width, device=seqs.device)[None, :] * self.block_size < context_lens[:, None]
        if bool(((tables < 0) | (tables >= self.n_blocks))[needed & (counts[:, None] > 0)].any()):
            raise ValueError(f"block tables {block_tables.tolist()} lack a valid block for context lengths "
                             f"{context_lens.tolist()} in a pool of {self.n_blocks} blocks")
        return logical, counts, tables.clamp(min=0)


def rank_within(groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed items (N,) of `groups`: each item's rank among the earlier items of its group, and each
    group's count (n_groups,)."""
    one_hot = torch.nn.functional.one_hot(groups, n_groups)  # (N, n_groups)
    rank = one_hot.cumsum(dim=0).gather(1, groups[:, None])[:, 0] - 1
    return rank, one_hot.sum(dim=0)


class PagedRunner(ABC):
    """Capabilities `batching:paged` and `batching:paged-prefix`: a KV cache in blocks addressed by block tables."""

    @abstractmethod
    def new_paged_cache(self, n_blocks: int, block_size: int, fill: float = 0.0) -> PagedKVCache:
        """A pool of `n_blocks` x `block_size` slots, every slot's keys and values set to `fill` (tests use NaN,
        so a read of a slot no sequence wrote shows up in the logits)."""

    @abstractmethod
    def forward_paged(self, cache: PagedKVCache, tokens: torch.Tensor, positions: torch.Tensor, seqs: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """Run N packed tokens (N,) of R sequences; returns (N, V) fp32 logits.

        Token i belongs to sequence `seqs[i]`; `block_tables` (R, M) int64 lists each sequence's blocks in
        logical order (-1 past its last); `context_lens` (R,) is how many tokens each sequence holds once this
        step's are written. A sequence's tokens in the step are its last ones, in order: the k-th of c new
        tokens sits at logical slot context_len - c + k, physical slot block_tables[seq, slot // block_size] *
        block_size + slot % block_size. Each query attends to its sequence's slots up to its own.
        """


class Backend(ABC):
    """A named inference engine. Subclasses are registered with `backends.registry.register`."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def capabilities(cls) -> frozenset[str]:
        """Names of optional abilities: 'quant:<name>', 'attention:<name>', 'position:<name>', features."""

    @abstractmethod
    def load(self, checkpoint: Checkpoint, strategy: Strategy) -> ModelRunner:
        """Load `checkpoint` under `strategy`; raise UnsupportedModel naming what cannot be expressed."""

    @classmethod
    def check_strategy(cls, strategy: Strategy) -> None:
        """Raise UnsupportedModel in one line naming what the strategy needs and the quantizations offered."""
        missing = cls.missing(*strategy_capabilities(strategy))
        if missing:
            offered = [q.value for q in Quant if f"quant:{q.value}" in cls.capabilities()]
            raise UnsupportedModel(f"backend {cls.name!r} lacks {', '.join(missing)}; "
                                   f"its quantization strategies: {', '.join(offered)}")

    @classmethod
    def missing(cls, *needed: str) -> list[str]:
        """The capabilities among `needed` that this backend lacks."""
        have = cls.capabilities()
        return [name for name in needed if name not in have]


def strategy_capabilities(strategy: Strategy) -> list[str]:
    """The capability names a strategy needs."""
    needed = [f"quant:{strategy.quant.value}"]
    if strategy.attention is not None:
        needed.append(f"attention:{strategy.attention.value}")
    if strategy.execution != Execution.EAGER:
        needed.append(f"execution:{strategy.execution.value}")
    return needed
