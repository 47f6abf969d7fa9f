"""Unit checks of the speculative decoder's parts that exactness does not cover: prompt lookup's proposals and
bad input, and the bench's loop rule and pooled counts. (Exactness itself is suites/test_speculative.py.)"""
import pytest
import torch

from backends.algorithms.generation import GREEDY
from backends.algorithms.speculative import PromptLookupDraft, SpeculativeDecoder, SpeculativeStats
from backends.torch_ref.backend import TorchBackend
from backends.strategies import Strategy
from harness.models import resolve_model
from harness.quality import repetition_loop


def test_prompt_lookup_continues_the_latest_match():
    lookup = PromptLookupDraft(vocab_size=10, max_ngram=2)
    # suffix [3, 4] last seen at index 2, followed by 5, 6: the text repeats with period 4
    assert lookup.continuation([1, 2, 3, 4, 5, 6, 3, 4], 4) == [5, 6, 3, 4]
    # a repeating loop continues past the end of the history
    assert lookup.continuation([7, 8, 7, 8], 5) == [7, 8, 7, 8, 7]
    # falls back to shorter n-grams, then to nothing
    assert lookup.continuation([1, 2, 9, 2], 2) == [9, 2]
    assert lookup.continuation([1, 2, 3], 2) is None


def test_prompt_lookup_proposes_nothing_without_a_match():
    lookup = PromptLookupDraft(vocab_size=10)
    tokens, probs = lookup.propose([[1, 2, 3]], torch.tensor([3]), torch.tensor([2]), 4, GREEDY, torch.Generator())
    assert tokens.shape == (1, 0) and probs.shape == (1, 0, 10)
    tokens, probs = lookup.propose([[1, 2, 3], [5, 5]], torch.tensor([3, 5]), torch.tensor([2, 1]), 3, GREEDY,
                                   torch.Generator())
    assert tokens.tolist() == [[3, 3, 3], [5, 5, 5]]  # row 0 has no match: its last token repeated
    assert torch.equal(probs.argmax(-1), tokens) and bool((probs.sum(-1) == 1).all())


def test_bad_input_is_refused_with_the_value():
    runner = TorchBackend().load(resolve_model("tiny-random"), Strategy())
    with pytest.raises(ValueError, match="k .* at least 1, got 0"):
        SpeculativeDecoder(runner, PromptLookupDraft(512), 0)
    with pytest.raises(ValueError, match="each of at least one token"):
        SpeculativeDecoder(runner, PromptLookupDraft(512), 2).generate([[1, 2], []], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be 0 or more, got -1"):
        SpeculativeDecoder(runner, PromptLookupDraft(512), 2).generate([[1, 2]], -1)
    with pytest.raises(ValueError, match="max_ngram must be at least 1, got 0"):
        PromptLookupDraft(512, max_ngram=0)


def test_repetition_loop_flags_a_block_repeated_over_half_the_output():
    varied = list(range(40))
    assert not repetition_loop(varied)
    assert repetition_loop(varied[:20] + [5, 6, 7] * 7)  # period 3 over 21 of 41 tokens
    assert not repetition_loop(varied[:24] + [5, 6, 7] * 5)  # over 15 of 39: under half
    assert repetition_loop([9] * 20 + varied[:20])  # period 1, at the start
    assert not repetition_loop(varied[:10] + list(range(17)) * 2)  # period 17: longer than a loop's block


def test_stats_total_pools_counts_and_times():
    first, second = SpeculativeStats(target_calls=2, draft_s=0.5), SpeculativeStats(target_calls=1, draft_s=0.25)
    first.add_round(1, 4)
    second.add_round(4, 4)
    total = SpeculativeStats.total([first, second])
    assert (total.target_calls, total.draft_s, total.accepted_counts) == (3, 0.75, [1, 4])
    assert total.acceptance_rate == 5 / 6  # judged: 2 (one accepted, one rejected) + 4
