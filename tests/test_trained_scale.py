"""Tolerances that hold on real models (issue 9, part 2).

Checkpoints at a trained model's scale (random weights, the output head scaled so logits reach +-30 to 40) fail the
old fixed bounds although the backends are correct; the oracle rules of harness/oracles.py pass them, and the
planted faults still fail those rules. Lossy formats are judged against the same format simulated in fp64
(harness/references.py), whose quantizers must agree with ONNX Runtime's own.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backends.checkpoint import Checkpoint
from backends.algorithms.generation import generate
from backends.registry import get_backend
from backends.strategies import Quant, Strategy
from harness.models import TINY_RANDOM, random_checkpoint, trained_scale_checkpoint
from harness.oracles import assert_fp32_by_oracle, assert_greedy_agrees, max_abs_error
from harness.references import float64_reference, int4_block_dequantized, uint8_affine

from .faults.kv_cache import FAULTS as KV_FAULTS

# imported here, not first inside a pytester run: pytester drops the modules a run imported, and onnx's
# extension module aborts the process when it is imported a second time
for _module in ("onnxruntime", "onnx", "onnxruntime.quantization", "onnxruntime.transformers.float16",
                "onnxruntime.capi._pybind_state", "onnxruntime.quantization.quant_utils"):
    pytest.importorskip(_module, reason=f"{_module} is not installed: these checks need ONNX Runtime")

SUITES = Path(__file__).resolve().parents[1] / "suites"
OLD_KV_BOUND = 1e-5  # test_kv_cache.py's former fixed fp32 bound (cached vs recomputed logits)
OLD_TOP_K = 5  # test_cross_backend.py's former greedy rule for lossy strategies
# a wider model (vocabulary 4096, 4 layers) on which int4-block128's greedy tokens leave the top-5 early
WIDE = TINY_RANDOM.replace(vocab_size=4096, d_model=256, n_heads=4, n_kv_heads=2, d_ff=688, n_layers=4)


@pytest.fixture(scope="module")
def trained_scale_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("models") / "trained-scale"
    trained_scale_checkpoint(TINY_RANDOM).save(directory)
    return directory


def run_suite(pytester, suite: str, model_dir: Path, *args: str):
    return pytester.runpytest_inprocess(str(SUITES / suite), "--model", str(model_dir), "-m",
                                        "exactness and not config_matrix", "-p", "no:randomly", "-q", *args)


def test_trained_scale_logits_reach_the_magnitude_of_a_real_model():
    checkpoint = trained_scale_checkpoint(TINY_RANDOM)
    tokens = torch.randint(1, checkpoint.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    logits = float64_reference(checkpoint).forward_full(tokens, torch.arange(40)[None])
    assert 20 <= logits.abs().max().item() <= 45


def test_correct_cached_decode_fails_the_old_bound_and_passes_the_oracle():
    """fp32 cached decode vs recompute on the reference backend: more than 1e-5 apart at this scale, both about
    as far from fp64 as each other."""
    checkpoint = trained_scale_checkpoint(TINY_RANDOM)
    runner = get_backend("torch")().load(checkpoint, Strategy(Quant.FP32))
    prompt = torch.randint(1, checkpoint.config.vocab_size, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    cached = generate(runner, [prompt], 32)
    sequence = torch.tensor([prompt + cached.tokens[0]])
    positions = torch.arange(sequence.shape[1])[None]
    recomputed = runner.forward_full(sequence, positions)[0, 6:-1]
    assert max_abs_error(cached.logits[0], recomputed) > OLD_KV_BOUND
    reference = float64_reference(checkpoint).forward_full(sequence, positions)[0, 6:-1]
    assert assert_fp32_by_oracle(cached.logits[0], recomputed, reference).ratio < 2


def test_suites_pass_a_correct_backend_on_a_trained_scale_checkpoint(pytester, trained_scale_dir):
    """The model-level checks of the KV-cache, cross-backend and flash suites, on torch and onnxrt."""
    result = pytester.runpytest_inprocess(
        *(str(SUITES / s) for s in ("test_kv_cache.py", "test_cross_backend.py", "test_flash_attention.py")),
        "--model", str(trained_scale_dir), "--backend", "torch", "--backend", "onnxrt", "-k",
        "not test_flash_attention.py or model_logits", "-m", "exactness and not config_matrix", "-p", "no:randomly",
        "-q")
    outcomes = result.parseoutcomes()
    assert "failed" not in outcomes and "errors" not in outcomes, result.stdout.str()[-3000:]
    assert outcomes["passed"] >= 40


@pytest.mark.parametrize(("fault", "selection", "failed"), [
    ("rope-off-by-one", "cached_decode_matches_recompute or chunked_prefill", 2),
    ("ignores-padding", "left_padded", 1),
    ("no-rollback", "rollback_then_decode", 1),
])
def test_planted_faults_fail_the_oracle_on_a_trained_scale_checkpoint(pytester, register_backend, trained_scale_dir,
                                                                      fault, selection, failed):
    [planted] = [f.backend for f in KV_FAULTS if f.name == fault]
    backend = register_backend(planted)
    result = run_suite(pytester, "test_kv_cache.py", trained_scale_dir, "--backend", backend, "--attention", "sdpa",
                       "-k", selection)
    result.assert_outcomes(failed=failed)
    result.stdout.fnmatch_lines(["*exceeds 2.0 x plain error*"])


def test_old_greedy_rule_fails_a_correct_int4_kernel_that_the_oracle_passes(pytester, tmp_path):
    """int4-block128 on ONNX Runtime against torch fp32: the first greedy mismatch leaves the top-5 (the old rule
    fails), while the logits are as close to fp64 as the int4 format simulated exactly (the oracle passes)."""
    checkpoint = trained_scale_checkpoint(WIDE)
    prompt = torch.randint(1, WIDE.vocab_size, (7,), generator=torch.Generator().manual_seed(7)).tolist()
    ours = generate(get_backend("onnxrt")().load(checkpoint, Strategy(Quant.INT4_BLOCK128)), [prompt], 64)
    theirs = generate(get_backend("torch")().load(checkpoint, Strategy(Quant.FP32)), [prompt], 64)
    with pytest.raises(AssertionError, match="outside the other's top-5"):
        assert_greedy_agrees(ours.tokens[0], ours.logits[0], theirs.tokens[0], theirs.logits[0], top_k=OLD_TOP_K)
    checkpoint.save(tmp_path / "wide")
    result = run_suite(pytester, "test_cross_backend.py", tmp_path / "wide", "--backend", "onnxrt", "--quant",
                       "int4-block128", "-k", "low_precision")
    result.assert_outcomes(passed=1)


def test_simulated_int4_blocks_equal_onnxruntime_quantizer():
    """MatMulNBits' symmetric 4-bit block quantizer (the C++ one quantize.py uses) dequantizes to the simulation,
    including an input dimension that is not a whole number of blocks."""
    from onnxruntime.capi import _pybind_state as capi

    weight = torch.randn(6, 80, generator=torch.Generator().manual_seed(0))  # (out, in): 80 = 2.5 blocks of 32
    block, out_features, in_features = 32, *weight.shape
    blocks = -(-in_features // block)
    matrix = torch.nn.functional.pad(weight, (0, blocks * block - in_features)).T.contiguous().numpy()  # (K, N)
    packed = torch.zeros(out_features, blocks, block // 2, dtype=torch.uint8).numpy()
    scales = torch.zeros(out_features, blocks).numpy()
    zero_points = torch.zeros(out_features, (blocks + 1) // 2, dtype=torch.uint8).numpy()
    capi.quantize_matmul_4bits(packed, matrix, scales, zero_points, block, out_features, blocks * block, True)
    nibbles = torch.from_numpy(packed)
    q = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=-1).reshape(out_features, blocks, block).double()
    theirs = ((q - 8) * torch.from_numpy(scales).double()[..., None]).reshape(out_features, -1)[:, :in_features]
    assert torch.equal(int4_block_dequantized(weight, block), theirs)


def test_simulated_uint8_per_channel_equals_onnxruntime_quantizer():
    """quantize_dynamic's QUInt8 per-channel weights: the same zero points, scales and integers."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    weight = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    weight[0] = weight[0].abs()  # a channel with no negative weight: the range is widened to include 0
    q, scale, zero_point = uint8_affine(weight.double(), dim=1)
    for channel in range(weight.shape[0]):
        their_zero_point, their_scale, their_q = quantize_data(weight[channel].numpy(), TensorProto.UINT8, False)
        assert zero_point[channel].item() == int(their_zero_point)
        assert scale[channel].item() == float(their_scale)
        assert torch.equal(q[channel], torch.from_numpy(their_q.astype("float64")))


def near_constant_checkpoint(seed: int) -> Checkpoint:
    """Weights of std 0.01, every matrix drawn from the same seed (equal shapes, equal values): the target predicts
    nearly the same token everywhere, and its noisy stand-in draft (suites/test_speculative.py) agrees with it
    almost always, so k=3 on the default prompts never rejects a draft."""
    weights = {name: tensor if "norm" in name else
               0.01 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed))
               for name, tensor in random_checkpoint(TINY_RANDOM, seed).weights.items()}
    return Checkpoint(f"near-constant-s{seed}", TINY_RANDOM, weights)


@pytest.mark.parametrize(("seed", "outcome"), [(11, "passed"), (2, "skipped")])
def test_draft_cache_check_meets_its_precondition_or_says_why(pytester, tmp_path, seed, outcome):
    """The draft-cache check needs a fully accepted round and a rejection; at k=3 on the default prompts these
    targets give no rejection, which used to fail the test ("need both full acceptance and rejections"). It now
    tries other k and prompts: seed 11 gives both at k=2, seed 2 never rejects, and the test skips saying so."""
    model_dir = tmp_path / f"near-constant-s{seed}"  # its own name: the suite keeps one draft per target name
    near_constant_checkpoint(seed).save(model_dir)
    result = pytester.runpytest_inprocess(str(SUITES / "test_speculative.py"), "--model", str(model_dir),
                                          "-k", "draft_cache_follows", "-p", "no:randomly", "-q", "-rs")
    result.assert_outcomes(**{outcome: 1})
    if outcome == "skipped":
        result.stdout.fnmatch_lines(["*no run had both a fully accepted round and a rejection (12 runs*0 rejections*"])
