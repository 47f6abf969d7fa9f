"""Loading model directories: every kind of bad input gets a one-line error naming the file and the problem;
the Hugging Face config layouts of each supported family map onto the reference model and back."""
import json

import pytest
import torch
from safetensors.torch import save_file

from backends.checkpoint import (CheckpointError, CheckpointWarning, ModelConfig, RopeScaling, from_hf_config, load_checkpoint,
                                 to_hf_config)
from backends.torch_ref.backend import build_model
from harness.models import random_checkpoint

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64)
LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}


def saved(tmp_path, config: ModelConfig = TINY):
    random_checkpoint(config).save(tmp_path)
    return tmp_path


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def config_error(hf: dict) -> str:
    with pytest.raises(CheckpointError) as error:
        from_hf_config(hf, "x/config.json")
    assert "\n" not in str(error.value)
    return str(error.value)


def test_directory_without_config_json(tmp_path):
    assert load_error(tmp_path) == f"{tmp_path / 'config.json'}: missing (a model directory needs config.json)"


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(TINY)))
    assert load_error(tmp_path) == f"{tmp_path}: no *.safetensors weights"


def test_pickle_checkpoint_is_named_and_never_loaded(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(TINY)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle would run code on load")
    assert "pytorch_model.bin are pickles, which are never loaded" in load_error(tmp_path)


def test_unreadable_safetensors_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(TINY)))
    (tmp_path / "model.safetensors").write_bytes(b"truncated")
    assert load_error(tmp_path).startswith(f"{tmp_path / 'model.safetensors'}: unreadable safetensors file")


def test_mismatched_tensor_shape_names_the_tensor(tmp_path):
    saved(tmp_path)
    weights = load_checkpoint(tmp_path).weights
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)
    save_file(weights, str(tmp_path / "model.safetensors"))
    assert load_error(tmp_path) == f"{tmp_path}: model.layers.0.mlp.up_proj.weight has shape (65, 32), config needs (64, 32)"


def test_mismatched_tensor_shape_is_a_usage_error_before_any_test(tmp_path, pytester):
    """Loading is eager: a checkpoint that does not fit its config stops the run at configure time, exit 4,
    with one line naming the tensor (not a failure repeated by every test)."""
    model = saved(tmp_path / "model")
    weights = load_checkpoint(model).weights
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(weights, str(model / "model.safetensors"))
    pytester.makepyfile("def test_anything(checkpoint): pass")
    result = pytester.runpytest_inprocess("--model", str(model), "-p", "no:randomly")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {model}: model.layers.0.self_attn.k_proj.weight has shape (8, 32), "
                                 "config needs (16, 32)"])
    result.stdout.no_fnmatch_line("*test_anything*")


def test_in_memory_checkpoint_is_checked_when_built():
    checkpoint = random_checkpoint(TINY)
    checkpoint.weights["model.norm.weight"] = torch.ones(31)
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(31,\), config needs \(32,\)"):
        build_model(checkpoint)


def test_tokenizer_larger_than_the_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models

    saved(tmp_path)
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0")).save(str(tmp_path / "tokenizer.json"))
    assert load_error(tmp_path) == (f"{tmp_path / 'tokenizer.json'}: token id 99 does not fit the model's vocab_size 64"
                                    " (config.json)")


def test_unreadable_tokenizer(tmp_path):
    saved(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert load_error(tmp_path).startswith(f"{tmp_path / 'tokenizer.json'}: unreadable tokenizer (")


def test_unsupported_architecture_names_the_supported_ones():
    message = config_error({**LLAMA, "architectures": ["FalconForCausalLM"]})
    assert message == ("x/config.json: unsupported architecture ['FalconForCausalLM']; supported: LlamaForCausalLM, "
                       "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, GPT2LMHeadModel, "
                       "GPTNeoXForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, ExactbenchDecoder")


@pytest.mark.parametrize("change, expected", [
    ({"rope_scaling": {"rope_type": "su", "factor": 8.0}}, "unsupported rope_scaling type 'su'"),
    # the type is named before the keys it would have read
    ({"rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [2.0]}}, "unsupported rope_scaling type 'su'"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0], "factor": 2.0}},
     "longrope short_factor and long_factor have [1] entries; accepted: rotary_dim / 2 = 4 each"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.7}}, "unsupported RoPE parameters ['mscale']"),
    ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 16, "use_sliding_window": True},
     "sliding_window=16 with use_sliding_window=true unsupported for Qwen2ForCausalLM"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' unsupported; supported: silu"),
    ({"mlp_bias": True}, "mlp_bias=true unsupported"),
], ids=["su-rope", "su-rope-factors", "longrope-lengths", "yarn-mscale", "qwen-sliding-window", "gelu-llama", "mlp-bias"])
def test_unsupported_llama_family_options(change, expected):
    assert expected in config_error({**LLAMA, **change})


@pytest.mark.parametrize("change, expected", [
    ({"activation_function": "gelu"}, "activation_function 'gelu' unsupported; supported: gelu_new, gelu_pytorch_tanh"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True unsupported"),
])
def test_unsupported_gpt2_options(change, expected):
    assert expected in config_error({"architectures": ["GPT2LMHeadModel"], **change})


@pytest.mark.parametrize("change, expected", [
    ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new' unsupported; supported: gelu"),
    ({"attention_bias": False}, "attention_bias=false unsupported"),
    ({"rotary_pct": 0.1}, "rotary_fraction=0.1 gives 0 rotary dims of 8"),
])
def test_unsupported_gpt_neox_options(change, expected):
    hf = {"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 4, "intermediate_size": 64}
    assert expected in config_error({**hf, **change})


@pytest.mark.parametrize("architecture, name, rows", [
    ("GPTNeoXForCausalLM", "gpt_neox.layers.0.attention.query_key_value.weight", "3 * hidden_size = 96 fused q/k/v rows"),
    ("Phi3ForCausalLM", "model.layers.0.self_attn.qkv_proj.weight", "64 fused rows (32 + 16 + 16)"),
    ("Phi3ForCausalLM", "model.layers.0.mlp.gate_up_proj.weight", "128 fused rows (64 + 64)"),
])
def test_fused_weights_of_the_wrong_width(tmp_path, architecture, name, rows):
    hf = {**LLAMA, "architectures": [architecture]}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    save_file({name: torch.zeros(40, 32)}, str(tmp_path / "model.safetensors"))
    assert load_error(tmp_path) == f"{tmp_path}: {name} has shape (40, 32), config needs {rows}"


def test_gpt2_fused_qkv_of_the_wrong_width(tmp_path):
    hf = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 64, "n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 16}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    save_file({"h.0.attn.c_attn.weight": torch.zeros(32, 64)}, str(tmp_path / "model.safetensors"))
    assert "h.0.attn.c_attn.weight has shape (32, 64), config needs 3 * n_embd = 96" in load_error(tmp_path)


def test_missing_config_key():
    hf = dict(LLAMA)
    del hf["intermediate_size"]
    assert config_error(hf) == "x/config.json: missing key 'intermediate_size'"


@pytest.mark.parametrize("config, architecture", [
    (TINY, "LlamaForCausalLM"),
    (TINY.replace(qkv_bias=True, out_bias=True), "LlamaForCausalLM"),  # Llama's attention_bias: q, k, v and o
    (TINY.replace(qkv_bias=True, tie_embeddings=True), "Qwen2ForCausalLM"),  # biases on q, k, v only
    (TINY.replace(out_bias=True), "ExactbenchDecoder"),
    (TINY.replace(rope_scaling=RopeScaling("yarn", 4.0, 32, beta_fast=16.0)), "LlamaForCausalLM"),
    (TINY.replace(position="learned", norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True), "ExactbenchDecoder"),
    (TINY.replace(qk_norm=True), "Qwen3ForCausalLM"),
    (TINY.replace(rope_scaling=RopeScaling("longrope", 4.0, 16, short_factor=(1, 2, 3, 4), long_factor=(5, 6, 7, 8),
                                           attention_factor=1.5)), "LlamaForCausalLM"),
    (TINY.replace(norm="rmsnorm-plus-one", mlp="geglu", sandwich_norms=True, embed_scale=True, query_pre_attn_scalar=8,
                  attn_softcap=50.0, logit_softcap=30.0, sliding_window=4, sliding_layers=(0,), local_rope_theta=1000.0,
                  qk_norm=True), "ExactbenchDecoder"),  # Gemma's layout
    (TINY.replace(rope_scaling=RopeScaling("llama3", 8.0, 32, low_freq_factor=2.0, high_freq_factor=8.0)),
     "LlamaForCausalLM"),
    (TINY.replace(norm="layernorm", mlp="gelu-exact", qkv_bias=True, out_bias=True, rotary_fraction=0.25,
                  parallel_residual=True), "ExactbenchDecoder"),  # GPT-NeoX's layout
], ids=["llama", "llama-bias", "qwen2", "out-bias-only", "yarn-betas", "gpt2-like", "qwen3", "longrope", "gemma-like", "llama3",
                               "neox-like"])
def test_config_round_trips_through_config_json(config, architecture):
    hf = json.loads(json.dumps(to_hf_config(config)))
    assert hf["architectures"] == [architecture]
    assert from_hf_config(hf) == config


def test_phi3_longrope_as_transformers_4_wrote_it():
    """original_max_position_embeddings beside rope_scaling, no factor: it is max / original."""
    hf = {**LLAMA, "architectures": ["Phi3ForCausalLM"], "max_position_embeddings": 131072,
          "original_max_position_embeddings": 4096,
          "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 3.0, 4.0, 5.0]}}
    assert from_hf_config(hf).rope_scaling == RopeScaling("longrope", 32.0, 4096, short_factor=(1.0, 1.1, 1.2, 1.3),
                                                          long_factor=(2.0, 3.0, 4.0, 5.0))


def test_sliding_window_is_read_where_transformers_reads_it():
    """Mistral and Phi-3 slide on every layer once the window is shorter than the context; Llama has no window."""
    mistral = from_hf_config({**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 16,
                              "max_position_embeddings": 64})
    assert (mistral.sliding_window, mistral.sliding_layers) == (16, (0,))
    assert from_hf_config({**LLAMA, "sliding_window": 16, "max_position_embeddings": 64}).sliding_window is None
    long = from_hf_config({**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 4096,
                           "max_position_embeddings": 4096})
    assert long.sliding_window is None


def test_transformers5_rope_parameters():
    hf = {**LLAMA, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}
    config = from_hf_config(hf)
    assert (config.rope_theta, config.rope_scaling) == (500.0, RopeScaling("linear", 2.0))


# --- what transformers loads loads here too --------------------------------------------------------


def test_tied_head_stored_beside_the_embedding_loads(tmp_path):
    checkpoint = random_checkpoint(TINY.replace(tie_embeddings=True))
    checkpoint.save(tmp_path)
    save_file({**checkpoint.weights, "lm_head.weight": checkpoint.weights["model.embed_tokens.weight"].clone()},
              str(tmp_path / "model.safetensors"))
    assert load_checkpoint(tmp_path).weights.keys() == checkpoint.weights.keys()


def test_tied_head_that_differs_from_the_embedding_is_refused(tmp_path):
    checkpoint = random_checkpoint(TINY.replace(tie_embeddings=True))
    checkpoint.save(tmp_path)
    head = checkpoint.weights["model.embed_tokens.weight"] + 1
    save_file({**checkpoint.weights, "lm_head.weight": head}, str(tmp_path / "model.safetensors"))
    assert load_error(tmp_path) == (f"{tmp_path}: lm_head.weight differs from model.embed_tokens.weight although "
                                    "config.json says tie_word_embeddings=true (set it to false if the head is its own)")


def test_legacy_rotary_inv_freq_buffers_are_ignored(tmp_path):
    checkpoint = random_checkpoint(TINY)
    checkpoint.save(tmp_path)
    legacy = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    save_file({**checkpoint.weights, **legacy}, str(tmp_path / "model.safetensors"))
    assert load_checkpoint(tmp_path).weights.keys() == checkpoint.weights.keys()


def test_config_without_architectures_is_read_by_model_type():
    hf = {k: v for k, v in LLAMA.items() if k != "architectures"}
    assert from_hf_config({**hf, "model_type": "llama"}) == from_hf_config(LLAMA)
    assert "unsupported model_type 'falcon' (and no architectures)" in config_error({**hf, "model_type": "falcon"})


def test_unknown_model_type_with_a_known_architecture_says_which_was_used(tmp_path):
    saved(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "my-llama"}))
    with pytest.warns(CheckpointWarning) as warned:
        load_checkpoint(tmp_path)
    assert str(warned[0].message) == (f"{tmp_path / 'config.json'}: model_type 'my-llama' is not LlamaForCausalLM's; "
                                      "read as LlamaForCausalLM (from architectures)")


def test_llama3_rope_scaling_is_read():
    hf = {**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    assert from_hf_config(hf).rope_scaling == RopeScaling("llama3", 8.0, 8192, low_freq_factor=1.0, high_freq_factor=4.0)


def test_llama3_frequencies_keep_short_wavelengths_and_interpolate_long_ones():
    """Llama 3.1's rule on the frequencies of head_dim 128, theta 500000, original context 8192, factor 8:
    a wavelength under 8192/4 is kept, one over 8192/1 is divided by 8, and those between lie in between."""
    from backends.torch_ref.model import rope_frequencies

    config = ModelConfig(vocab_size=8, d_model=1024, n_layers=1, n_heads=8, n_kv_heads=8, d_ff=8, rope_theta=500000.0,
                         rope_scaling=RopeScaling("llama3", 8.0, 8192, low_freq_factor=1.0, high_freq_factor=4.0))
    scaled, magnitude = rope_frequencies(config, 1)
    plain, _ = rope_frequencies(config.replace(rope_scaling=None), 1)
    wavelength = 2 * torch.pi / plain
    short, long = wavelength < 8192 / 4, wavelength > 8192
    assert short.any() and long.any() and (~short & ~long).any()
    assert torch.equal(scaled[short], plain[short]) and torch.allclose(scaled[long], plain[long] / 8, rtol=1e-15)
    between = ~short & ~long
    assert bool(((scaled[between] < plain[between]) & (scaled[between] > plain[between] / 8)).all())
    assert magnitude == 1.0


def test_attention_softcap_refuses_kernels_that_cannot_cap():
    """Gemma 2's soft-capped scores exist only in the naive kernel: the default picks it, others are refused."""
    from backends.base import UnsupportedModel
    from backends.strategies import Attention

    checkpoint = random_checkpoint(TINY.replace(attn_softcap=50.0))
    assert build_model(checkpoint).model.layers[0].self_attn.kernel.func.__name__ == "naive_attention"
    with pytest.raises(UnsupportedModel, match="attention soft-capping .Gemma 2. needs the scores materialized: "
                                               "attention naive only, not sdpa"):
        build_model(checkpoint, Attention.SDPA)


@pytest.mark.parametrize("config_class, architecture", [
    ("LlamaConfig", "LlamaForCausalLM"), ("MistralConfig", "MistralForCausalLM"), ("Qwen2Config", "Qwen2ForCausalLM"),
    ("Qwen3Config", "Qwen3ForCausalLM"), ("Phi3Config", "Phi3ForCausalLM"), ("GPT2Config", "GPT2LMHeadModel"),
    ("GPTNeoXConfig", "GPTNeoXForCausalLM"), ("Gemma2Config", "Gemma2ForCausalLM"),
    ("Gemma3TextConfig", "Gemma3ForCausalLM"),
])
def test_transformers_default_configs_are_read(config_class, architecture):
    """Each family's config.json as transformers writes it by default (the released models' shapes): read, not refused."""
    transformers = pytest.importorskip("transformers", reason="transformers (an optional test dependency) is not installed")
    hf = json.loads(getattr(transformers, config_class)().to_json_string())
    config = from_hf_config({**hf, "architectures": [architecture]})
    assert (config.vocab_size, config.n_layers) == (hf["vocab_size"], hf.get("num_hidden_layers", hf.get("n_layer")))


def test_released_long_context_configs_are_read():
    """Llama 3.1's and Phi-3-mini-128k's RoPE scaling, as their config.json files state it."""
    llama31 = {**LLAMA, "max_position_embeddings": 131072, "rope_theta": 500000.0,
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    assert from_hf_config(llama31).rope_scaling == RopeScaling("llama3", 8.0, 8192)
    phi3 = {**LLAMA, "architectures": ["Phi3ForCausalLM"], "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096, "sliding_window": 262144,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.5] * 4}}
    config = from_hf_config(phi3)
    assert (config.rope_scaling.kind, config.rope_scaling.factor, config.sliding_window) == ("longrope", 32.0, None)


@pytest.mark.parametrize("change, expected", [
    ({"layer_types": ["sliding_attention"] * 3}, "3 layer_types for num_hidden_layers=1"),
    ({"layer_types": ["chunked_attention"]}, "layer_types ['chunked_attention'] unsupported"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' unsupported"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true unsupported"),
])
def test_unsupported_gemma_options(change, expected):
    assert expected in config_error({**LLAMA, "architectures": ["Gemma3ForCausalLM"], **change})


def test_a_smaller_config_derived_from_a_sliding_window_one_stays_valid():
    """Suites derive drafts with fewer layers (config.replace(n_layers=1)): the window's layer list allows it."""
    mistral = from_hf_config({**LLAMA, "architectures": ["MistralForCausalLM"], "num_hidden_layers": 4,
                              "sliding_window": 16, "max_position_embeddings": 64})
    assert mistral.replace(n_layers=1).window(0) == 16
