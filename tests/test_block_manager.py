"""The block manager alone (no model): reference counts, prefix hits, LRU eviction, its accounting."""
import pytest

from backends.algorithms.serving.block_manager import BlockManager

BS = 4


def served(manager: BlockManager, seq: int, tokens: list[int]) -> int:
    """Admit, compute every token, release; return the prefix hit."""
    hit = manager.admit(seq, tokens)
    assert manager.grow(seq, len(tokens))
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
                                    "evictions": 0}


def test_least_recently_released_cached_block_is_evicted_first():
    manager = BlockManager(4, BS, prefix_caching=True)
    first, second = [1, 2, 3, 4, 9], [5, 6, 7, 8, 9]
    served(manager, 0, first)  # caches block [1, 2, 3, 4]
    served(manager, 1, second)  # caches block [5, 6, 7, 8], released later
    manager.admit(2, [0])
    assert manager.grow(2, 3 * BS)  # two free blocks, then one eviction: the older cached block
    assert manager.evictions == 1
    assert manager.admit(3, first) == 0 and manager.admit(4, second) == BS


def test_accounting_catches_a_lost_block():
    manager = BlockManager(4, BS)
    manager.admit(0, [1, 2])
    manager.grow(0, 2)
    manager.tables[0].clear()  # a table that forgets its block: the reference count no longer adds up
    with pytest.raises(AssertionError, match="reference counts disagree"):
        manager.accounting()
