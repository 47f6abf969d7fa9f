"""The GPT-NeoX family (Pythia, GPT-NeoX-20B) as the reference model: its config.json keys and weight names.

GPT-NeoX (transformers' GPTNeoXForCausalLM) is a decoder with pre-LayerNorm, biases on every projection, an
exact (erf) GELU MLP, an untied head, RoPE on only the first rotary_pct of each head's dims, and by default a
parallel residual: x + attn(ln1(x)) + mlp(ln2(x)). Its checkpoints fuse each layer's q, k and v in one
`query_key_value` whose rows are grouped by head: head h's q, then its k, then its v.
"""
from __future__ import annotations

import re

import torch

from ..checkpoint import CheckpointError, ModelConfig, hf_rope

ARCHITECTURE = "GPTNeoXForCausalLM"
_LAYER = re.compile(r"gpt_neox\.layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "attention.dense": "self_attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.up_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}
_TOP_NAMES = {
    "gpt_neox.embed_in.weight": "model.embed_tokens.weight",
    "gpt_neox.final_layer_norm.weight": "model.norm.weight",
    "gpt_neox.final_layer_norm.bias": "model.norm.bias",
    "embed_out.weight": "lm_head.weight",
}
# per-layer buffers older checkpoints saved (the causal mask, RoPE tables): recomputed, never read
_BUFFERS = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")


def gpt_neox_config(hf: dict, source: str) -> ModelConfig:
    """A GPT-NeoX config.json as a ModelConfig (defaults as in transformers' GPTNeoXConfig)."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} unsupported; supported: gelu")
    if not hf.get("attention_bias", True):
        raise CheckpointError(f"{source}: attention_bias=false unsupported; supported: true")
    # transformers 4.x named RoPE's base and fraction rotary_emb_base and rotary_pct
    theta, scaling, fraction = hf_rope({"rope_theta": hf.get("rotary_emb_base", 10000.0),
                                        "partial_rotary_factor": hf.get("rotary_pct", 0.25), **hf}, source)
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_ff=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        rotary_fraction=fraction,
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        mlp="gelu-exact",
        tie_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=True,
        out_bias=True,
        parallel_residual=hf.get("use_parallel_residual", True),
    )


def gpt_neox_weights(weights: dict[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """GPT-NeoX tensor names and layouts -> the reference model's. Unknown names pass through unchanged, so the
    weight check reports them as unexpected."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        layer = _LAYER.fullmatch(name)
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = tensor
        elif layer is None:
            out[name] = tensor
        elif layer[2] in _BUFFERS:
            continue
        elif layer[2].startswith("attention.query_key_value."):
            kind = layer[2].rsplit(".", 1)[1]
            if tensor.shape[0] != 3 * config.d_model:
                raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                                      f"config needs 3 * hidden_size = {3 * config.d_model} fused q/k/v rows")
            per_head = tensor.unflatten(0, (config.n_heads, 3, config.head_dim))  # (H, q|k|v, D, ...)
            for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                part = per_head[:, index].flatten(0, 1).contiguous()
                out[f"model.layers.{layer[1]}.self_attn.{proj}.{kind}"] = part
        else:
            module, _, kind = layer[2].rpartition(".")
            known = module in _LAYER_NAMES
            out[f"model.layers.{layer[1]}.{_LAYER_NAMES[module]}.{kind}" if known else name] = tensor
    return out
