"""Flash attention: every attention implementation a backend declares, judged by the oracle rule, and measured.

Kernel level: a backend with the capability 'attention-kernels' offers `backend.attention_kernels()`,
{Attention: fn(q, k, v, allowed, bias, scale) -> (B, H, T, D)} with the signature documented in
backends/torch_ref/attention.py. Each kernel, run in fp32, bf16 and fp16, must have an error against the fp64
reference of at most 2x the error of the plain formula run in the same precision (flash-attention's rule).
Model level: the backend loaded under attention=<name> on the --model checkpoint (and on the built-in rope and
ALiBi configurations, marker `config_matrix`) must match attention=naive by the same rule, against the harness's
fp64 reference model, for prefill and cached decode.
Bench: time (pytest-benchmark) and peak extra memory (a fresh spawned child) against N, batch 1 and 4.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytest
import torch

from backends.registry import get_backend
from backends.strategies import Attention, Quant, Strategy
from backends.torch_ref.attention import FlashAttention
from backends.torch_ref.model import alibi_slopes
from harness.memory import peak_rss_in_child
from harness.models import config_matrix, parametrize_models
from harness.oracles import assert_by_oracle, assert_fp32_by_oracle
from harness.plugin import require
from harness.references import float64_reference, plain_reference

K = 2.0  # the rule: optimized error <= K x plain error (flash-attention's tests)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
dtypes = pytest.mark.parametrize("dtype", list(DTYPES))
MATRIX = config_matrix(["rope", "alibi"], ["gqa"])  # the model-level test's built-in configurations


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_models(metafunc, MATRIX)  # `case`: the --model checkpoint and MATRIX


# --- the reference and the cases ------------------------------------------------------------------


def reference_attention(q, k, v, allowed, bias, scale) -> torch.Tensor:
    """The plain formula, computed in the inputs' dtype: fp64 gives the reference, a low precision the plain path."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    weights = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    return weights.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0) @ v  # no allowed key: zeros


@dataclass(frozen=True)
class Case:
    """One attention call: shapes, and what the mask and bias hold."""

    q_len: int
    k_len: int
    head_dim: int = 64
    batch: int = 1
    heads: int = 2
    kv_heads: int | None = None  # None: as many as heads (MHA)
    alibi: bool = False
    left_padding: tuple[int, ...] = ()  # per batch row: leading key slots that are padding
    masked_rows: tuple[int, ...] = ()  # query rows (of batch row 0) that may see no key at all
    seed: int = 0


def case_inputs(case: Case) -> tuple:
    """fp64 (q, k, v, allowed, bias, scale) for a case; the causal mask is aligned to the bottom right."""
    generator = torch.Generator().manual_seed(case.seed)
    kv_heads = case.kv_heads or case.heads

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q = normal(case.batch, case.heads, case.q_len, case.head_dim)
    k = normal(case.batch, kv_heads, case.k_len, case.head_dim)
    v = normal(case.batch, kv_heads, case.k_len, case.head_dim)
    # query i sits at key position i + (k_len - q_len): the last query sees every key (a decode step does)
    query_pos = torch.arange(case.q_len) + (case.k_len - case.q_len)
    key_pos = torch.arange(case.k_len)
    allowed = (key_pos[None, :] <= query_pos[:, None]).expand(case.batch, 1, case.q_len, case.k_len).clone()
    for row, pad in enumerate(case.left_padding):
        allowed[row, :, :, :pad] = False
    for query in case.masked_rows:
        allowed[0, :, query] = False
    bias = None
    if case.alibi:  # Press et al. (2022): slope * (key position - query position)
        distance = (key_pos[None, :] - query_pos[:, None]).double()
        bias = (alibi_slopes(case.heads).double()[:, None, None] * distance).expand(case.batch, -1, -1, -1)
    return q, k, v, allowed, bias, 1.0 / math.sqrt(case.head_dim)


def check_kernel(kernel, case: Case, dtype: str) -> dict[str, float]:
    """Assert the oracle rule for one kernel on one case in one precision; return the figures."""
    q, k, v, allowed, bias, scale = case_inputs(case)
    reference = reference_attention(q, k, v, allowed, bias, scale)
    low = DTYPES[dtype]
    lowp = [t.to(low) for t in (q, k, v)]
    low_bias = None if bias is None else bias.to(low)
    plain = reference_attention(*lowp, allowed, low_bias, scale)
    out = kernel(*lowp, allowed, low_bias, scale)
    assert out.shape == reference.shape and out.dtype == low, f"kernel returned {tuple(out.shape)} {out.dtype}"
    return assert_rule(out, plain, reference, fp32=low == torch.float32, what=f"attention kernel: {dtype}, {case}")


def assert_rule(optimized, plain, reference, fp32: bool, what: str) -> dict[str, float]:
    """The oracle rule with K (fp32: the plain error floored at one ulp, harness/oracles.py); the figures to record."""
    result = (assert_fp32_by_oracle if fp32 else assert_by_oracle)(optimized, plain, reference, k=K, what=what)
    return {"optimized_error": result.optimized_error, "plain_error": result.plain_error, "error_ratio": result.ratio}


def backend_kernel(backend, attention: Attention):
    require(backend, "attention-kernels")
    kernels = backend.attention_kernels()
    assert attention in kernels, f"backend {backend.name} declares attention:{attention} but offers no such kernel"
    return kernels[attention]


# --- kernel level: every declared implementation ---------------------------------------------------


@pytest.mark.exactness
@dtypes
@pytest.mark.parametrize("head_dim", [40, 59, 64, 80, 128])
def test_head_dims(backend, attention, dtype, head_dim, record):
    record(**check_kernel(backend_kernel(backend, attention), Case(97, 97, head_dim=head_dim), dtype))


@pytest.mark.exactness
@dtypes
@pytest.mark.parametrize("seq_len", [1, 97, 113, 1023, 1025])
def test_seq_lengths(backend, attention, dtype, seq_len, record):
    record(**check_kernel(backend_kernel(backend, attention), Case(seq_len, seq_len), dtype))


@pytest.mark.exactness
@dtypes
@pytest.mark.parametrize(("q_len", "k_len"), [(1, 97), (1, 1025), (64, 1025), (300, 17), (1, 8192)],
                         ids=lambda n: str(n))
def test_q_len_differs_from_k_len(backend, attention, dtype, q_len, k_len, record):
    """Causal mask aligned bottom right: a decode query (q_len 1) sees all N keys; with q_len > k_len the
    first queries see none. One query over 8192 keys (32 tiles of 256) shows a running sum or output kept in a
    low precision across tiles."""
    record(**check_kernel(backend_kernel(backend, attention), Case(q_len, k_len), dtype))


@pytest.mark.exactness
@dtypes
@pytest.mark.parametrize("kv_heads", [8, 2, 1], ids=["mha", "gqa", "mqa"])
def test_head_sharing(backend, attention, dtype, kv_heads, record):
    case = Case(300, 300, heads=8, kv_heads=kv_heads)
    record(**check_kernel(backend_kernel(backend, attention), case, dtype))


@pytest.mark.exactness
@dtypes
@pytest.mark.parametrize("q_len", [1, 300])
def test_alibi(backend, attention, dtype, q_len, record):
    case = Case(q_len, 300, heads=4, alibi=True)
    record(**check_kernel(backend_kernel(backend, attention), case, dtype))


@pytest.mark.exactness
@dtypes
@pytest.mark.parametrize("q_len", [1, 200])
def test_padding_and_fully_masked_rows(backend, attention, dtype, q_len, record):
    """Left padding of 0, 37 and 199 keys; in row 0 one query that may see no key returns zeros, not NaN."""
    case = Case(q_len, 200, batch=3, left_padding=(0, 37, 199), masked_rows=(q_len // 2,))
    record(**check_kernel(backend_kernel(backend, attention), case, dtype))


@pytest.mark.exactness
@dtypes
def test_bit_identical_over_repeats(backend, attention, dtype):
    q, k, v, allowed, bias, scale = case_inputs(Case(300, 300, heads=4, kv_heads=2, alibi=True))
    kernel, low = backend_kernel(backend, attention), DTYPES[dtype]
    args = (q.to(low), k.to(low), v.to(low), allowed, bias.to(low), scale)
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[low]
    first = kernel(*args).view(bits)  # compared as integers: NaN payloads and -0.0 count as differences
    for repeat in range(1, 20):
        assert torch.equal(kernel(*args).view(bits), first), f"repeat {repeat} differs from the first run"


# --- the reference flash kernel's tiling -----------------------------------------------------------


@pytest.mark.exactness
@dtypes
@pytest.mark.parametrize(("block_q", "block_k"), [(16, 16), (16, 256), (32, 64), (64, 16), (128, 128), (256, 32),
                                                  (256, 256)], ids=lambda n: str(n))
def test_flash_block_sizes(dtype, block_q, block_k, record):
    """The torch flash kernel at tile sizes 16 to 256, on a case with every feature: odd lengths and head dim,
    GQA, ALiBi, padding and a fully masked row, a query block not aligned with the key blocks."""
    case = Case(251, 263, head_dim=59, batch=2, heads=4, kv_heads=2, alibi=True, left_padding=(0, 21),
                masked_rows=(5,))
    record(**check_kernel(FlashAttention(block_q, block_k), case, dtype))


# --- model level: the backend under attention=<name> against attention=naive --------------------

N_PREFILL, N_DECODE = 29, 12  # an odd prompt, then one token at a time through the cache


def prefill_then_decode(runner, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits: the first N_PREFILL tokens in one call, then each later token alone, cached."""
    cache = runner.new_cache(tokens.shape[0], tokens.shape[1])
    steps = [(0, N_PREFILL)] + [(t, t + 1) for t in range(N_PREFILL, tokens.shape[1])]
    return torch.cat([runner.forward(cache, tokens[:, a:b], torch.arange(a, b).expand(tokens.shape[0], -1))
                      for a, b in steps], dim=1)


def plain_runner(backend, checkpoint, quant: Quant):
    """attention=naive in the same strategy on this backend; else the harness's plain path for the format
    (harness/references.py: onnxrt's int8/int4 formats simulated in fp64, the reference model in fp32/bf16/fp16).
    Not torch's int8/int4 for another backend: the same name there is another kernel or format."""
    if not backend.missing("attention:naive", f"quant:{quant.value}"):
        return backend.load(checkpoint, Strategy(quant, Attention.NAIVE))
    plain = plain_reference(checkpoint, quant)
    if plain is None:
        pytest.skip(f"no plain path for quant:{quant.value}: {backend.name} lacks attention:naive and the harness "
                    "computes no reference of the format")
    return plain


@pytest.mark.exactness
def test_model_logits_match_naive(backend, load_runner, quant, attention, case, record):
    """Prefill and cached decode logits: error vs the fp64 reference model at most 2x attention=naive's."""
    if attention == Attention.NAIVE:
        pytest.skip("attention=naive is the plain path this test compares against")
    checkpoint = case.checkpoint
    tokens = torch.randint(1, checkpoint.config.vocab_size, (2, N_PREFILL + N_DECODE),
                           generator=torch.Generator().manual_seed(3))
    optimized = prefill_then_decode(load_runner(checkpoint, Strategy(quant, attention)), tokens)
    plain = prefill_then_decode(plain_runner(backend, checkpoint, quant), tokens)
    reference = float64_reference(checkpoint).forward_full(tokens, torch.arange(tokens.shape[1]).expand_as(tokens))
    record(**assert_rule(optimized, plain, reference, fp32=quant == Quant.FP32,
                         what=f"attention {attention.value} in a model: {quant.value}, {checkpoint.name}"))


# --- bench: time and peak extra memory against N ---------------------------------------------------

BENCH_HEADS, BENCH_HEAD_DIM = 2, 64  # naive at N=8192, batch 4 materializes 4*2*8192^2 fp32 scores: 2 GiB
BENCH_SEQ_LENS = [128, 256, 512, 1024, 2048, 4096, 8192]
BENCH_SECONDS = 3.0  # repeats per measurement: enough that a burst of load on a shared machine is outvoted


def causal_inputs(batch: int, seq_len: int) -> tuple:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, BENCH_HEADS, seq_len, BENCH_HEAD_DIM, generator=generator) for _ in range(3))
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril().expand(batch, 1, -1, -1).contiguous()
    return q, k, v, allowed, None, 1.0 / math.sqrt(BENCH_HEAD_DIM)


def bench_inputs(backend_name: str, attention: str, batch: int, seq_len: int) -> tuple:
    """(kernel, args): a causal fp32 prefill of seq_len tokens; importable, so a spawned child can build it.
    The kernel runs once on 320 tokens first: the code pages and buffers a first call maps are not its memory."""
    kernel = get_backend(backend_name)().attention_kernels()[Attention(attention)]
    kernel(*causal_inputs(batch, 320))
    return kernel, causal_inputs(batch, seq_len)


def run_bench_kernel(state: tuple) -> None:
    kernel, args = state
    kernel(*args)


@pytest.mark.bench
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("seq_len", BENCH_SEQ_LENS)
def test_attention_time_and_memory(backend, attention, batch, seq_len, benchmark, record):
    """Peak memory above the inputs, in a fresh spawned child; then the time of one call, in this process."""
    require(backend, "attention-kernels")
    memory = peak_rss_in_child(run_bench_kernel, backend.name, attention.value, batch, seq_len, setup=bench_inputs)
    record(extra_peak_bytes=memory.extra_bytes, baseline_bytes=memory.baseline_bytes)
    record.params(heads=BENCH_HEADS, head_dim=BENCH_HEAD_DIM, dtype="fp32", threads=torch.get_num_threads())
    kernel, args = bench_inputs(backend.name, attention.value, batch, seq_len)
    began = time.perf_counter()
    kernel(*args)  # the warm-up, timed to size the repeats: about BENCH_SECONDS each, at least 3
    rounds = max(3, min(100, int(BENCH_SECONDS / (time.perf_counter() - began))))
    benchmark.pedantic(kernel, args, rounds=rounds, iterations=1)
