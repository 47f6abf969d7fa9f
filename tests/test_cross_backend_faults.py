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
    # fp32 logits on 3 configurations, greedy (fp32), the oracle for fp16 (against torch fp16) and int8-dynamic
    # (against the format simulated); the oracle skips fp32
    result.assert_outcomes(passed=3 + 1 + 2, skipped=1)


def test_shifted_positions_after_the_cache_are_caught(pytester, planted_backends):
    result = run_suite(pytester, "onnxrt-shifted-positions", f"(fp32_logits and {CONFIGS}) or greedy", "fp32")
    result.assert_outcomes(failed=3 + 1)


def test_ignored_padding_mask_is_caught(pytester, planted_backends):
    result = run_suite(pytester, "onnxrt-ignores-padding", f"(fp32_logits and {CONFIGS}) or greedy", "fp32")
    result.assert_outcomes(failed=3 + 1)


def test_scrambled_low_precision_logits_are_caught(pytester, planted_backends):
    result = run_suite(pytester, "onnxrt-scrambled-lowp", "oracle", "fp16", "int8-dynamic")
    # error far above torch fp16's (fp16) and above the simulated int8 format's (int8-dynamic)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*exceeds 2.0 x plain error*"])
