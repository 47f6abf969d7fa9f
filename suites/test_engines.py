"""Engines side by side: the engines users run instead (transformers, ...) beside ours (torch, onnxrt), on the same
weights, the same tokens and the same thread count.

For each engine x strategy (fp32, int4-block32, and the torch backend's fp32 with its decode step compiled) x batch x
thread count: prefill tokens/s (PROMPT_TOKENS per row in one call) and decode tokens/s (DECODE_TOKENS single-token
calls after the prompt), each timed round by round alternately with torch fp32
in the same test (ratio_to_torch_fp32; the machines are shared and noisy, so only ratios measured side by side are
quoted). Threads: 1, and every core of the machine; torch.set_num_threads sets torch's and transformers' pools
(ONNX Runtime sessions keep the onnxrt backend's count, onnxruntime-genai's rule: see the engines page).

Decode reads every weight once per step for the whole batch, so its ceiling is batch x read bandwidth / weight
bytes (the weight-bytes roofline), with this machine's read bandwidth measured once per run (harness/machine.py).
Where the weights fit in the last-level cache that DRAM ceiling is the wrong one: the record says so
(weights_fit_in_llc). Greedy tokens of each engine's fp32 are checked against torch fp32's (test_same_tokens).
"""
from __future__ import annotations

import os

import pytest
import torch

from backends.algorithms.generation import generate
from backends.registry import get_backend
from backends.strategies import Execution, Quant, Strategy
from harness.machine import fits_in_last_level_cache, read_bandwidth
from harness.oracles import assert_greedy_agrees
from harness.plugin import SESSION
from suites.test_backend_speed import median, timed_phase

# the torch backend's compiled decode step beside its eager one (an engine without it skips, naming the capability)
ENGINE_STRATEGIES = (Strategy(Quant.FP32), Strategy(Quant.INT4_BLOCK32),
                     Strategy(Quant.FP32, execution=Execution.COMPILED))
PROMPT_TOKENS, DECODE_TOKENS = 64, 128  # the default-target workload
SAME_TOKENS = 64  # greedy tokens compared with torch fp32
ROUNDS = 5  # timed rounds after one warm-up round
THREADS = sorted({1, os.cpu_count() or 1})


def decode_weight_bytes(checkpoint) -> int:
    """fp32 bytes one decode step reads: every weight but the embedding table (a step reads one row of it)."""
    untied_embedding = "model.embed_tokens.weight" if "lm_head.weight" in checkpoint.weights else None
    return sum(t.numel() * 4 for name, t in checkpoint.weights.items() if name != untied_embedding)


@pytest.fixture
def torch_fp32(request):
    """checkpoint -> the session's torch fp32 runner (the baseline and the same-token reference)."""
    session = request.config.stash[SESSION]
    return lambda checkpoint: session.runner_cache.get(get_backend("torch")(), checkpoint, Strategy(Quant.FP32))


@pytest.fixture
def threads_set(request):
    """torch's thread count for the test (the plugin sets it per test; restored by the next test's setup)."""
    torch.set_num_threads(request.param)
    return request.param


@pytest.mark.bench
@pytest.mark.parametrize("threads_set", THREADS, ids=[f"t{n}" for n in THREADS], indirect=True)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("engine_strategy", ENGINE_STRATEGIES, ids=[s.id for s in ENGINE_STRATEGIES])
def test_engine_tokens_per_second(backend, load_runner, checkpoint, engine_strategy, phase, batch, threads_set,
                                  torch_fp32, benchmark, record):
    runner = load_runner(checkpoint, engine_strategy)
    baseline = torch_fp32(checkpoint)
    tokens = torch.randint(1, checkpoint.config.vocab_size, (batch, PROMPT_TOKENS + DECODE_TOKENS),
                           generator=torch.Generator().manual_seed(5))
    runner_s, baseline_s = [], []
    benchmark.pedantic(lambda: runner_s.append(timed_phase(runner, phase, tokens, PROMPT_TOKENS)),
                       setup=lambda: baseline_s.append(timed_phase(baseline, phase, tokens, PROMPT_TOKENS)),
                       rounds=ROUNDS, warmup_rounds=1)
    warm = slice(len(runner_s) - ROUNDS, None)
    n_tokens = batch * (PROMPT_TOKENS if phase == "prefill" else DECODE_TOKENS)
    tokens_per_s, baseline_tokens_per_s = n_tokens / median(runner_s[warm]), n_tokens / median(baseline_s[warm])
    record.params(prompt_tokens=PROMPT_TOKENS, decode_tokens=DECODE_TOKENS, threads=threads_set)
    metrics = dict(tokens_per_s=tokens_per_s, baseline_tokens_per_s=baseline_tokens_per_s,
                   ratio_to_torch_fp32=tokens_per_s / baseline_tokens_per_s)
    if phase == "decode" and engine_strategy.quant == Quant.FP32:
        weight_bytes = decode_weight_bytes(checkpoint)
        bandwidth = read_bandwidth()
        metrics.update(roofline_fraction=tokens_per_s * weight_bytes / (batch * bandwidth.bytes_per_s),
                       decode_weight_bytes=weight_bytes, **bandwidth.as_metrics())
        record.params(weights_fit_in_llc=fits_in_last_level_cache(weight_bytes))
    record(**metrics)
    record.samples(ratio_to_torch_fp32=[b / r for r, b in zip(runner_s[warm], baseline_s[warm])])


@pytest.mark.bench
def test_same_tokens(backend, load_runner, checkpoint, torch_fp32, record):
    """The engine's fp32 greedy continuation equals torch fp32's (a first mismatch only between top-2 tokens)."""
    runner = load_runner(checkpoint, Strategy(Quant.FP32))
    reference = torch_fp32(checkpoint)
    prompt = torch.randint(1, checkpoint.config.vocab_size, (PROMPT_TOKENS,),
                           generator=torch.Generator().manual_seed(5)).tolist()
    ours, theirs = generate(runner, [prompt], SAME_TOKENS), generate(reference, [prompt], SAME_TOKENS)
    mismatch = assert_greedy_agrees(ours.tokens[0], ours.logits[0], theirs.tokens[0], theirs.logits[0], top_k=2)
    record(first_mismatch=-1 if mismatch is None else mismatch)
