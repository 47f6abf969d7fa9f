"""suites/test_quantization.py is trusted because it fails on each planted quantization fault (tests/planted_quant.py)
and passes the same selection on the reference backend."""
from pathlib import Path

import pytest

from .planted_quant import PLANTED

SUITE = str(Path(__file__).resolve().parents[1] / "suites" / "test_quantization.py")


@pytest.fixture
def planted_backends(register_backend):
    for cls in PLANTED.values():
        register_backend(cls)


def run_suite(pytester, backend: str, quant: str, selection: str):
    return pytester.runpytest_inprocess(SUITE, "-m", "exactness", "--backend", backend, "--quant", quant,
                                        "-k", selection, "-p", "no:randomly", "-q")


@pytest.mark.parametrize("quant", ["fp8", "int4-block32"])
def test_reference_backend_passes(pytester, planted_backends, quant):
    run_suite(pytester, "torch", quant, "dequantize_then_matmul or round_trips").assert_outcomes(passed=2)


def test_reference_kv_quantizer_passes(pytester, planted_backends):
    run_suite(pytester, "torch", "int8-kv", "kv_quantizer").assert_outcomes(passed=1)


@pytest.mark.parametrize("planted, quant", [("scales-wrong-axis", "fp8"), ("zero-point-off-by-one", "int4-block32"),
                                            ("groups-shifted", "int4-block32")])
def test_faulty_kernel_is_caught(pytester, planted_backends, planted, quant):
    result = run_suite(pytester, planted, quant, "dequantize_then_matmul")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*the {quant} kernel differs from dequantize-then-matmul*"])


def test_clipping_kv_quantizer_is_caught(pytester, planted_backends):
    result = run_suite(pytester, "kv-clips", "int8-kv", "kv_quantizer")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the KV quantizer moves an element by more than half a step*"])
