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

from backends.algorithms.generation import GREEDY, next_tokens
from backends.base import ModelRunner, UnsupportedModel
from backends.ortgenai_peer.backend import BUILDER_PRECISIONS, genai_model
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


# --- onnxrt against onnxruntime-genai, ONNX Runtime's own LLM engine (issue 14) ------------------------------
GENAI_PROMPT_TOKENS, GENAI_NEW_TOKENS = 64, 128


def decode_ours(runner: ModelRunner, prompt: torch.Tensor) -> tuple[float, list[list[int]]]:
    """Seconds for GENAI_NEW_TOKENS - 1 greedy decode steps after an untimed prefill (each token picked as
    generation.generate picks it), and the tokens chosen."""
    batch = prompt.shape[0]
    cache = runner.new_cache(batch, GENAI_PROMPT_TOKENS + GENAI_NEW_TOKENS)
    logits = runner.forward(cache, prompt, torch.arange(GENAI_PROMPT_TOKENS).expand(batch, -1))
    chosen = next_tokens(logits[:, -1], GREEDY, None)[:, None]
    tokens = [chosen]
    start = time.perf_counter()
    for position in range(GENAI_PROMPT_TOKENS, GENAI_PROMPT_TOKENS + GENAI_NEW_TOKENS - 1):
        logits = runner.forward(cache, chosen, torch.full((batch, 1), position))
        chosen = next_tokens(logits[:, -1], GREEDY, None)[:, None]
        tokens.append(chosen)
    return time.perf_counter() - start, torch.cat(tokens, dim=1).tolist()


def decode_genai(model, prompt: torch.Tensor) -> tuple[float, list[list[int]]]:
    """The same with onnxruntime-genai's generator: append_tokens runs the prompt, each generate_next_token picks
    a token and runs it."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = GENAI_PROMPT_TOKENS + GENAI_NEW_TOKENS
    params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=prompt.shape[0])
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.numpy().astype("int32"))
    start = time.perf_counter()
    for _ in range(GENAI_NEW_TOKENS - 1):
        generator.generate_next_token()
    seconds = time.perf_counter() - start
    generator.generate_next_token()  # picks the last token from the last step's logits, as decode_ours did
    return seconds, [list(generator.get_sequence(row))[GENAI_PROMPT_TOKENS:total] for row in range(prompt.shape[0])]


@pytest.mark.bench
@pytest.mark.parametrize("batch", [1, 8])
def test_onnxrt_beside_onnxruntime_genai(backend, load_runner, checkpoint, quant, batch, benchmark, record):
    """Decode tokens/s of the onnxrt backend beside onnxruntime-genai's on the same weights and format, interleaved
    round by round; both sessions at the same intra-op thread count (ours, recorded as `threads`)."""
    if backend.name != "onnxrt":
        pytest.skip(f"backend {backend.name!r}: onnxruntime-genai is compared with the onnxrt backend only")
    if quant not in BUILDER_PRECISIONS:
        pytest.skip(f"{quant.value}: onnxruntime-genai's builder has no same format; compared: "
                    f"{', '.join(q.value for q in BUILDER_PRECISIONS)}")
    runner = load_runner(checkpoint, Strategy(quant))
    threads = runner.session.get_session_options().intra_op_num_threads
    try:
        model = genai_model(checkpoint, quant, threads)  # the ortgenai backend's model (backends/ortgenai_peer)
    except UnsupportedModel as error:
        pytest.skip(f"onnxruntime-genai: {error}")
    prompt = torch.randint(1, checkpoint.config.vocab_size, (batch, GENAI_PROMPT_TOKENS),
                           generator=torch.Generator().manual_seed(5))
    ours_s, genai_s, tokens = [], [], {}

    def ours_round():
        seconds, tokens["ours"] = decode_ours(runner, prompt)
        ours_s.append(seconds)

    def genai_round():
        seconds, tokens["genai"] = decode_genai(model, prompt)
        genai_s.append(seconds)

    benchmark.pedantic(ours_round, setup=genai_round, rounds=ROUNDS, warmup_rounds=1)
    assert all(len(row) == GENAI_NEW_TOKENS for row in tokens["genai"]), "onnxruntime-genai stopped early"
    warm = slice(len(ours_s) - ROUNDS, None)
    n_tokens = batch * (GENAI_NEW_TOKENS - 1)
    same_rows = sum(a == b for a, b in zip(tokens["ours"], tokens["genai"]))
    record.params(prompt_tokens=GENAI_PROMPT_TOKENS, decode_tokens=GENAI_NEW_TOKENS - 1, peer="onnxruntime-genai",
                  implementation=runner.implementation, threads=threads)
    record(tokens_per_s=n_tokens / median(ours_s[warm]), genai_tokens_per_s=n_tokens / median(genai_s[warm]),
           ratio_to_genai=median(genai_s[warm]) / median(ours_s[warm]), same_token_rows=same_rows / batch)
    record.samples(ratio_to_genai=[g / o for o, g in zip(ours_s[warm], genai_s[warm])])
