"""Quantization strategies: their kernels are exact to their stored formats (exactness), and what each costs in
quality and buys in speed and memory against fp32 of the same backend (bench).

exactness (capabilities 'quantized-linears', 'quantized-kv'):
- every quantized linear equals dequantize-then-matmul of the weights it stores (float64 product), within 1e-5
  relative: the kernel is right even where the format is lossy. W8A8 layers are fed the activation codes they
  make themselves;
- the stored format round-trips (re-quantizing its value under its own scales gives its codes back), and a
  round-to-nearest format stores what its definition (backends/quant/formats.py) makes of the checkpoint's weights;
- the int8 KV quantizer keeps every element within half a step of its input (nothing clipped).
bench, on QUALITY_WINDOWS held-out windows evenly spaced over the stream (harness/corpus.py; the second half scored:
QUALITY_WINDOWS x CONTEXT/2 = 4,096 tokens): llama.cpp's PPL, dPPL, mean KLD, KLD p99/max, RMS dp, same-top-1
against the backend's fp32 log-probabilities (stored once per model and backend under the cache directory);
prefill and decode tokens/s at batch 1 and 8 as ratios to the backend's fp32, timed alternately in one run;
weight bytes, bits per weight and KV bytes per token; achieved decode bandwidth (weight bytes x steps/s) beside
this machine's measured read bandwidth (harness/machine.py); peak resident memory of a fresh child process, whole
and above what the child holds before loading (interpreter, imports and the fp32 checkpoint): onnxrt opens its
stored, already-quantized model file, so that increment is the strategy's; torch builds the fp32 model and then
swaps its layers, so its increment includes one fp32 copy of the weights.
"""
from __future__ import annotations

import pytest
import torch

from backends.cache import cache_root
from backends.checkpoint import TOKENIZER_FILE, check_tokenizer
from backends.quant.formats import Fp8Channels, Int4Blocks, Int8Channels
from backends.registry import get_backend
from backends.strategies import Quant, Strategy
from harness.machine import fits_in_last_level_cache, last_level_cache_bytes, read_bandwidth
from harness.memory import peak_rss_in_child
from harness.models import resolve_model
from harness.plugin import require
from harness.quality import base_logprobs, divergence, evaluation_windows, scored_logprobs, scored_targets
from harness.training import CONTEXT
from suites.test_backend_speed import DECODE_TOKENS, PROMPT_TOKENS, median, timed_phase

KERNEL_RTOL = 1e-5
QUALITY_WINDOWS = 32
SPEED_ROUNDS = 3  # timed rounds after one warm-up round, each timing the strategy and fp32 back to back
UNQUANTIZED = (Quant.FP32, Quant.BF16, Quant.FP16)


def checkpoint_weight(checkpoint, layer: str) -> torch.Tensor:
    """The fp32 weight a quantized layer was made from (a head tied to the embedding is stored as the embedding)."""
    name = f"{layer}.weight"
    if name not in checkpoint.weights and layer == "lm_head" and checkpoint.config.tie_embeddings:
        name = "model.embed_tokens.weight"
    return checkpoint.weights[name].float()


def quantized_linears_of(backend, load_runner, checkpoint, quant):
    require(backend, "quantized-linears")
    linears = load_runner(checkpoint, Strategy(quant)).quantized_linears()
    if not linears:
        pytest.skip(f"{quant.value} stores no quantized linear layer")
    return linears


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.exactness
def test_quantized_linear_matches_dequantize_then_matmul(backend, load_runner, checkpoint, quant, record):
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for name, view in quantized_linears_of(backend, load_runner, checkpoint, quant).items():
        x = torch.randn(2, 5, view.module.in_features, generator=generator)
        with torch.inference_mode():
            actual = view.module(x)
        inputs = x.double() if view.quantize_input is None else view.quantize_input(x).dequantize()
        expected = inputs @ view.stored.dequantize().T
        if view.bias is not None:
            expected = expected + view.bias.double()
        error = relative_error(actual, expected)
        worst = max(worst, error)
        assert error <= KERNEL_RTOL, f"{name}: the {quant.value} kernel differs from dequantize-then-matmul of its " \
                                     f"stored weights by {error:.3g} relative"
    record(max_relative_error=worst)


def requantized(stored):
    """The stored format rebuilt from its own dequantized value under its own scales."""
    value = stored.dequantize()
    if isinstance(stored, Int4Blocks):
        return Int4Blocks.quantize(value, stored.block, stored.scales)
    if isinstance(stored, Fp8Channels):
        return Fp8Channels((value / stored.scales.double()).to(torch.float8_e4m3fn), stored.scales)
    return Int8Channels(torch.round(value / stored.scales.double()).to(torch.int8), stored.scales)


def stored_tensors(stored) -> list[torch.Tensor]:
    if isinstance(stored, Int4Blocks):
        return [stored.packed, stored.scales]
    if isinstance(stored, Fp8Channels):
        return [stored.values.view(torch.uint8), stored.scales]
    return [stored.codes, stored.scales]


def round_to_nearest(weight: torch.Tensor, stored):
    """What the format's definition stores for `weight`, or None where the codes were chosen otherwise (GPTQ)
    or by a library whose own rule is checked by bound instead (torchao's int8)."""
    if isinstance(stored, Fp8Channels):
        return Fp8Channels.quantize(weight)
    return None


@pytest.mark.exactness
def test_stored_format_round_trips(backend, load_runner, checkpoint, quant, record):
    for name, view in quantized_linears_of(backend, load_runner, checkpoint, quant).items():
        stored = view.stored
        for have, again in zip(stored_tensors(stored), stored_tensors(requantized(stored))):
            assert torch.equal(have, again), f"{name}: re-quantizing the stored {quant.value} value changes its codes"
        weight = checkpoint_weight(checkpoint, name)
        if quant in (Quant.INT4_BLOCK32, Quant.INT4_BLOCK128):
            expected = Int4Blocks.quantize(weight, stored.block)
            assert torch.equal(stored.packed, expected.packed) and torch.equal(stored.scales, expected.scales), \
                f"{name}: stored int4 blocks differ from the format's round-to-nearest of the checkpoint's weight"
        elif isinstance(stored, Fp8Channels):
            expected = Fp8Channels.quantize(weight)
            assert torch.equal(stored.values.view(torch.uint8), expected.values.view(torch.uint8)), \
                f"{name}: stored fp8 values differ from the format's rounding of the checkpoint's weight"
        elif isinstance(stored, Int8Channels):  # torchao's own rule: every weight within half a step
            step = stored.scales.double()
            error = (stored.dequantize() - weight.double()).abs()
            fp32_division = weight.double().abs() * 2.0**-22  # w / scale is rounded in fp32 before round()
            assert bool((error <= step / 2 + fp32_division).all()), \
                f"{name}: a stored int8 weight is {float((error / step).max()):.3g} steps from the checkpoint's"
    record(layers=len(quantized_linears_of(backend, load_runner, checkpoint, quant)))


@pytest.mark.exactness
def test_kv_quantizer_keeps_every_element_within_half_a_step(backend, load_runner, checkpoint, record):
    require(backend, "quantized-kv")
    cache = load_runner(checkpoint, Strategy(Quant.INT8_KV)).new_cache(1, 4)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, checkpoint.config.n_kv_heads, 9, checkpoint.config.head_dim, generator=generator)
    x[0, 0, 3, 5] = 40.0  # an outlier: the step widens, nothing may clip
    x[1, 1, 2] = 0.0  # an all-zero row stays zero
    stored = cache.quantize(x)
    step = stored.scales.double()
    error = (stored.dequantize() - x.double()).abs()
    record(max_error_in_steps=float((error / torch.where(step == 0, 1, step)).max()))
    assert bool((error <= step / 2 * (1 + 1e-6)).all()), "the KV quantizer moves an element by more than half a step"
    assert bool((stored.dequantize()[1, 1, 2] == 0).all()), "an all-zero key row does not come back as zero"


BITS_PER_WEIGHT = {Quant.FP32: 32, Quant.FP16: 16, Quant.BF16: 16, Quant.INT8_KV: 32, Quant.FP16_KV: 32,
                   **{q: 4 + 32 / block for q, block in ((Quant.INT4_BLOCK32, 32), (Quant.INT4_BLOCK128, 128),
                                                         (Quant.INT4_GPTQ_BLOCK128, 128))}}  # 4-bit codes + fp32 scale


@pytest.mark.exactness
def test_bits_per_weight_count_scales(backend, load_runner, checkpoint, quant, record):
    """Bits per weight of the linear layers, from what is stored, equal the format's own count (scales included):
    the same strategy name is the same format on every backend."""
    if quant not in BITS_PER_WEIGHT:
        pytest.skip(f"{quant.value}: per-channel scales over layers of several widths have no single closed form")
    figures = weight_figures(backend, load_runner(checkpoint, Strategy(quant)))
    if "bits_per_weight" not in figures:
        pytest.skip(f"{backend.name} reports no bits per weight")
    record(bits_per_weight=figures["bits_per_weight"])
    assert figures["bits_per_weight"] == pytest.approx(BITS_PER_WEIGHT[quant], rel=1e-12), \
        f"{quant.value}: {figures['bits_per_weight']:.6g} stored bits per weight, the format stores {BITS_PER_WEIGHT[quant]}"


# --- bench: quality -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def quality_windows(checkpoint) -> torch.Tensor:
    if checkpoint.directory is None or not (checkpoint.directory / TOKENIZER_FILE).exists():
        pytest.skip(f"model {checkpoint.name} has no {TOKENIZER_FILE}: no held-out text to score")
    tokenizer = check_tokenizer(checkpoint.directory / TOKENIZER_FILE, checkpoint.config)
    windows = evaluation_windows(tokenizer, min(CONTEXT, checkpoint.config.max_position_embeddings))
    return windows[torch.linspace(0, len(windows) - 1, QUALITY_WINDOWS).round().long()]  # spread over the documents


def base_path(checkpoint, backend_name: str):

    return cache_root() / "quality-base" / f"{checkpoint.fingerprint()}-{backend_name}-fp32.npz"


@pytest.mark.bench
def test_quality_against_fp32(backend, load_runner, checkpoint, quant, quality_windows, record):
    base_runner = load_runner(checkpoint, Strategy(Quant.FP32))
    base = base_logprobs(base_path(checkpoint, backend.name), quality_windows,
                         lambda windows: scored_logprobs(base_runner, windows))
    runner = load_runner(checkpoint, Strategy(quant))  # loaded last: the record names the strategy of the last load
    result = divergence(base, scored_logprobs(runner, quality_windows), scored_targets(quality_windows))
    record.params(implementation=runner.implementation, scored_tokens=len(base))
    record(ppl=result.ppl.value, ppl_err=result.ppl.error, base_ppl=result.base_ppl.value,
           delta_ppl=result.delta_ppl.value, delta_ppl_err=result.delta_ppl.error,
           mean_kld=result.mean_kld.value, mean_kld_err=result.mean_kld.error, kld_p99=result.kld_p99,
           kld_max=result.kld_max, rms_delta_p=result.rms_delta_p.value, rms_delta_p_err=result.rms_delta_p.error,
           same_top1=result.same_top1.value, same_top1_err=result.same_top1.error)
    assert result.mean_kld.value >= -1e-9, f"a negative mean KL divergence ({result.mean_kld.value:.3g})"


# --- bench: speed and memory --------------------------------------------------------------------------------


@pytest.mark.bench
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_speed_against_fp32(backend, load_runner, checkpoint, quant, phase, batch, record):
    base = load_runner(checkpoint, Strategy(Quant.FP32))
    runner = load_runner(checkpoint, Strategy(quant))  # loaded last: the record names the strategy of the last load
    tokens = torch.randint(1, checkpoint.config.vocab_size, (batch, PROMPT_TOKENS + DECODE_TOKENS),
                           generator=torch.Generator().manual_seed(5))
    runner_s, base_s = [], []
    for _ in range(SPEED_ROUNDS + 1):  # the first round warms both up and is not counted
        base_s.append(timed_phase(base, phase, tokens))
        runner_s.append(timed_phase(runner, phase, tokens))
    runner_s, base_s = runner_s[1:], base_s[1:]
    n_tokens = batch * (PROMPT_TOKENS if phase == "prefill" else DECODE_TOKENS)
    record.params(implementation=runner.implementation, prompt_tokens=PROMPT_TOKENS, decode_tokens=DECODE_TOKENS)
    record(tokens_per_s=n_tokens / median(runner_s), base_tokens_per_s=n_tokens / median(base_s),
           ratio_to_fp32=median(base_s) / median(runner_s))
    record.samples(ratio_to_fp32=[b / r for r, b in zip(runner_s, base_s)])
    weight_bytes = weight_figures(backend, runner).get("weight_bytes")
    if phase == "decode" and weight_bytes:
        record(**bandwidth_figures(weight_bytes, DECODE_TOKENS / median(runner_s)))


def bandwidth_figures(weight_bytes: float, steps_per_s: float) -> dict[str, float]:
    """Achieved bandwidth (every weight read once per decode step) beside this machine's measured read bandwidth,
    and whether the weights fit in the last-level cache (then they are read from cache and DRAM is not the
    ceiling)."""
    figures = {"achieved_GBps": weight_bytes * steps_per_s / 1e9, **read_bandwidth().as_metrics()}
    fits = fits_in_last_level_cache(int(weight_bytes))
    if fits is not None:
        figures.update(last_level_cache_bytes=float(last_level_cache_bytes()), weights_fit_in_cache=float(fits))
    return figures


def load_checkpoint(backend_name: str, model: str, quant: str) -> tuple:
    """The child's setup: imports and the checkpoint's fp32 tensors, resident before the measured load."""
    return get_backend(backend_name)(), resolve_model(model), Strategy(Quant(quant))


def load_and_decode(state: tuple) -> None:
    """In a fresh child: load the model under the strategy, prefill PROMPT_TOKENS and decode DECODE_TOKENS."""
    backend, checkpoint, strategy = state
    runner = backend.load(checkpoint, strategy)
    tokens = torch.ones(1, PROMPT_TOKENS + DECODE_TOKENS, dtype=torch.long)
    timed_phase(runner, "decode", tokens)


@pytest.mark.bench
def test_memory(backend, load_runner, checkpoint, quant, record):
    runner = load_runner(checkpoint, Strategy(quant))
    if checkpoint.directory is None:
        pytest.skip(f"model {checkpoint.name} is not on disk: a child process cannot load it")
    batch, capacity = 1, PROMPT_TOKENS + DECODE_TOKENS
    cache = runner.new_cache(batch, capacity)
    peak = peak_rss_in_child(load_and_decode, backend.name, str(checkpoint.directory), quant.value,
                             setup=load_checkpoint)
    record.params(implementation=runner.implementation)
    record(kv_bytes_per_token=cache.allocated_bytes / (batch * capacity), peak_rss_bytes=peak.peak_bytes,
           load_peak_bytes=peak.extra_bytes, **weight_figures(backend, runner))


def weight_figures(backend, runner) -> dict[str, float]:
    """Weight bytes and bits per weight (scales and zero points included) where the backend reports them (torch:
    the stored tensors; onnxrt: the model file's initializers, and the file's size)."""
    if backend.name == "torch":
        from backends.torch_ref.quantize import weight_bytes

        return weight_bytes(runner.model)
    path = getattr(runner, "path", None)
    if path is None:
        return {}
    from backends.onnxrt.quantize import stored_weight_figures

    return {**stored_weight_figures(path), "model_file_bytes": path.stat().st_size}
