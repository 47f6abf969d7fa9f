"""The exported decoder step: its input/output contract and the export of the reference model to it.

One ONNX graph serves prefill, decode, ragged batches and the no-cache oracle path. Inputs (B rows, T new
tokens, C cache slots per row, S <= C slots attended):

    input_ids        (B, T) int64    the new tokens
    position_ids     (B, T) int64    their positions (what RoPE/ALiBi/embeddings see)
    cache_position   (B, T) int64    the cache slot each new token is written to
    attention_mask   (B, S) bool     which of slots 0..S-1 hold real tokens once the new ones are written
    key_position_ids (B, S) int64    the position held in each slot (ALiBi and sliding-window models only)
    past_key_values.{i}.key/value (B, Hkv, C, D)   the preallocated cache of layer i

Outputs: `logits` (B, T, V) fp32 and `present.{i}.key/value` (B, Hkv, C, D), the past with the new keys and
values scattered in at `cache_position`. The runner binds each present output to its past's buffer, so the
update is in place (ScatterElements skips its copy when input and output share memory). A query at slot s
attends to the valid slots <= s of its row, and always to itself: backends/torch_ref/model.causal_mask.

Export uses torch.onnx's TorchScript exporter (dynamo=False): it exports these small graphs in about a second
where the dynamo exporter took 10-20 s each on this machine, which matters for the dozens of configurations
the exactness suites load. Every shape below is traced symbolically; the tests load each export at other
batch, sequence and cache sizes than it was traced with.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from backends.base import UnsupportedModel
from backends.checkpoint import Checkpoint, ModelConfig
from backends.strategies import Attention
from backends.torch_ref.backend import build_model
from backends.torch_ref.model import AttentionContext, causal_mask, rope_frequencies

OPSET = 18
PROTOBUF_LIMIT = 2**31  # a single-file ONNX model is one protobuf message, which cannot exceed 2 GiB
CONFIG_METADATA = "exactbench.config"  # metadata_props key: the exporting model's ModelConfig, as JSON
GRAPH_METADATA = "exactbench.graph"  # metadata_props key: store.graph_kind (general: this module; fused, paged)
TRACE_SHAPE = {"batch": 2, "seq": 3, "kv_len": 7, "capacity": 9}  # traced sizes: distinct, none 0 or 1


def layer_names(config: ModelConfig, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(config.n_layers) for kind in ("key", "value")]


def reads_key_positions(config: ModelConfig) -> bool:
    """ALiBi's bias and a sliding window depend on each key's position, not only on the query's."""
    return config.position == "alibi" or config.sliding_window is not None


def input_names(config: ModelConfig) -> list[str]:
    extra = ["key_position_ids"] if reads_key_positions(config) else []
    return ["input_ids", "position_ids", "cache_position", "attention_mask", *extra,
            *layer_names(config, "past_key_values")]


def output_names(config: ModelConfig) -> list[str]:
    return ["logits", *layer_names(config, "present")]


def check_exportable(checkpoint: Checkpoint) -> None:
    """Raise UnsupportedModel naming what a single-file ONNX model of this checkpoint cannot hold."""
    weight_bytes = sum(t.numel() * 4 for t in checkpoint.weights.values())  # exported in fp32
    if weight_bytes >= PROTOBUF_LIMIT:
        raise UnsupportedModel(f"{checkpoint.name}: {weight_bytes / 2**30:.1f} GiB of fp32 weights exceed the 2 GiB "
                               "limit of a single-file ONNX model")


class ScatterContext(AttentionContext):
    """An attention context whose keys/values are written into the graph's past buffers."""

    def __init__(self, allowed, query_positions, key_positions, slots, past):
        super().__init__(allowed, query_positions, key_positions, slots=slots)
        self.past = past
        self.present: list[torch.Tensor] = []

    def keys_values(self, layer, k, v):
        index = self.slots[:, None, :, None].expand_as(k)  # (B, Hkv, T, D): row b's token t goes to slot slots[b, t]
        seen = self.allowed.shape[-1]
        out = []
        for past, new in zip(self.past[2 * layer: 2 * layer + 2], (k, v)):
            present = past.scatter(2, index, new.to(past.dtype))
            self.present.append(present)
            read = present[:, :, :seen]
            out.append(read if read.dtype == new.dtype else read.to(new.dtype))  # a cache stored narrower: fp32 compute
        return out[0], out[1]


class DecoderStep(nn.Module):
    """The reference Transformer's forward (model.Transformer.run) over the graph contract above."""

    def __init__(self, checkpoint: Checkpoint):
        super().__init__()
        self.config = checkpoint.config
        self.transformer = build_model(checkpoint, Attention.NAIVE)  # materialized scores: plain MatMul/Softmax
        # seq_len matters only to dynamic NTK, computed in the graph below
        inv_freq, self.magnitude = rope_frequencies(self.config, 1)
        local_inv_freq, self.local_magnitude = rope_frequencies(self.config.local_rope(), 1)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("local_inv_freq", local_inv_freq, persistent=False)
        scaling = self.config.rope_scaling
        if scaling is not None and scaling.kind == "longrope":  # the frequencies past the original context
            self.original = scaling.original_max_position_embeddings or self.config.max_position_embeddings
            self.register_buffer("long_inv_freq", rope_frequencies(self.config, self.original + 1)[0], persistent=False)

    def rope(self, positions: torch.Tensor, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, rotary_dim) as model.rope_cos_sin, with dynamic NTK's base computed in the graph;
        local: the sliding layers' tables (ModelConfig.local_rope)."""
        cfg = self.config.local_rope() if local else self.config
        inv_freq, magnitude = (self.local_inv_freq, self.local_magnitude) if local else (self.inv_freq, self.magnitude)
        if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "dynamic-ntk":
            # model.rope_frequencies' dynamic-NTK base without the Python branch: the scale is <= 1 (so clamped
            # to 1, leaving the base) exactly when seq_len <= original
            dim, factor = cfg.rotary_dim, cfg.rope_scaling.factor
            original = cfg.rope_scaling.original_max_position_embeddings or cfg.max_position_embeddings
            seq_len = positions.max().to(torch.float64) + 1
            scale = (factor * seq_len / original - (factor - 1)).clamp(min=1.0)
            base = cfg.rope_theta * scale ** (dim / (dim - 2))
            inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "longrope":  # model.rope_frequencies' switch
            inv_freq = torch.where(positions.max() + 1 > self.original, self.long_inv_freq, inv_freq)
        angles = positions.to(torch.float64)[..., None] * inv_freq  # (B, T, rotary_dim/2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, rotary_dim)
        return (angles.cos() * magnitude).float(), (angles.sin() * magnitude).float()

    def forward(self, input_ids, position_ids, cache_position, attention_mask, *rest):
        cfg = self.config
        with_keys = reads_key_positions(cfg)
        key_positions = rest[0] if with_keys else position_ids
        past = rest[1:] if with_keys else rest
        ctx = ScatterContext(causal_mask(cache_position, attention_mask), position_ids, key_positions,
                             cache_position, past)
        ropes = None
        if cfg.position == "rope":
            rope = self.rope(position_ids)
            ropes = (rope, rope if cfg.local_rope_theta is None else self.rope(position_ids, local=True))
        return (self.transformer.run(input_ids, ctx, ropes), *ctx.present)


def trace_inputs(config: ModelConfig, kv_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Example inputs whose sizes are all distinct, so no traced size can stand in for another; the past keys and
    values in `kv_dtype` (the dtype the cache is stored in)."""
    B, T, S, C = (TRACE_SHAPE[k] for k in ("batch", "seq", "kv_len", "capacity"))
    slots = torch.arange(S - T, S).expand(B, T)
    inputs = [torch.randint(0, config.vocab_size, (B, T)), slots.clone(), slots.clone(), torch.ones(B, S, dtype=torch.bool)]
    if reads_key_positions(config):
        inputs.append(torch.arange(S).expand(B, S).clone())
    inputs += [torch.zeros(B, config.n_kv_heads, C, config.head_dim, dtype=kv_dtype) for _ in range(2 * config.n_layers)]
    return tuple(inputs)


def dynamic_axes(config: ModelConfig) -> dict[str, dict[int, str]]:
    axes = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
            "cache_position": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "kv_len"},
            "key_position_ids": {0: "batch", 1: "kv_len"}, "logits": {0: "batch", 1: "seq"}}
    for name in layer_names(config, "past_key_values") + layer_names(config, "present"):
        axes[name] = {0: "batch", 2: "capacity"}
    return {name: axes[name] for name in input_names(config) + output_names(config)}


def export_decoder(checkpoint: Checkpoint, path: Path, kv_dtype: torch.dtype = torch.float32) -> None:
    """Write the fp32 decoder step of `checkpoint` to `path` (one self-contained .onnx file), its KV cache stored in
    `kv_dtype` (computed with in fp32)."""
    check_exportable(checkpoint)
    step = DecoderStep(checkpoint).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices; the tests check the graph
        torch.onnx.export(step, trace_inputs(checkpoint.config, kv_dtype), str(path), dynamo=False, opset_version=OPSET,
                          input_names=input_names(checkpoint.config), output_names=output_names(checkpoint.config),
                          dynamic_axes=dynamic_axes(checkpoint.config), do_constant_folding=True)



def stamp(path: Path, metadata: dict[str, str]) -> None:
    """Record what a model file holds in its metadata_props, so a file taken elsewhere still says so."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
