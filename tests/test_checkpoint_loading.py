"""Loading model directories: every kind of bad input gets a one-line error naming the file and the problem;
the Hugging Face config layouts of each supported family map onto the reference model and back."""
import json

import pytest
import torch
from safetensors.torch import save_file

from backends.checkpoint import (CheckpointError, ModelConfig, RopeScaling, from_hf_config, load_checkpoint,
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
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.up_proj.weight has shape \(65, 32\), "
                                              r"config needs \(64, 32\)") as error:
        build_model(load_checkpoint(tmp_path))
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


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
                       "MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel, ExactbenchDecoder")


@pytest.mark.parametrize("change, expected", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "unsupported rope_scaling type 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.7}}, "unsupported RoPE parameters ['mscale']"),
    ({"sliding_window": 16, "max_position_embeddings": 64}, "sliding_window=16 unsupported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' unsupported; supported: silu"),
    ({"mlp_bias": True}, "mlp_bias=true unsupported"),
], ids=["llama3-rope", "yarn-mscale", "sliding-window", "gelu-llama", "mlp-bias"])
def test_unsupported_llama_family_options(change, expected):
    assert expected in config_error({**LLAMA, **change})


@pytest.mark.parametrize("change, expected", [
    ({"activation_function": "gelu"}, "activation_function 'gelu' unsupported; supported: gelu_new, gelu_pytorch_tanh"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True unsupported"),
])
def test_unsupported_gpt2_options(change, expected):
    assert expected in config_error({"architectures": ["GPT2LMHeadModel"], **change})


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
], ids=["llama", "llama-bias", "qwen2", "out-bias-only", "yarn-betas", "gpt2-like"])
def test_config_round_trips_through_config_json(config, architecture):
    hf = json.loads(json.dumps(to_hf_config(config)))
    assert hf["architectures"] == [architecture]
    assert from_hf_config(hf) == config


def test_transformers5_rope_parameters():
    hf = {**LLAMA, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}
    config = from_hf_config(hf)
    assert (config.rope_theta, config.rope_scaling) == (500.0, RopeScaling("linear", 2.0))
