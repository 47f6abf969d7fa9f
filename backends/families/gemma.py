"""Gemma 2 and Gemma 3 (text) as the reference model: their config.json keys.

Both are Llama-like decoders (same weight names, tied head) with: RMSNorm scaling by (1 + w), computed in fp32;
a GeGLU MLP (tanh GELU); norms on each branch's output too (pre/post feed-forward norms); token embeddings
times sqrt(hidden_size); an attention scale of 1/sqrt(query_pre_attn_scalar); and sliding-window layers among
global ones (`layer_types`). Gemma 2 soft-caps attention scores and the logits; Gemma 3 drops the caps, norms
each head's queries and keys, and gives its sliding layers their own RoPE base.
"""
from __future__ import annotations

from ..checkpoint import CheckpointError, ModelConfig, hf_rope

TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new")
LAYER_TYPES = ("sliding_attention", "full_attention")
# transformers' defaults where a config.json leaves a key out
_GEMMA2 = {"sliding_window_pattern": 2, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
_GEMMA3 = {"sliding_window_pattern": 6, "attn_logit_softcapping": None, "final_logit_softcapping": None}


def gemma_config(hf: dict, source: str, arch: str) -> ModelConfig:
    """A Gemma2ForCausalLM or Gemma3ForCausalLM config.json as a ModelConfig."""
    gemma3 = arch == "Gemma3ForCausalLM"
    defaults = _GEMMA3 if gemma3 else _GEMMA2
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in TANH_GELUS:
        raise CheckpointError(f"{source}: hidden_activation {activation!r} unsupported; supported: {', '.join(TANH_GELUS)}")
    if hf.get("use_bidirectional_attention"):
        raise CheckpointError(f"{source}: use_bidirectional_attention=true unsupported (causal attention only)")
    theta, scaling, fraction, local_theta = _gemma_rope(hf, source, gemma3)
    n_layers, n_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    pattern = hf.get("sliding_window_pattern", defaults["sliding_window_pattern"])
    layer_types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                            for i in range(n_layers)]
    if len(layer_types) != n_layers:
        raise CheckpointError(f"{source}: {len(layer_types)} layer_types for num_hidden_layers={n_layers}")
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise CheckpointError(f"{source}: layer_types {unknown} unsupported; supported: {', '.join(LAYER_TYPES)}")
    window = hf.get("sliding_window", 4096)
    sliding = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention") if window else ()
    head_dim = hf.get("head_dim", 256)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        rope_theta=theta,
        rope_scaling=scaling,
        rotary_fraction=fraction,
        norm="rmsnorm-plus-one",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="geglu",
        tie_embeddings=hf.get("tie_word_embeddings", True),
        qkv_bias=hf.get("attention_bias", False),
        out_bias=hf.get("attention_bias", False),
        head_dim_override=head_dim if head_dim != hf["hidden_size"] // n_heads else None,
        qk_norm=gemma3,
        sandwich_norms=True,
        embed_scale=True,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        attn_softcap=hf.get("attn_logit_softcapping", defaults["attn_logit_softcapping"]),
        logit_softcap=hf.get("final_logit_softcapping", defaults["final_logit_softcapping"]),
        sliding_window=window if sliding else None,
        sliding_layers=sliding,
        local_rope_theta=local_theta,
    )


def _gemma_rope(hf: dict, source: str, gemma3: bool) -> tuple[float, object, float, float | None]:
    """Global RoPE (theta, scaling, rotary fraction) and Gemma 3's sliding layers' base; transformers 5 keeps
    Gemma 3's per layer type under rope_parameters, 4.x as rope_theta, rope_scaling and rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    if not gemma3:
        return (*hf_rope(hf, source), None)
    if "full_attention" in params:
        theta, scaling, fraction = hf_rope({"rope_parameters": params["full_attention"]}, source)
        local_theta, local_scaling, _ = hf_rope({"rope_parameters": params.get("sliding_attention") or {}}, source)
        if local_scaling is not None:
            raise CheckpointError(f"{source}: RoPE scaling on the sliding layers unsupported; supported: on full_attention")
        return theta, scaling, fraction, local_theta
    theta, scaling, fraction = hf_rope({"rope_theta": 1_000_000.0, **hf}, source)
    return theta, scaling, fraction, float(hf.get("rope_local_base_freq", 10000.0))
