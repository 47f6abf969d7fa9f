"""The cross-backend suite is trusted only because it fails on these planted onnxrt faults."""
from pathlib import Path

import pytest

# imported here, not first inside a pytester run: pytester drops the modules a run imported, and onnx's
# extension module aborts the process when it is imported a second time
for _module in ("onnxruntime", "onnx", "onnxruntime.quantization", "onnxruntime.transformers.float16"):
    pytest.importorskip(_module, reason=f"{_module} is not installed: the onnxrt faults cannot run")
from .planted_onnxrt import PLANTED  # noqa: E402

SUITE = str(Path(__file__).resolve().parents[1] / "suites" / "test_cross_backend.py")
CONFIGS = "(rope-gqa or alibi-mqa or learned-mha)"  # three position encodings, three attention kinds


@pytest.fixture
def planted_backends(register_backend):
    for cls in PLANTED.values():
        register_backend(cls)


def run_suite(pytester, backend: str, selection: str, *quants: str):
    options = [arg for quant in quants for arg in ("--quant", quant)]
    return pytester.runpytest_inprocess(SUITE, "--backend", backend, *options, "-k", selection, "-p", "no:randomly",
                                        "-q")


def test_the_real_backend_passes_the_same_selection(pytester, planted_backends):
    result = run_suite(pytester, "onnxrt", f"(fp32_logits and {CONFIGS}) or greedy or oracle", "fp32", "fp16",
                       "int8-dynamic")
    result.assert_outcomes(passed=3 + 3 + 1, skipped=2)  # oracle: fp32 is not lossy, torch has no int8


def test_shifted_positions_after_the_cache_are_caught(pytester, planted_backends):
    result = run_suite(pytester, "onnxrt-shifted-positions", f"(fp32_logits and {CONFIGS}) or greedy", "fp32")
    result.assert_outcomes(failed=3 + 1)


def test_ignored_padding_mask_is_caught(pytester, planted_backends):
    result = run_suite(pytester, "onnxrt-ignores-padding", f"(fp32_logits and {CONFIGS}) or greedy", "fp32")
    result.assert_outcomes(failed=3 + 1)


def test_scrambled_low_precision_logits_are_caught(pytester, planted_backends):
    result = run_suite(pytester, "onnxrt-scrambled-lowp", "greedy or oracle", "fp16", "int8-dynamic")
    # greedy: first mismatch outside the top-k (fp16, int8); oracle: error far above torch fp16's; int8 has no plain
    result.assert_outcomes(failed=3, skipped=1)
