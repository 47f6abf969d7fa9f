"""The cross-implementation suite is trusted only because it fails on these planted faults.

Each fault is one plausible mistake in reading a foreign checkpoint or in the model's conventions; the suite
runs in-process with the fault patched in and must fail exactly where the fault shows.
"""
from pathlib import Path

import pytest
import torch

import backends.hf_gpt2
import backends.torch_ref.model
from backends.registry import register, unregister

from .planted_faults import PLANTED

transformers = pytest.importorskip("transformers", reason="transformers (an optional test dependency) is not installed")
# pytester's in-process runs unload the modules each run imported; transformers imports lazily, and a
# second import of its modules breaks save_pretrained. Import the classes the suite uses here, once.
for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel"):
    getattr(transformers, name)

SUITE = str(Path(__file__).resolve().parents[1] / "suites" / "test_cross_implementation.py")


def run_suite(pytester, selection: str, backend: str = "torch"):
    return pytester.runpytest_inprocess(SUITE, "-m", "exactness", "--backend", backend, "-k", selection,
                                        "-p", "no:randomly", "-q")


def interleaved_rope(x, cos, sin):
    """GPT-J's convention (rotate pairs 2i, 2i+1) applied to half-split (Llama) tables: a classic port bug."""
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def test_reference_passes_the_selection(pytester):
    result = run_suite(pytester, "logits and (llama-gqa or qwen2 or gpt2)")
    result.assert_outcomes(passed=3)


def test_interleaved_rope_is_caught(pytester, monkeypatch):
    monkeypatch.setattr(backends.torch_ref.model, "apply_rope", interleaved_rope)
    result = run_suite(pytester, "logits and (llama-gqa or qwen2 or gpt2)")
    result.assert_outcomes(failed=2, passed=1)  # GPT-2 has learned positions: no RoPE to get wrong
    result.stdout.fnmatch_lines(["*llama-gqa*logits differ from transformers'*", "*qwen2-tied*logits differ*"])


def test_fused_qkv_split_in_the_wrong_order_is_caught(pytester, monkeypatch):
    faithful = backends.hf_gpt2.gpt2_weights

    def k_before_q(weights, config, source):
        out = faithful(weights, config, source)
        for name in [n for n in out if ".q_proj." in n]:
            k_name = name.replace(".q_proj.", ".k_proj.")
            out[name], out[k_name] = out[k_name], out[name]
        return out

    monkeypatch.setattr(backends.hf_gpt2, "gpt2_weights", k_before_q)
    result = run_suite(pytester, "logits and gpt2")
    result.assert_outcomes(failed=1)


def test_position_off_by_one_after_the_cache_is_caught(pytester):
    register(PLANTED["rope-off-by-one"])
    try:
        result = run_suite(pytester, "greedy and (llama-gqa or gpt2)", backend="rope-off-by-one")
    finally:
        unregister("rope-off-by-one")
    result.assert_outcomes(failed=2, passed=2)  # the cached path fails, recomputing the whole sequence does not
    result.stdout.fnmatch_lines(["*FAILED*greedy*llama-gqa-cache*", "*FAILED*greedy*gpt2-cache*"])
