"""The onnxrt packed step (runner.forward_packed): how a step's rows are grouped into runs of the step graph, and
that rows riding along a decode run, or too full to, are left as they were."""
import pytest
import torch

from harness.models import small_checkpoint
from backends.strategies import Strategy
from suites.test_batching import logit_bound

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: the onnxrt backend's graphs are untestable")
from backends.onnxrt import store  # noqa: E402  (needs onnxruntime)
from backends.onnxrt.runner import OrtRunner, row_runs  # noqa: E402


def test_rows_are_grouped_by_token_count_and_decode_rows_join_across_rows_with_room():
    counts = [1, 0, 1, 5, 1, 0, 1, 3, 3, 1]
    assert row_runs(counts, [True] * 10) == [(range(0, 10), 1), (range(3, 4), 5), (range(7, 9), 3)]
    no_room_at_5 = [row != 5 for row in range(10)]
    assert row_runs(counts, no_room_at_5) == [(range(0, 5), 1), (range(3, 4), 5), (range(6, 10), 1), (range(7, 9), 3)]


def test_a_packed_step_leaves_riding_and_full_rows_as_they_were(tmp_path):
    checkpoint = small_checkpoint("rope", "gqa")
    runner = OrtRunner(checkpoint, Strategy(), store.model_file(checkpoint, Strategy().quant, tmp_path).path)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, checkpoint.config.vocab_size, (n,), generator=generator) for n in (6, 3, 2, 4, 8, 5)]
    capacity = 8  # row 4 is full: the decode run of rows 0 and 3 cannot take it along to row 5
    cache = runner.new_cache(len(prompts), capacity)
    for row, prompt in enumerate(prompts):
        runner.forward_packed(cache, prompt, torch.arange(len(prompt)), torch.full((len(prompt),), row))
    full_row = [value.numpy()[4].copy() for value in cache.values]
    lengths = cache.lengths.clone()
    # decode rows 0, 3 and 5; row 1's two tokens are a run of their own; rows 1 and 2 (idle) ride along the decode
    # run of rows 0 to 3, each with one masked token
    step_rows = torch.tensor([0, 1, 1, 3, 5])
    step_tokens = torch.randint(0, checkpoint.config.vocab_size, (5,), generator=generator)
    step_positions = torch.tensor([6, 3, 4, 4, 5])
    assert row_runs([1, 2, 0, 1, 0, 1], [True, True, True, True, False, True]) == [
        (range(0, 4), 1), (range(1, 2), 2), (range(5, 6), 1)]
    logits = runner.forward_packed(cache, step_tokens, step_positions, step_rows)
    assert cache.lengths.tolist() == (lengths + torch.tensor([1, 2, 0, 1, 0, 1])).tolist()
    assert torch.equal(cache.valid, torch.arange(capacity)[None, :] < cache.lengths[:, None])
    assert all((value.numpy()[4] == before).all() for value, before in zip(cache.values, full_row))
    for row, prompt in enumerate(prompts):
        if row in (2, 4):  # idle
            continue
        taken = step_rows == row
        alone = runner.new_cache(1, capacity)
        sequence = torch.cat([prompt, step_tokens[taken]])
        expected = runner.forward(alone, sequence[None], torch.arange(len(sequence))[None])[0, len(prompt):]
        error = float((logits[taken] - expected).abs().max())
        assert error <= logit_bound(expected), f"row {row}: packed logits differ from the row alone by {error:.3g}"
