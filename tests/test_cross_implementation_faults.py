"""The cross-implementation suite is trusted only because it fails on these planted faults.

Each fault is one plausible mistake in reading a foreign checkpoint or in the model's conventions; the suite
runs in-process with the fault patched in and must fail exactly where the fault shows.
"""
from pathlib import Path

import pytest
import torch

import backends.checkpoint
import backends.families.gpt2
import backends.families.gpt_neox
import backends.torch_ref.attention
import backends.torch_ref.model
from backends.checkpoint import ModelConfig
from backends.registry import register, unregister
from harness.models import random_checkpoint

from .planted_faults import PLANTED

transformers = pytest.importorskip("transformers", reason="transformers (an optional test dependency) is not installed")
# pytester's in-process runs unload the modules each run imported; transformers imports lazily, and a
# second import of its modules breaks save_pretrained. Import the classes the suite uses here, once.
for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
             "GPT2LMHeadModel", "GPTNeoXForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"):
    getattr(transformers, name)

SUITE = str(Path(__file__).resolve().parents[1] / "suites" / "test_cross_implementation.py")


def run_suite(pytester, selection: str, backend: str = "torch", *options: str):
    return pytester.runpytest_inprocess(SUITE, "-m", "exactness", "--backend", backend, "-k", selection,
                                        "-p", "no:randomly", "-q", *options)


def run_on_model(pytester, model, backend: str = "torch"):
    """The suite on the --model checkpoint alone (the configuration matrix left out)."""
    return pytester.runpytest_inprocess(SUITE, "-m", "exactness and not config_matrix", "--backend", backend,
                                        "--model", str(model), "-p", "no:randomly", "-rA", "-q")


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """A Qwen3 directory as transformers writes it: the user's own checkpoint, in a directory named my-qwen3."""
    from suites.test_cross_implementation import FAMILIES, redraw_weights

    _, model_class, keywords = FAMILIES["qwen3"]
    model = getattr(transformers, model_class)(transformers.Qwen3Config(**keywords))
    redraw_weights(model, seed=11)
    directory = tmp_path_factory.mktemp("user") / "my-qwen3"
    model.save_pretrained(directory)
    return directory


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
    faithful = backends.families.gpt2.gpt2_weights

    def k_before_q(weights, config, source):
        out = faithful(weights, config, source)
        for name in [n for n in out if ".q_proj." in n]:
            k_name = name.replace(".q_proj.", ".k_proj.")
            out[name], out[k_name] = out[k_name], out[name]
        return out

    monkeypatch.setattr(backends.families.gpt2, "gpt2_weights", k_before_q)
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


# --- the --model checkpoint ----------------------------------------------------------------------------


def test_the_model_checkpoint_is_compared_and_named(pytester, qwen3_dir):
    result = run_on_model(pytester, qwen3_dir)
    result.assert_outcomes(passed=3)  # logits, greedy with and without the cache: on my-qwen3 only
    result.stdout.fnmatch_lines(["PASSED*test_logits_match_transformers?torch-model-my-qwen3?"])
    result = run_on_model(pytester, qwen3_dir, backend="onnxrt")
    result.assert_outcomes(passed=3)


def test_a_fault_shows_on_the_model_checkpoint(pytester, qwen3_dir, monkeypatch):
    monkeypatch.setattr(backends.torch_ref.model, "apply_rope", interleaved_rope)
    result = run_on_model(pytester, qwen3_dir)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(["*test_logits_match_transformers?torch-model-my-qwen3?*",
                                 "*my-qwen3: logits differ from transformers'*"])


def test_a_model_transformers_cannot_read_is_skipped_naming_why(pytester, tmp_path):
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, position="alibi")
    random_checkpoint(config).save(tmp_path / "mine")
    result = run_on_model(pytester, tmp_path / "mine")
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines(["*mine: transformers has no class for its layout (ExactbenchDecoder)*"])


# --- the families' conventions -------------------------------------------------------------------------


def test_neox_qkv_read_as_three_blocks_is_caught(pytester, monkeypatch):
    """GPT-NeoX groups q, k, v by head; reading the fused rows as q|k|v blocks (Phi-3's layout) is a port bug."""
    faithful = backends.families.gpt_neox.gpt_neox_weights

    def blockwise(weights, config, source):
        out = faithful(weights, config, source)
        for name, tensor in weights.items():
            if ".attention.query_key_value." in name:
                prefix = name.replace("gpt_neox.layers.", "model.layers.").replace("attention.query_key_value", "self_attn")
                kind = name.rsplit(".", 1)[1]
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    out[prefix.rsplit(".", 1)[0] + f".{proj}.{kind}"] = part.contiguous()
        return out

    monkeypatch.setattr(backends.families.gpt_neox, "gpt_neox_weights", blockwise)
    result = run_suite(pytester, "logits and gpt-neox")
    result.assert_outcomes(failed=2)


def test_residual_kind_swapped_is_caught(pytester, monkeypatch):
    """use_parallel_residual read the wrong way round: both GPT-NeoX layouts fail."""
    faithful = backends.families.gpt_neox.gpt_neox_config

    def swapped(hf, source):
        config = faithful(hf, source)
        return config.replace(parallel_residual=not config.parallel_residual)

    monkeypatch.setattr(backends.families.gpt_neox, "gpt_neox_config", swapped)
    result = run_suite(pytester, "logits and gpt-neox")
    result.assert_outcomes(failed=2)


def test_qk_norm_loaded_but_not_applied_is_caught(pytester, monkeypatch):
    attention = backends.torch_ref.model.SelfAttention
    faithful = attention.__init__

    def init_without_qk_norm(self, config, kernel):
        faithful(self, config, kernel)
        if config.qk_norm:  # the weights load; the norms pass their input through
            self.q_norm.forward = self.k_norm.forward = lambda x: x

    monkeypatch.setattr(attention, "__init__", init_without_qk_norm)
    result = run_suite(pytester, "logits and qwen3")
    result.assert_outcomes(failed=1)


def test_llama3_rope_read_as_linear_scaling_is_caught(pytester, monkeypatch):
    monkeypatch.setitem(backends.checkpoint._HF_ROPE_KIND, "llama3", "linear")
    result = run_suite(pytester, "logits and llama3-rope")
    result.assert_outcomes(failed=1)


def test_sliding_window_ignored_is_caught(pytester, monkeypatch):
    """Every key visible in the sliding layers: right until the sequence outgrows the window (8 of 24 tokens)."""
    monkeypatch.setattr(backends.torch_ref.model, "within_window",
                        lambda allowed, query_positions, key_positions, window: allowed)
    result = run_suite(pytester, "logits and (gemma2 or gemma3 or window or llama-gqa)")
    result.assert_outcomes(failed=4, passed=1)


def test_attention_softcap_ignored_is_caught(pytester, monkeypatch):
    monkeypatch.setattr(backends.torch_ref.model, "naive_attention",
                        lambda q, k, v, allowed, bias, scale, score_cap=None:
                        backends.torch_ref.attention.naive_attention(q, k, v, allowed, bias, scale))
    result = run_suite(pytester, "logits and gemma2")
    result.assert_outcomes(failed=1)


def test_longrope_long_factors_never_used_is_caught(pytester, monkeypatch):
    """LongRoPE switches to its long divisors once a sequence passes the original context (32 of 24 + 32 here)."""
    faithful = backends.torch_ref.model.rope_frequencies
    monkeypatch.setattr(backends.torch_ref.model, "rope_frequencies", lambda config, seq_len: faithful(config, 1))
    result = run_suite(pytester, "greedy and phi3-longrope")
    result.assert_outcomes(failed=2)
