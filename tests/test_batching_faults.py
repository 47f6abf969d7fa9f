"""The batching suite is trusted only because it fails on these planted faults.

Each test plants one fault (a planted-fault backend, or one function of the block manager swapped for a faulty
copy), runs a selection of suites/test_batching.py in process, and asserts which tests fail and why.
"""
import hashlib
from pathlib import Path

from backends.algorithms.serving import block_manager

from .planted_faults import PLANTED
from .planted_onnxrt import PLANTED as PLANTED_ONNXRT

SUITE = str(Path(__file__).resolve().parents[1] / "suites" / "test_batching.py")
MODEL = "tiny-random"  # the outcomes asserted below are for this model, whatever the default model is


def run_suite(pytester, selection: str, backend: str = "torch", *batching: str):
    options = [arg for name in batching for arg in ("--batching", name)]
    return pytester.runpytest_inprocess(SUITE, "-m", "exactness", "--backend", backend, "--model", MODEL,
                                        *options, "-k", selection, "-p", "no:randomly", "-q")


def test_reference_passes_the_same_selections(pytester):
    result = run_suite(pytester, "random-arrivals or paged_step or prefix_cache or salt", "torch",
                       "continuous", "paged", "paged-prefix")
    result.assert_outcomes(passed=6)


def test_block_table_off_by_one_is_caught(pytester, register_backend):
    name = register_backend(PLANTED["block-table-off-by-one"])
    result = run_suite(pytester, "paged_step or random-arrivals", name, "paged")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines_random(["FAILED *test_paged_step_matches_contiguous*",
                                        "FAILED *test_each_request_as_alone*paged-random-arrivals*"])


def test_onnxrt_gather_off_by_one_is_caught(pytester, register_backend):
    """onnxrt's paged graph reads keys and values through the next block-table entry."""
    name = register_backend(PLANTED_ONNXRT["onnxrt-gather-off-by-one"])
    result = run_suite(pytester, "paged_step or random-arrivals", name, "paged")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines_random(["FAILED *test_paged_step_matches_contiguous*",
                                        "FAILED *test_each_request_as_alone*paged-random-arrivals*"])


def test_prefix_hash_ignoring_the_parent_is_caught(pytester, monkeypatch):
    """A block is identified by its own tokens alone: a prompt whose first block equals another's second block
    takes that block (computed after another block, at other positions)."""
    monkeypatch.setattr(block_manager, "block_hash",
                        lambda parent, tokens, salt: hashlib.sha256(repr((tokens, salt)).encode()).digest())
    result = run_suite(pytester, "prefix_cache")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*a block equal to another's second block was taken for a first block*"])


def test_prefix_hash_ignoring_the_salt_is_caught(pytester, monkeypatch):
    """Another model serving the same prompts through the same pool takes the first model's blocks."""
    monkeypatch.setattr(block_manager, "block_hash",
                        lambda parent, tokens, salt: hashlib.sha256(repr((parent, tokens)).encode()).digest())
    result = run_suite(pytester, "salt")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the other model found * tokens of the first model's blocks in the cache*"])


def test_retired_blocks_not_freed_is_caught(pytester, monkeypatch):
    """A finished (or preempted) sequence's blocks are never given back."""
    monkeypatch.setattr(block_manager.BlockManager, "release", lambda self, seq: None)
    result = run_suite(pytester, "random-arrivals or burst", "torch", "paged")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*blocks still held after every request finished*"])


def test_row_reused_without_reset_is_caught(pytester, register_backend):
    name = register_backend(PLANTED["row-not-reset"])
    result = run_suite(pytester, "random-arrivals", name, "continuous")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*tokens * differ from its tokens alone*"])
