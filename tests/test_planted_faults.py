"""The KV-cache suite is trusted only because it fails on these planted faults."""
from pathlib import Path

import pytest

from .planted_faults import PLANTED

KV_SUITE = str(Path(__file__).resolve().parents[1] / "suites" / "test_kv_cache.py")
CASES = 1 + 7 * 3  # the --model checkpoint, then the matrix: 7 exact position encodings x MHA/GQA/MQA


@pytest.fixture
def planted_backends(register_backend):
    for cls in PLANTED.values():
        register_backend(cls)


def run_kv_suite(pytester, backend: str, selection: str):
    return pytester.runpytest_inprocess(KV_SUITE, "-m", "exactness", "--backend", backend, "--attention", "sdpa",
                                        "-k", selection, "-p", "no:randomly", "-q")


def test_reference_backend_passes_the_same_selection(pytester, planted_backends):
    result = run_kv_suite(pytester, "torch", "cached_decode_matches_recompute or left_padded or rollback")
    result.assert_outcomes(passed=2 * CASES + 1)


def test_rope_off_by_one_after_the_cache_is_caught(pytester, planted_backends):
    result = run_kv_suite(pytester, "rope-off-by-one", "cached_decode_matches_recompute or chunked_prefill")
    # every model sees the shifted positions: the --model checkpoint and all 21 configurations, in both tests
    result.assert_outcomes(failed=2 * CASES)


def test_ignored_padding_mask_is_caught(pytester, planted_backends):
    result = run_kv_suite(pytester, "ignores-padding", "left_padded")
    result.assert_outcomes(failed=CASES)


def test_cache_not_rolled_back_is_caught(pytester, planted_backends):
    result = run_kv_suite(pytester, "no-rollback", "rollback_then_decode")
    result.assert_outcomes(failed=1)
