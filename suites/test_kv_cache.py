"""KV cache: cached incremental decoding must equal recomputing the whole sequence.

Every check runs on the --model checkpoint; the ones that depend on the architecture also run on the built-in
configuration matrix (every position encoding x MHA/GQA/MQA on small random models, marker `config_matrix`).
fp32 logits are judged against the harness's fp64 reference model by the oracle rule (harness/oracles.py):
the cached path's error at most 2x the error of the backend's own recompute path (or one-pass prefill).
"""
from __future__ import annotations

import pytest
import torch

from backends.base import CacheFullError, UnsupportedModel
from backends.algorithms.generation import generate, left_pad
from backends.strategies import Execution, Quant, Strategy
from harness.models import ATTENTION_KINDS, POSITION_VARIANTS, config_matrix, parametrize_models, small_checkpoint
from harness.oracles import (assert_by_oracle, assert_by_precision_reference, assert_fp32_by_oracle,
                             assert_greedy_agrees, max_abs_error)
from harness.plugin import require
from harness.references import PRECISIONS, float64_reference, precision_reference

N_DECODE = 32
LONG_CONTEXT = 256  # tokens of the long-context checks (fewer when the model has fewer positions)
COMPILED = Strategy(Quant.FP32, execution=Execution.COMPILED)
# The compiled checks' one batch shape (each new batch size or cache capacity compiles anew: tens of seconds here):
# two left-padded rows of different lengths, so per-row slots and padding go through the fixed-shape step.
COMPILED_PROMPTS, COMPILED_DECODE = (7, 12), 24
EXACT_POSITIONS = [p for p in POSITION_VARIANTS if p != "rope-dynamic-ntk"]
MATRIX = config_matrix(EXACT_POSITIONS)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_models(metafunc, MATRIX)  # `model`: the --model checkpoint; `case`: it and MATRIX


def prompt(length: int, vocab: int, seed: int = 1) -> list[int]:
    return torch.randint(1, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def positions_of(start: int, count: int, batch: int = 1) -> torch.Tensor:
    return torch.arange(start, start + count).expand(batch, count)


def long_context(config) -> int:
    return min(LONG_CONTEXT, config.max_position_embeddings)


def fp64_logits(runner, tokens: list[int]) -> torch.Tensor:
    """(T, V) logits of the fp64 reference model over one unpadded sequence."""
    return float64_reference(runner.checkpoint).forward_full(torch.tensor([tokens]), positions_of(0, len(tokens)))[0]


def rows_against_alone(runner, prompts: list[list[int]], batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits each row of a generated batch chose its tokens at (optimized), beside the same row recomputed
    alone without a cache (plain) and in fp64 (reference), every row's concatenated."""
    optimized, plain, reference = [], [], []
    for row, alone in enumerate(prompts):
        sequence = alone + batch.tokens[row]
        decisions = slice(len(alone) - 1, -1)
        optimized.append(batch.logits[row])
        plain.append(runner.forward_full(torch.tensor([sequence]), positions_of(0, len(sequence)))[0, decisions])
        reference.append(fp64_logits(runner, sequence)[decisions])
    return torch.cat(optimized), torch.cat(plain), torch.cat(reference)


@pytest.mark.exactness
def test_cached_decode_matches_recompute(load_runner, attention, case, record):
    """Greedy decoding through the cache; each step's logits against fp64, beside recomputing the sequence."""
    runner = load_runner(case.checkpoint, Strategy(Quant.FP32, attention))
    tokens = prompt(7, runner.config.vocab_size)  # an odd prompt length
    cached = generate(runner, [tokens], N_DECODE)
    sequence = tokens + cached.tokens[0]
    decisions = slice(len(tokens) - 1, -1)  # the positions each new token was chosen at
    recomputed = runner.forward_full(torch.tensor([sequence]), positions_of(0, len(sequence)))[0, decisions]
    result = assert_fp32_by_oracle(cached.logits[0], recomputed, fp64_logits(runner, sequence)[decisions])
    record(**result.metrics())


@pytest.mark.exactness
def test_chunked_prefill_matches_single_pass(load_runner, attention, case, record):
    """Prefill 20 tokens as 10, then 4, then 6, and decode one more: as close to fp64 as one pass without a cache."""
    runner = load_runner(case.checkpoint, Strategy(Quant.FP32, attention))
    sequence = prompt(21, runner.config.vocab_size)
    tokens = torch.tensor([sequence])
    cache, pieces, start = runner.new_cache(1, 21), [], 0
    for size in (10, 4, 6, 1):
        pieces.append(runner.forward(cache, tokens[:, start:start + size], positions_of(start, size)))
        start += size
    one_pass = runner.forward_full(tokens, positions_of(0, 21))[0]
    result = assert_fp32_by_oracle(torch.cat(pieces, dim=1)[0], one_pass, fp64_logits(runner, sequence))
    record(**result.metrics())


@pytest.mark.exactness
@pytest.mark.parametrize("length", [1, 13])
def test_prefill_into_empty_cache_matches_full(load_runner, attention, case, length, record):
    """Past length 0: the first forward into an empty cache is as close to fp64 as the full-sequence path."""
    runner = load_runner(case.checkpoint, Strategy(Quant.FP32, attention))
    sequence = prompt(length, runner.config.vocab_size)
    tokens = torch.tensor([sequence])
    cached = runner.forward(runner.new_cache(1, length), tokens, positions_of(0, length))[0]
    full = runner.forward_full(tokens, positions_of(0, length))[0]
    record(**assert_fp32_by_oracle(cached, full, fp64_logits(runner, sequence)).metrics())


@pytest.mark.exactness
def test_left_padded_batch_matches_unpadded_rows(backend, load_runner, attention, case, record):
    """A batch of 3 prompts of different lengths, left padded and decoded through the cache: each row as close to
    fp64 as that row recomputed alone, unpadded."""
    require(backend, "padding-mask")
    runner = load_runner(case.checkpoint, Strategy(Quant.FP32, attention))
    prompts = [prompt(n, runner.config.vocab_size, seed=n) for n in (5, 11, 2)]
    batch = generate(runner, prompts, 16)
    optimized, plain, reference = rows_against_alone(runner, prompts, batch)
    result = assert_fp32_by_oracle(optimized, plain, reference)
    record(**result.metrics())


def compiled_prompts(vocab: int) -> list[list[int]]:
    return [prompt(n, vocab, seed=n) for n in COMPILED_PROMPTS]


@pytest.mark.exactness
def test_compiled_decode_matches_recompute(load_runner, model, record):
    """Execution compiled: a left-padded batch of two decoded through the compiled step, each row as close to fp64
    as that row recomputed alone (the eager path without a cache)."""
    runner = load_runner(model.checkpoint, COMPILED)
    prompts = compiled_prompts(runner.config.vocab_size)
    batch = generate(runner, prompts, COMPILED_DECODE)
    optimized, plain, reference = rows_against_alone(runner, prompts, batch)
    result = assert_fp32_by_oracle(optimized, plain, reference,
                                   what="KV cache: compiled decode of a left-padded batch")
    record(**result.metrics())


@pytest.mark.exactness
def test_compiled_greedy_tokens_equal_eager(load_runner, model, record):
    """Execution compiled: the greedy tokens of a left-padded batch of two equal the eager strategy's (a first
    mismatch only between each side's top-2 tokens, where rounding may differ)."""
    eager, compiled = load_runner(model.checkpoint, Strategy(Quant.FP32)), load_runner(model.checkpoint, COMPILED)
    prompts = compiled_prompts(compiled.config.vocab_size)
    ours, theirs = generate(compiled, prompts, COMPILED_DECODE), generate(eager, prompts, COMPILED_DECODE)
    mismatches = [assert_greedy_agrees(ours.tokens[row], ours.logits[row], theirs.tokens[row], theirs.logits[row],
                                       top_k=2) for row in range(len(prompts))]
    record(first_mismatch=min([m for m in mismatches if m is not None], default=-1))


@pytest.mark.exactness
def test_cache_filled_to_capacity_then_one_more_is_an_error(load_runner, model):
    runner = load_runner(model.checkpoint, Strategy(Quant.FP32))
    sequence = prompt(12, runner.config.vocab_size)
    tokens = torch.tensor([sequence])
    cache = runner.new_cache(1, 12)
    logits = runner.forward(cache, tokens[:, :8], positions_of(0, 8))
    logits = torch.cat([logits, runner.forward(cache, tokens[:, 8:], positions_of(8, 4))], dim=1)
    assert cache.lengths.tolist() == [12]
    assert_fp32_by_oracle(logits[0], runner.forward_full(tokens, positions_of(0, 12))[0], fp64_logits(runner, sequence))
    with pytest.raises(CacheFullError, match="12 of 12 slots"):
        runner.forward(cache, tokens[:, :1], positions_of(12, 1))
    assert cache.lengths.tolist() == [12], "a refused write must leave the cache as it was"


@pytest.mark.exactness
def test_rollback_then_decode_matches_recompute(load_runner, model, record):
    """truncate() (speculative rejection) followed by new tokens equals a run that never saw the rolled-back ones."""
    runner = load_runner(model.checkpoint, Strategy(Quant.FP32))
    vocab = runner.config.vocab_size
    kept, rejected, accepted = prompt(9, vocab), prompt(4, vocab, seed=2), prompt(3, vocab, seed=3)
    cache = runner.new_cache(1, 32)
    runner.forward(cache, torch.tensor([kept + rejected]), positions_of(0, 13))
    cache.truncate(torch.tensor([9]))
    after = runner.forward(cache, torch.tensor([accepted]), positions_of(9, 3))[0]
    expected = runner.forward_full(torch.tensor([kept + accepted]), positions_of(0, 12))[0, 9:]
    record(**assert_fp32_by_oracle(after, expected, fp64_logits(runner, kept + accepted)[9:]).metrics())


@pytest.mark.exactness
def test_rows_truncated_by_different_amounts_then_decode(backend, load_runner, model, record):
    """Three left-padded rows of different lengths each take 5 speculative tokens, are rolled back by different
    amounts (keeping 4, 0 and 2 of them) and decode 3 more tokens in one call: each row as close to fp64 as that
    row recomputed alone (a rollback or a write slot that is right for one row only fails here)."""
    require(backend, "cache-rollback")  # each row rolled back to its own length
    runner = load_runner(model.checkpoint, Strategy(Quant.FP32))
    vocab = runner.config.vocab_size
    prompts = [prompt(n, vocab, seed=n) for n in (9, 4, 13)]
    speculated = [prompt(5, vocab, seed=20 + row) for row in range(3)]
    accepted = [prompt(3, vocab, seed=30 + row) for row in range(3)]
    keep = torch.tensor([4, 0, 2])
    tokens, positions, mask = left_pad(prompts)
    width = tokens.shape[1]
    cache = runner.new_cache(3, width + 5 + 3)
    runner.forward(cache, tokens, positions, mask)
    next_position = positions[:, -1:] + 1
    runner.forward(cache, torch.tensor(speculated), next_position + torch.arange(5))
    cache.truncate(width + keep)
    after = runner.forward(cache, torch.tensor(accepted), next_position + keep[:, None] + torch.arange(3))
    optimized, plain, reference = [], [], []
    for row, kept in enumerate(keep.tolist()):
        sequence = prompts[row] + speculated[row][:kept] + accepted[row]
        optimized.append(after[row])
        plain.append(runner.forward_full(torch.tensor([sequence]), positions_of(0, len(sequence)))[0, -3:])
        reference.append(fp64_logits(runner, sequence)[-3:])
    result = assert_fp32_by_oracle(torch.cat(optimized), torch.cat(plain), torch.cat(reference),
                                   what="KV cache: rows rolled back by 1, 5 and 3 slots, then decoded")
    record(**result.metrics())


def assert_matches_harness_references(runner, tokens, positions, mask, logits, what: str):
    """Real tokens' logits (B, T, V) of `tokens` at `positions` (padding where `mask` is False), against the harness's
    fp64 reference over the same inputs, with the harness's fp32 reference model as the yardstick: no path of the
    backend under test is (a backend that ignores the positions it is given would ignore them in every path)."""
    reference = float64_reference(runner.checkpoint).forward_full(tokens, positions, mask)
    in_fp32 = precision_reference(runner.checkpoint, Quant.FP32).forward_full(tokens, positions, mask)
    return assert_by_precision_reference(logits[mask], in_fp32[mask], reference[mask], fp32=True, what=what)


@pytest.mark.exactness
def test_positions_with_gaps_far_from_zero(backend, load_runner, attention, case, record):
    """Positions are the caller's, not slot numbers (backends/base.py): a 12-token prefill at positions from half
    the model's range, with a gap of 14 in the middle, then 4 tokens decoded one at a time with another gap."""
    require(backend, "explicit-positions")
    runner = load_runner(case.checkpoint, Strategy(Quant.FP32, attention))
    start = runner.config.max_position_embeddings // 2
    steps = [start + 20, start + 21, start + 30, start + 31]
    chosen = torch.tensor([list(range(start, start + 6)) + list(range(start + 20 - 6, start + 20)) + steps])
    tokens = torch.tensor([prompt(chosen.shape[1], runner.config.vocab_size, seed=4)])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    cache = runner.new_cache(1, tokens.shape[1])
    calls = [runner.forward(cache, tokens[:, :12], chosen[:, :12])]
    calls += [runner.forward(cache, tokens[:, i:i + 1], chosen[:, i:i + 1]) for i in range(12, tokens.shape[1])]
    result = assert_matches_harness_references(runner, tokens, chosen, mask, torch.cat(calls, dim=1),
                                               what=f"KV cache: positions {start}.. with gaps")
    record(**result.metrics())


@pytest.mark.exactness
def test_padding_inside_and_after_the_prefill(backend, load_runner, attention, case, record):
    """Two rows: row 0's prefill has a padding token in the middle, and its second decode step is padding while
    row 1 decodes (token_mask False after the prefill): every real token as close to fp64 as the harness's fp32
    reference over the same tokens and mask."""
    require(backend, "padding-mask")
    runner = load_runner(case.checkpoint, Strategy(Quant.FP32, attention))
    tokens = torch.tensor([prompt(13, runner.config.vocab_size, seed=5), prompt(13, runner.config.vocab_size, seed=6)])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, 4] = mask[0, 11] = False  # slot 4: inside the 10-token prefill; slot 11: the second decode step
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # real tokens count; padding repeats a position
    cache = runner.new_cache(2, 13)
    calls = [runner.forward(cache, tokens[:, :10], positions[:, :10], mask[:, :10])]
    calls += [runner.forward(cache, tokens[:, i:i + 1], positions[:, i:i + 1], mask[:, i:i + 1]) for i in range(10, 13)]
    result = assert_matches_harness_references(runner, tokens, positions, mask, torch.cat(calls, dim=1),
                                               what="KV cache: padding inside and after the prefill")
    record(**result.metrics())


@pytest.mark.exactness
def test_kv_bytes_per_token_match_the_formula(load_runner, model, quant, record):
    """2 x n_layers x n_kv_heads x head_dim x bytes per element, measured from the tensors allocated once the cache
    is full (a cache preallocated at its capacity, or one that grows as tokens arrive, such as transformers')."""
    runner = load_runner(model.checkpoint, Strategy(quant))
    batch, capacity = 3, 40
    cache = runner.new_cache(batch, capacity)
    cfg = runner.config
    tokens = torch.randint(0, cfg.vocab_size, (batch, capacity), generator=torch.Generator().manual_seed(0))
    runner.forward(cache, tokens, torch.arange(capacity).expand(batch, -1))
    per_token = cache.allocated_bytes / (batch * capacity)
    expected = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cache.element_bytes
    record(kv_bytes_per_token=per_token, element_bytes=cache.element_bytes)
    assert per_token == expected
    if quant in (Quant.FP32, Quant.BF16, Quant.FP16):  # the strategy fixes the cache's element type
        assert cache.element_bytes == {Quant.FP32: 4, Quant.BF16: 2, Quant.FP16: 2}[quant]


@pytest.mark.exactness
def test_cached_decode_in_low_precision_by_the_oracle(load_runner, model, quant, record):
    """A long context in the strategy's precision, teacher forced: 3/4 of it prefilled in one call, the rest decoded
    one token at a time through the cache. fp32, bf16, fp16: every logit's error against the fp64 reference at most
    2x the error of the harness's own reference model in that precision (the backend's own recompute path would
    carry a precision fault too: an accumulator, the rotary angles or the cache in a narrower format); other
    formats: at most 2x the error of recomputing on the backend in the same format."""
    runner = load_runner(model.checkpoint, Strategy(quant))
    length = long_context(runner.config)
    prefill = 3 * length // 4
    sequence = prompt(length, runner.config.vocab_size)
    tokens, everything = torch.tensor([sequence]), positions_of(0, length)
    cache = runner.new_cache(1, length)
    steps = [runner.forward(cache, tokens[:, :prefill], positions_of(0, prefill))]
    steps += [runner.forward(cache, tokens[:, i:i + 1], positions_of(i, 1)) for i in range(prefill, length)]
    cached = torch.cat(steps, dim=1)[0]
    reference = fp64_logits(runner, sequence)
    what = f"KV cache: {quant.value}, {prefill} tokens prefilled then {length - prefill} decoded through the cache"
    record.params(prefill=prefill, decode=length - prefill)
    if quant in PRECISIONS:
        in_precision = precision_reference(runner.checkpoint, quant).forward_full(tokens, everything)[0]
        result = assert_by_precision_reference(cached, in_precision, reference, quant == Quant.FP32, what)
    else:
        result = assert_by_oracle(cached, runner.forward_full(tokens, everything)[0], reference, what=what)
    record(**result.metrics())


@pytest.mark.exactness
@pytest.mark.config_matrix
@pytest.mark.xfail(strict=True, reason="dynamic-NTK RoPE: cached keys were rotated under an older base, "
                                       "so cached decode diverges from recompute past max_position_embeddings")
@pytest.mark.parametrize("kind", list(ATTENTION_KINDS), ids=lambda kind: f"small-rope-dynamic-ntk-{kind}")
def test_dynamic_ntk_rope_with_a_cache_is_not_exact(load_runner, attention, kind, record):
    runner = load_runner(small_checkpoint("rope-dynamic-ntk", kind), Strategy(Quant.FP32, attention))
    tokens = prompt(7, runner.config.vocab_size)  # 7 + 32 tokens: well past max_position_embeddings=16
    cached = generate(runner, [tokens], N_DECODE)
    sequence = tokens + cached.tokens[0]
    decisions = slice(len(tokens) - 1, -1)
    recomputed = runner.forward_full(torch.tensor([sequence]), positions_of(0, len(sequence)))[0, decisions]
    record(max_abs_logit_error=max_abs_error(cached.logits[0], recomputed))
    assert_fp32_by_oracle(cached.logits[0], recomputed, fp64_logits(runner, sequence)[decisions])


# --- measurements ---------------------------------------------------------------------------------

BENCH_PROMPT = 16


@pytest.mark.bench
@pytest.mark.parametrize("mode", ["cached", "recompute"])
@pytest.mark.parametrize("n_new", [16, 32, 64, 128, 256, 512])
def test_decode_time_cache_vs_recompute(backend, benchmark, load_runner, model, mode, n_new, record):
    """Total time to generate n_new tokens greedily, with the KV cache or recomputing every step."""
    runner = load_runner(model.checkpoint, Strategy(Quant.FP32))
    tokens = [prompt(BENCH_PROMPT, runner.config.vocab_size)]
    try:  # past the model's trained range is timing only; an engine that refuses it skips, saying so
        runner.new_cache(1, BENCH_PROMPT + n_new)
    except UnsupportedModel as error:
        pytest.skip(f"backend {backend.name}: {error}")
    rounds = 3 if n_new <= 128 else 2
    result = benchmark.pedantic(generate, args=(runner, tokens, n_new), kwargs={"use_cache": mode == "cached"},
                                rounds=rounds, warmup_rounds=1, iterations=1)
    assert len(result.tokens[0]) == n_new
    record(per_token_s=benchmark.stats.stats.median / n_new)
