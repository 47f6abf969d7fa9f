"""Unit checks of the speculative decoder's parts that exactness does not cover: prompt lookup's proposals and
bad input. (Exactness itself is suites/test_speculative.py.)"""
import pytest
import torch

from backends.algorithms.generation import GREEDY
from backends.algorithms.speculative import PromptLookupDraft, SpeculativeDecoder
from backends.torch_ref.backend import TorchBackend
from backends.strategies import Strategy
from harness.models import resolve_model


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
