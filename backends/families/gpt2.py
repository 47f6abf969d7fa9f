"""The GPT-2 family as the reference model: its config.json keys and its weight names, translated.

GPT-2 (transformers' GPT2LMHeadModel) is a decoder with learned positions, pre-LayerNorm, biases on
every projection, a tanh-approximated GELU MLP of 4 * n_embd and a head tied to the token embedding.
Its checkpoints store each layer's q, k and v fused in one `c_attn`, and every projection as a
`Conv1D`, whose weight is the transpose of a `Linear`'s (in_features, out_features).
"""
from __future__ import annotations

import re

import torch

from ..checkpoint import CheckpointError, ModelConfig

ARCHITECTURE = "GPT2LMHeadModel"
# gelu_new is GELU's tanh approximation (transformers' activations.py); the reference MLP uses that one
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_LAYER = re.compile(r"h\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_1.bias": "input_layernorm.bias",
    "ln_2.weight": "post_attention_layernorm.weight",
    "ln_2.bias": "post_attention_layernorm.bias",
    "attn.c_proj.bias": "self_attn.o_proj.bias",
    "mlp.c_fc.bias": "mlp.up_proj.bias",
    "mlp.c_proj.bias": "mlp.down_proj.bias",
}
_CONV1D_NAMES = {  # stored (in, out): transposed into Linear's (out, in)
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "wte.weight": "model.embed_tokens.weight",
    "wpe.weight": "model.embed_positions.weight",
    "ln_f.weight": "model.norm.weight",
    "ln_f.bias": "model.norm.bias",
}


def gpt2_config(hf: dict, source: str) -> ModelConfig:
    """A GPT-2 config.json as a ModelConfig (defaults as in transformers' GPT2Config)."""
    activation = hf.get("activation_function", "gelu_new")
    if activation not in TANH_GELUS:
        raise CheckpointError(f"{source}: activation_function {activation!r} unsupported; supported: {', '.join(TANH_GELUS)}")
    for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("reorder_and_upcast_attn", False)):
        if hf.get(key, supported) != supported:
            raise CheckpointError(f"{source}: {key}={hf[key]} unsupported; only {supported} is")
    d_model, n_heads = hf.get("n_embd", 768), hf.get("n_head", 12)
    return ModelConfig(
        vocab_size=hf.get("vocab_size", 50257),
        d_model=d_model,
        n_layers=hf.get("n_layer", 12),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_ff=hf.get("n_inner") or 4 * d_model,
        max_position_embeddings=hf.get("n_positions", 1024),
        position="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        tie_embeddings=hf.get("tie_word_embeddings", True),
        qkv_bias=True,
        out_bias=True,
    )


def gpt2_weights(weights: dict[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """GPT-2 tensor names and layouts -> the reference model's. Unknown names pass through unchanged, so the
    model builder reports them as unexpected; the causal-mask buffers old checkpoints carry are dropped."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        short = name.removeprefix("transformer.")
        layer = _LAYER.fullmatch(short)
        if short in _TOP_NAMES:
            out[_TOP_NAMES[short]] = tensor
        elif name == "lm_head.weight":
            if not config.tie_embeddings:
                out[name] = tensor
        elif layer is None:
            out[name] = tensor
        elif layer[2] in ("attn.bias", "attn.masked_bias"):
            continue
        elif layer[2] in ("attn.c_attn.weight", "attn.c_attn.bias"):
            prefix = f"model.layers.{layer[1]}.self_attn"
            kind = layer[2].rsplit(".", 1)[1]
            fused = tensor.t() if kind == "weight" else tensor  # (3 * d_model, d_model) or (3 * d_model,)
            if fused.shape[0] != 3 * config.d_model:
                raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                                      f"config needs 3 * n_embd = {3 * config.d_model} fused q/k/v outputs")
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0)):
                out[f"{prefix}.{proj}.{kind}"] = part.contiguous()
        elif layer[2] in _CONV1D_NAMES:
            out[f"model.layers.{layer[1]}.{_CONV1D_NAMES[layer[2]]}"] = tensor.t().contiguous()
        elif layer[2] in _LAYER_NAMES:
            out[f"model.layers.{layer[1]}.{_LAYER_NAMES[layer[2]]}"] = tensor
        else:
            out[name] = tensor
    return out
