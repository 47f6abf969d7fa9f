"""Backend speed: prefill and decode tokens/s of every strategy of every backend, as ratios to torch fp32.

Each test times its runner and the torch fp32 runner alternately, round by round, in the same process (the
machines are shared and noisy, so only ratios measured side by side are quoted). Prefill: a fresh cache and
PROMPT_TOKENS tokens per row in one call (llama-bench's pp). Decode: after an untimed prefill, DECODE_TOKENS
single-token calls (llama-bench's tg). tokens/s counts every row: batch x tokens / median seconds.
"""
from __future__ import annotations

import time

import pytest
import torch

from backends.base import ModelRunner
from backends.registry import get_backend
from backends.strategies import Quant, Strategy

BASELINE = ("torch", Quant.FP32)
PROMPT_TOKENS, DECODE_TOKENS = 128, 32
ROUNDS = 5  # timed rounds after one warm-up round


def median(values: list[float]) -> float:
    return float(torch.tensor(values).median())


def timed_phase(runner: ModelRunner, phase: str, tokens: torch.Tensor, prompt_tokens: int = PROMPT_TOKENS) -> float:
    """Seconds for the phase on (B, prompt_tokens + decode tokens) tokens."""
    batch = tokens.shape[0]
    cache = runner.new_cache(batch, tokens.shape[1])
    prompt_positions = torch.arange(prompt_tokens).expand(batch, -1)
    if phase == "prefill":
        start = time.perf_counter()
        runner.forward(cache, tokens[:, :prompt_tokens], prompt_positions)
        return time.perf_counter() - start
    runner.forward(cache, tokens[:, :prompt_tokens], prompt_positions)
    start = time.perf_counter()
    for t in range(prompt_tokens, tokens.shape[1]):
        runner.forward(cache, tokens[:, t:t + 1], torch.full((batch, 1), t))
    return time.perf_counter() - start


@pytest.mark.bench
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_tokens_per_second(backend, load_runner, checkpoint, quant, phase, batch, benchmark, record):
    runner = load_runner(checkpoint, Strategy(quant))
    baseline = get_backend(BASELINE[0])().load(checkpoint, Strategy(BASELINE[1]))
    tokens = torch.randint(1, checkpoint.config.vocab_size, (batch, PROMPT_TOKENS + DECODE_TOKENS),
                           generator=torch.Generator().manual_seed(5))
    runner_s, baseline_s = [], []
    benchmark.pedantic(lambda: runner_s.append(timed_phase(runner, phase, tokens)),
                       setup=lambda: baseline_s.append(timed_phase(baseline, phase, tokens)),
                       rounds=ROUNDS, warmup_rounds=1)
    warm = slice(len(runner_s) - ROUNDS, None)  # the timed rounds: the warm-up ran first
    n_tokens = batch * (PROMPT_TOKENS if phase == "prefill" else DECODE_TOKENS)
    tokens_per_s, baseline_tokens_per_s = n_tokens / median(runner_s[warm]), n_tokens / median(baseline_s[warm])
    record.params(prompt_tokens=PROMPT_TOKENS, decode_tokens=DECODE_TOKENS)
    record(tokens_per_s=tokens_per_s, baseline_tokens_per_s=baseline_tokens_per_s,
           ratio_to_torch_fp32=tokens_per_s / baseline_tokens_per_s)
    # per-round ratios of the interleaved pairs: the spread the regression gate tests a change against
    record.samples(ratio_to_torch_fp32=[b / r for r, b in zip(runner_s[warm], baseline_s[warm])])
