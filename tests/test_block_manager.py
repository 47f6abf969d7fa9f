"""The block manager alone (no model): reference counts, prefix hits, LRU eviction, forks and copy-on-write, its
accounting."""
import pytest

from backends.algorithms.serving.block_manager import BlockManager

BS = 4


def served(manager: BlockManager, seq: int, tokens: list[int]) -> int:
    """Admit, compute every token, release; return the prefix hit."""
    hit = manager.admit(seq, tokens)
    assert manager.grow(seq, hit, len(tokens))
    manager.computed(seq, tokens, len(tokens))
    manager.release(seq)
    return hit


def test_shared_blocks_are_reference_counted():
    manager = BlockManager(8, BS, prefix_caching=True)
    prompt = list(range(1, 10))  # two full blocks and one token
    assert served(manager, 0, prompt) == 0
    assert manager.admit(1, prompt) == 2 * BS and manager.admit(2, prompt) == 2 * BS
    shared = manager.tables[1][:2]
    assert manager.tables[2][:2] == shared
    assert [manager.ref_counts[b] for b in shared] == [2, 2]
    manager.release(1)
    assert [manager.ref_counts[b] for b in shared] == [1, 1]
    manager.release(2)
    assert manager.accounting() == {"blocks": 8, "free": 6, "cached_unreferenced": 2, "held": 0, "cached": 2,
                                    "evictions": 0, "copies_on_write": 0}


def test_least_recently_released_cached_block_is_evicted_first():
    manager = BlockManager(4, BS, prefix_caching=True)
    first, second = [1, 2, 3, 4, 9], [5, 6, 7, 8, 9]
    served(manager, 0, first)  # caches block [1, 2, 3, 4]
    served(manager, 1, second)  # caches block [5, 6, 7, 8], released later
    manager.admit(2, [0])
    assert manager.grow(2, 0, 3 * BS)  # two free blocks, then one eviction: the older cached block
    assert manager.evictions == 1
    assert manager.admit(3, first) == 0 and manager.admit(4, second) == BS


def test_accounting_catches_a_lost_block():
    manager = BlockManager(4, BS)
    manager.admit(0, [1, 2])
    manager.grow(0, 0, 2)
    manager.tables[0].clear()  # a table that forgets its block: the reference count no longer adds up
    with pytest.raises(AssertionError, match="reference counts disagree"):
        manager.accounting()


def forked(n_samples: int, prompt: int) -> BlockManager:
    """A prompt of `prompt` tokens computed by sample 0, then forked to samples 1 .. n_samples - 1."""
    manager = BlockManager(16, BS)
    manager.admit(0, list(range(prompt)))
    assert manager.grow(0, 0, prompt)
    for sample in range(1, n_samples):
        manager.fork(0, sample)
    return manager


def test_samples_copy_the_shared_partial_block_on_write():
    manager = forked(3, 2 * BS + 1)  # two full blocks and a partial one, shared by three samples
    head, partial = manager.tables[0][:2], manager.tables[0][2]
    assert [manager.ref_counts[b] for b in (*head, partial)] == [3, 3, 3] and manager.held == 3
    assert manager.grow(1, 2 * BS + 1, 2 * BS + 2)  # sample 1 writes its first token into the shared block
    copy = manager.tables[1][2]
    assert copy != partial and manager.take_copies() == [(partial, copy)] and manager.ref_counts[partial] == 2
    assert manager.grow(2, 2 * BS + 1, 2 * BS + 2) and manager.grow(0, 2 * BS + 1, 2 * BS + 2)
    assert len(manager.take_copies()) == 1 and manager.tables[0][2] == partial  # the last holder writes in place
    assert manager.tables[0][:2] == manager.tables[1][:2] == manager.tables[2][:2] == head  # full blocks stay shared
    assert manager.held == 2 + 3 and manager.copies_on_write == 2
    for sample in range(3):
        manager.release(sample)
    assert manager.accounting()["free"] == 16


def test_a_block_aligned_prompt_needs_no_copy():
    manager = forked(2, 2 * BS)
    assert manager.grow(1, 2 * BS, 2 * BS + 1) and manager.grow(0, 2 * BS, 2 * BS + 1)
    assert manager.take_copies() == [] and manager.copies_on_write == 0


def test_no_copy_into_a_block_released_in_the_same_step():
    manager = forked(2, BS + 1)
    assert manager.grow(1, BS + 1, BS + 2)
    manager.release(1)  # preempted in the step that made its copy
    assert manager.take_copies() == []
    manager.release(0)
    assert manager.accounting()["free"] == 16


def test_copy_on_write_waits_for_a_free_block():
    manager = BlockManager(2, BS)
    manager.admit(0, [1])
    assert manager.grow(0, 0, 1)
    manager.fork(0, 1)
    assert manager.grow(1, 1, 2)  # the last free block becomes sample 1's copy
    assert not manager.grow(0, 1, BS + 1)  # sample 0 holds its block alone now, but a second one is not there
    assert manager.tables[0] != manager.tables[1] and manager.accounting()["held"] == 2
