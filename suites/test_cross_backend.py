"""Cross-backend: a backend against the reference PyTorch backend on the same weights.

Every check runs on the --model checkpoint; the fp32 logits check also runs on the built-in configuration matrix
(every position encoding x MHA/GQA/MQA, marker `config_matrix`). Each is judged by the oracle rule
(harness/oracles.py) against the harness's own fp64 reference model, through the same calls (a left-padded
batch of odd lengths prefilled into an empty cache, a chunk, single tokens at explicit positions near the end of
the model's range; a backend without padding masks or explicit positions, such as onnxruntime-genai, takes each
prompt alone from position 0, and greedy prompts of one length):
- fp32: the backend's error at most 2x the error of the harness's reference model in fp32 (which computes its
  rotary angles in fp32, as transformers, vLLM and onnxruntime-genai do); greedy decoding over 64 tokens gives
  the reference backend's tokens;
- a lossy strategy: at most 2x the error of the harness's reference model in the same precision (bf16, fp16), or
  of the same number format simulated exactly in fp64 on the same weights (int8-dynamic, int4-block32/128,
  int4-gptq-block128, fp16-kv; harness/references.py). Token agreement of lossy strategies is a quality figure
  (test_model_quality.py).
"""
from __future__ import annotations

import pytest
import torch

from backends.algorithms.generation import generate, left_pad
from backends.registry import get_backend
from backends.strategies import Quant, Strategy
from harness.models import config_matrix, parametrize_models
from harness.oracles import assert_by_oracle, assert_fp32_by_oracle
from harness.plugin import require
from harness.references import SIMULATED, float64_reference, plain_reference, precision_reference

REFERENCE = "torch"
N_GREEDY = 64
PROMPT_LENGTHS = (5, 11, 2)  # odd and uneven: left padding of 6 and 9 slots
FOLLOW_TOKENS = 8  # after the prompts: a chunk of 3, then 5 single tokens
MATRIX = config_matrix()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_models(metafunc, MATRIX)  # `model`: the --model checkpoint; `case`: it and MATRIX


def prompts(vocab: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths]


def reference_runner(backend, checkpoint, quant: Quant = Quant.FP32):
    if backend.name == REFERENCE:
        pytest.skip(f"{REFERENCE} is the reference this suite compares other backends against")
    reference = get_backend(REFERENCE)()
    require(reference, f"quant:{quant.value}")
    return reference.load(checkpoint, Strategy(quant))


def far_from_zero(inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], config) -> tuple:
    """left_pad's (tokens, positions, mask) with the positions moved to the end of the model's range (leaving room
    for prefill_chunk_decode's 8 more tokens): rotary angles and position tables far from zero, where a low
    precision shows."""
    tokens, positions, mask = inputs
    shift = max(0, config.max_position_embeddings - int(positions.max()) - 1 - FOLLOW_TOKENS)
    return tokens, positions + shift, mask


def prefill_chunk_decode(runner, tokens, positions, mask) -> list[torch.Tensor]:
    """Logits of each call: the padded prompts into an empty cache, a 3-token chunk, then 5 single tokens."""
    batch = tokens.shape[0]
    follow = torch.randint(1, runner.config.vocab_size, (batch, FOLLOW_TOKENS),
                           generator=torch.Generator().manual_seed(8))
    cache = runner.new_cache(batch, tokens.shape[1] + follow.shape[1])
    calls = [runner.forward(cache, tokens, positions, mask)]
    next_position = positions[:, -1:] + 1
    for start, stop in [(0, 3)] + [(t, t + 1) for t in range(3, FOLLOW_TOKENS)]:
        calls.append(runner.forward(cache, follow[:, start:stop], next_position + torch.arange(start, stop)))
    return calls


def real_logits(calls: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """(N, V): the logits of every real token of prefill_chunk_decode's calls (padding slots' are undefined)."""
    return torch.cat([calls[0][mask], *(call.flatten(0, 1) for call in calls[1:])])


def input_batches(backend, config, record) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The prompts as (tokens, positions, mask) batches the backend can take: one left-padded batch far from zero,
    or, without a padding mask or explicit positions, each prompt alone from position 0 (recorded)."""
    alone = bool(backend.missing("padding-mask", "explicit-positions"))
    record.params(inputs="each prompt alone from position 0" if alone else "left-padded batch far from zero")
    if alone:
        return [left_pad([prompt]) for prompt in prompts(config.vocab_size)]
    return [far_from_zero(left_pad(prompts(config.vocab_size)), config)]


def teacher_forced(runner, batches) -> torch.Tensor:
    return torch.cat([real_logits(prefill_chunk_decode(runner, *inputs), inputs[2]) for inputs in batches])


@pytest.mark.exactness
def test_fp32_logits_match_reference(backend, load_runner, case, record):
    """fp32 prefill, chunk and cached decode: error against fp64 at most 2x the harness's fp32 reference model's."""
    runner = load_runner(case.checkpoint, Strategy(Quant.FP32))
    reference_runner(backend, case.checkpoint)  # skips the reference backend itself
    record.params(position=case.position, kind=case.kind)
    batches = input_batches(backend, case.checkpoint.config, record)
    plain = precision_reference(case.checkpoint, Quant.FP32)
    ours, theirs, exact = (teacher_forced(r, batches) for r in (runner, plain, float64_reference(case.checkpoint)))
    result = assert_fp32_by_oracle(ours, theirs, exact, what="cross-backend: fp32 logits against the harness's fp32 reference")
    record(**result.metrics())


@pytest.mark.exactness
def test_greedy_decoding_matches_reference(backend, load_runner, model, record):
    """64 greedy fp32 tokens for a left-padded batch: identical tokens, and logits along the path by the oracle."""
    runner = load_runner(model.checkpoint, Strategy(Quant.FP32))
    reference = reference_runner(backend, model.checkpoint)
    lengths = (12, 12) if backend.missing("padding-mask") else (7, 12)  # one length: no padding to mask
    record.params(prompt_lengths=str(lengths))
    batch = prompts(model.checkpoint.config.vocab_size, lengths)
    ours, theirs = generate(runner, batch, N_GREEDY), generate(reference, batch, N_GREEDY)
    record(identical_rows=sum(a == b for a, b in zip(ours.tokens, theirs.tokens)))
    assert ours.tokens == theirs.tokens, f"cross-backend: greedy tokens differ from {REFERENCE}'s"
    exact = float64_reference(model.checkpoint)
    sequences = [prompt + new for prompt, new in zip(batch, ours.tokens)]
    tokens, positions, mask = left_pad(sequences)
    width = tokens.shape[1]
    # logits each new token was chosen at: the last prompt position, then every new token but the last
    reference_logits = exact.forward_full(tokens, positions, mask)[:, width - N_GREEDY - 1:width - 1]
    record(**assert_fp32_by_oracle(ours.logits, theirs.logits, reference_logits,
                                   what=f"cross-backend: greedy logits against {REFERENCE}'s").metrics())


@pytest.mark.exactness
def test_low_precision_logits_by_the_oracle(backend, load_runner, model, quant, record):
    """Teacher-forced prefill and decode in a lossy strategy: the backend's error against fp64 is at most 2x the
    error of the harness's plain path (the same format simulated exactly, or the reference model in that
    precision; harness/references.py)."""
    if quant == Quant.FP32:
        pytest.skip("fp32 is judged against the reference backend's fp32 (test_fp32_logits_match_reference)")
    if backend.name == REFERENCE:
        pytest.skip(f"{REFERENCE} is the reference this suite compares other backends against")
    runner = load_runner(model.checkpoint, Strategy(quant))  # first: a strategy the checkpoint cannot take skips
    plain = plain_reference(model.checkpoint, quant)
    if plain is None:
        pytest.skip(f"the harness computes no reference of quant:{quant.value}")
    record.params(plain_path="simulated" if quant in SIMULATED else "reference model")
    batches = input_batches(backend, model.checkpoint.config, record)
    optimized, plain_logits, exact = (teacher_forced(r, batches)
                                      for r in (runner, plain, float64_reference(model.checkpoint)))
    plain_name = "the format simulated in fp64" if quant in SIMULATED else "the harness's reference model in it"
    record(**assert_by_oracle(optimized, plain_logits, exact,
                              what=f"cross-backend: {quant.value} against {plain_name}").metrics())
