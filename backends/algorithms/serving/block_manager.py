"""KV memory owners: which sequence holds which part of the cache. No tensors here: the runner holds the cache.

Both owners answer the scheduler through the same calls, by sequence id:
`admit(seq, tokens)` takes memory for a new (or preempted, re-admitted) sequence and returns how many of its
tokens are already computed (a prefix-cache hit) or None when it cannot be admitted now; `grow(seq, start, end)`
makes room for writing slots start..end-1, False when memory is short; `computed(seq, tokens, n)` is told n
tokens are now in the cache; `release(seq)` gives everything back. Only a pool that `shares_blocks` is asked to
`fork(parent, child)`; `take_copies()` hands the runner the block copies to make before the next step.

- `RowPool`: the contiguous cache of `continuous`: one row of max_seq_len slots reserved per sequence.
- `BlockManager`: the block pool of `paged` (vLLM's PagedAttention): blocks taken on demand, freed on
  release, reference-counted. A request's parallel samples share its prompt's blocks, the last partial one
  too (`fork`); the first time a sample writes into a block others still hold, it gets a block of its own, the
  runner copies the shared block's keys and values into it, and the shared block loses that reference
  (copy-on-write). With prefix caching, each full block is identified by a hash of its tokens chained with its
  parent's hash and salted with model and strategy; a cached block no sequence references stays in the cache
  until a least-recently-used eviction reuses it. A full block is never written again.
"""
from __future__ import annotations

import hashlib
import random
from collections import OrderedDict, deque
from typing import Hashable

SequenceId = Hashable  # the scheduler's (request id, sample)


class RowPool:
    shares_blocks = False  # a row is one sequence's alone

    def __init__(self, n_rows: int):
        self.free_rows = list(range(n_rows))
        self.rows: dict[SequenceId, int] = {}  # sequence id -> row

    def admit(self, seq: SequenceId, tokens: list[int]) -> int | None:
        if not self.free_rows:
            return None
        self.rows[seq] = self.free_rows.pop(0)  # the lowest free row: running rows stay close together
        return 0

    def grow(self, seq: SequenceId, start: int, end: int) -> bool:
        return True  # the row was reserved at its full length on admission

    def computed(self, seq: SequenceId, tokens: list[int], n_computed: int) -> None:
        pass

    def release(self, seq: SequenceId) -> None:
        self.free_rows.append(self.rows.pop(seq))
        self.free_rows.sort()

    def take_copies(self) -> list[tuple[int, int]]:
        return []


def block_hash(parent: bytes | None, tokens: tuple[int, ...], salt: str) -> bytes:
    """The identity of a full block: its tokens, everything before it (through the parent's hash), the salt."""
    return hashlib.sha256(repr((parent, tokens, salt)).encode()).digest()


class BlockManager:
    shares_blocks = True

    def __init__(self, n_blocks: int, block_size: int, prefix_caching: bool = False, salt: str = "",
                 order_seed: int | None = None):
        self.n_blocks, self.block_size = n_blocks, block_size
        self.prefix_caching, self.salt = prefix_caching, salt
        order = list(range(n_blocks))
        if order_seed is not None:
            random.Random(order_seed).shuffle(order)
        self.free: deque[int] = deque(order)
        self.ref_counts = [0] * n_blocks
        self.tables: dict[SequenceId, list[int]] = {}  # sequence id -> its blocks in logical order
        self.hashes: dict[SequenceId, list[bytes]] = {}  # sequence id -> hashes of its full blocks so far
        self.cached: dict[bytes, int] = {}  # hash -> block (the prefix cache)
        self.block_hashes: dict[int, bytes] = {}  # block -> its hash, for cached blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence holds, oldest first
        self.pending_copies: list[tuple[int, int]] = []  # (shared block, private copy) for the runner to make
        self.hit_tokens = 0
        self.evictions = 0
        self.copies_on_write = 0

    # --- the scheduler's calls ---------------------------------------------------------------------

    def admit(self, seq: SequenceId, tokens: list[int]) -> int | None:
        self.tables[seq], self.hashes[seq] = [], []
        if not self.prefix_caching:
            return 0
        # at most len - 1 tokens come from the cache: the last one is always computed, for its logits
        for start in range(0, len(tokens) - 1 - self.block_size + 1, self.block_size):
            parent = self.hashes[seq][-1] if self.hashes[seq] else None
            digest = block_hash(parent, tuple(tokens[start: start + self.block_size]), self.salt)
            block = self.cached.get(digest)
            if block is None:
                break
            self.acquire(block)
            self.tables[seq].append(block)
            self.hashes[seq].append(digest)
        cached = len(self.tables[seq]) * self.block_size
        self.hit_tokens += cached
        return cached

    def grow(self, seq: SequenceId, start: int, end: int) -> bool:
        """Room for writing slots start..end-1 in blocks `seq` alone holds. Only the block holding `start` can be
        both held and shared with room left (a forked prompt's last block): it is copied on write."""
        table = self.tables[seq]
        index = start // self.block_size
        shared = index < len(table) and self.ref_counts[table[index]] > 1
        new = -(-end // self.block_size) - len(table)
        if new + shared > len(self.free) + len(self.evictable):
            return False
        if shared:
            self.copy_on_write(seq, index)
        for _ in range(new):
            table.append(self.take())
        return True

    def fork(self, parent: SequenceId, child: SequenceId) -> None:
        """`child` holds every block of `parent` so far, each with one reference more (parallel sampling)."""
        self.tables[child], self.hashes[child] = list(self.tables[parent]), list(self.hashes[parent])
        for block in self.tables[child]:
            self.acquire(block)

    def copy_on_write(self, seq: SequenceId, index: int) -> None:
        """Give `seq` a private block in place of the shared one at `index` of its table; the runner copies the
        shared block's keys and values into it before the step, and the shared block loses this reference."""
        table = self.tables[seq]
        shared, private = table[index], self.take()
        self.ref_counts[shared] -= 1
        table[index] = private
        self.pending_copies.append((shared, private))
        self.copies_on_write += 1

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def computed(self, seq: SequenceId, tokens: list[int], n_computed: int) -> None:
        """Register the blocks that `n_computed` tokens have filled, each chained to its parent's hash."""
        if not self.prefix_caching:
            return
        hashes, table = self.hashes[seq], self.tables[seq]
        for index in range(len(hashes), n_computed // self.block_size):
            parent = hashes[-1] if hashes else None
            start = index * self.block_size
            digest = block_hash(parent, tuple(tokens[start: start + self.block_size]), self.salt)
            hashes.append(digest)
            if digest not in self.cached:  # else an equal block is cached already; this one stays private
                self.cached[digest] = table[index]
                self.block_hashes[table[index]] = digest

    def release(self, seq: SequenceId) -> None:
        table = self.tables.pop(seq)
        # a copy into a block given back (its sequence preempted in the step that made it) is not made
        self.pending_copies = [(src, dst) for src, dst in self.pending_copies if dst not in table]
        # last block first: when the pool runs short, a sequence's tail is evicted before its shared head
        for block in reversed(table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self.block_hashes:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
        del self.hashes[seq]

    # --- blocks ------------------------------------------------------------------------------------

    def acquire(self, block: int) -> None:
        self.ref_counts[block] += 1
        self.evictable.pop(block, None)

    def take(self) -> int:
        """A free block, else the least recently released cached one (its cache entry dropped)."""
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hashes.pop(block)]
            self.evictions += 1
        self.ref_counts[block] = 1
        return block

    def accounting(self) -> dict[str, int]:
        """Each block is in exactly one state: free, cached and unreferenced, or held by sequences. Raises
        if the books do not balance (a block lost, in two states, or a reference count that no table explains)."""
        held = [0] * self.n_blocks
        for table in self.tables.values():
            for block in table:
                held[block] += 1
        if held != self.ref_counts:
            wrong = [b for b in range(self.n_blocks) if held[b] != self.ref_counts[b]]
            raise AssertionError(f"block reference counts disagree with the block tables at blocks {wrong[:8]}")
        free, evictable = set(self.free), set(self.evictable)
        referenced = {b for b in range(self.n_blocks) if held[b]}
        states = len(free) + len(evictable) + len(referenced)
        if states != self.n_blocks or free & evictable or (free | evictable) & referenced:
            raise AssertionError(f"{self.n_blocks} blocks, but {len(free)} free + {len(evictable)} cached unreferenced "
                                 f"+ {len(referenced)} held (overlapping or lost)")
        return {"blocks": self.n_blocks, "free": len(free), "cached_unreferenced": len(evictable),
                "held": len(referenced), "cached": len(self.cached), "evictions": self.evictions,
                "copies_on_write": self.copies_on_write}

    @property
    def held(self) -> int:
        """Blocks some sequence holds (a block shared by several counts once)."""
        return self.n_blocks - len(self.free) - len(self.evictable)
