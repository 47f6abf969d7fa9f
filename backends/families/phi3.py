"""Phi-3 (Phi-3, Phi-3.5, Phi-4-mini) as the reference model: its fused weights, split.

Phi-3's config.json is Llama's (read by backends/checkpoint.py: partial rotary, LongRoPE, a sliding window on
every layer); its checkpoints fuse each layer's q, k, v projections and its gate and up projections.
"""
from __future__ import annotations

import torch

from ..checkpoint import CheckpointError, ModelConfig


def phi3_weights(weights: dict[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Phi-3 stores each layer's q, k, v as one qkv_proj (q rows, then k, then v) and gate and up as one
    gate_up_proj (gate rows first): split them into the Llama names the reference model uses."""
    widths = {"self_attn.qkv_proj": ((config.n_heads * config.head_dim, "self_attn.q_proj"),
                                     (config.n_kv_heads * config.head_dim, "self_attn.k_proj"),
                                     (config.n_kv_heads * config.head_dim, "self_attn.v_proj")),
              "mlp.gate_up_proj": ((config.d_ff, "mlp.gate_proj"), (config.d_ff, "mlp.up_proj"))}
    out = {}
    for name, tensor in weights.items():
        fused = next((f for f in widths if f".{f}." in name), None)
        if fused is None:
            out[name] = tensor
            continue
        sizes = [size for size, _ in widths[fused]]
        if tensor.shape[0] != sum(sizes):
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, config needs {sum(sizes)} fused rows "
                                  f"({' + '.join(map(str, sizes))})")
        for (_, part_name), part in zip(widths[fused], tensor.split(sizes, dim=0)):
            out[name.replace(fused, part_name)] = part.contiguous()
    return out
