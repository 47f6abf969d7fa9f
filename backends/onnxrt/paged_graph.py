"""The paged variant of the exported decoder step (graph.py): keys and values live in a block pool, and the graph
gathers each sequence's keys from the pool slots its block table resolves to (capability `batching:paged`).

A batch row is one sequence with T new tokens, as in graph.py; the host runs a step's sequences grouped by their
token count (paged.py), so a prefill chunk is one run and the single decode tokens of the others one more, with no
padding, and each sequence's keys are gathered once, not once per query. Inputs (b sequences, T new tokens each,
P pool slots; S key slots per sequence, the run's longest context):

    input_ids        (b, T) int64     the new tokens
    position_ids     (b, T) int64     their positions
    slot_mapping     (b, T) int64     the pool slot each new token's key/value is written to (vLLM's slot mapping)
    key_slots        (b, S) int64     the pool slots of the sequence's logical slots 0 .. S-1, through its block table
    key_allowed      (b, T, S) bool   which of them each query attends to: its sequence's slots up to its own
    key_position_ids (b, S) int64     the position each of them holds (ALiBi and sliding-window models only)
    pool.{i}.key/value (P, Hkv, D)    the block pool of layer i, slot-major

Outputs: `logits` (b, T, V) fp32 and `present_pool.{i}.key/value` (P, Hkv, D), the pool with the new keys and values
scattered in at `slot_mapping` (bound to the pool's buffer: in place). Every layer writes the run's keys and
values before it gathers, so a prefill chunk's queries see the chunk's own earlier tokens. A gathered slot no query
of its sequence may attend to is zeroed before attention: a pool slot no sequence wrote may hold anything (the tests
fill the pool with NaN), and 0 x NaN would reach the output. The host resolves block tables to slots
(backends/base.py PagedKVCache); the gather of keys and values is the graph's.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from backends.checkpoint import Checkpoint, ModelConfig
from backends.torch_ref.model import AttentionContext

from .graph import OPSET, DecoderStep, check_exportable, layer_names, reads_key_positions

TRACE_SHAPE = {"batch": 2, "seq": 3, "kv_len": 7, "pool_slots": 17}  # traced sizes: distinct, none 0 or 1


def input_names(config: ModelConfig) -> list[str]:
    extra = ["key_position_ids"] if reads_key_positions(config) else []
    return ["input_ids", "position_ids", "slot_mapping", "key_slots", "key_allowed", *extra,
            *layer_names(config, "pool")]


def output_names(config: ModelConfig) -> list[str]:
    return ["logits", *layer_names(config, "present_pool")]


class PoolContext(AttentionContext):
    """An attention context whose keys/values are scattered into the pool and gathered back per sequence."""

    def __init__(self, key_allowed, query_positions, key_positions, slot_mapping, key_slots, pool):
        super().__init__(key_allowed[:, None], query_positions, key_positions)  # allowed: (b, 1, T, S)
        self.slot_mapping, self.key_slots, self.pool = slot_mapping, key_slots, pool
        self.keep = key_allowed.any(dim=1)[:, :, None, None]  # (b, S, 1, 1): slots some query of the row sees
        self.present: list[torch.Tensor] = []

    def keys_values(self, layer, k, v):
        heads, dim = k.shape[1], k.shape[3]
        index = self.slot_mapping.reshape(-1, 1, 1).expand(-1, heads, dim)  # (b*T, Hkv, D): token -> its slot
        out = []
        for pool, new in zip(self.pool[2 * layer: 2 * layer + 2], (k, v)):
            present = pool.scatter(0, index, new.transpose(1, 2).reshape(-1, heads, dim).to(pool.dtype))  # (P, Hkv, D)
            self.present.append(present)
            gathered = torch.where(self.keep, present[self.key_slots], 0.0)  # (b, S, Hkv, D)
            out.append(gathered.transpose(1, 2))  # (b, Hkv, S, D)
        return out[0], out[1]


class PagedDecoderStep(DecoderStep):
    """The reference Transformer's forward over the paged contract above."""

    def forward(self, input_ids, position_ids, slot_mapping, key_slots, key_allowed, *rest):
        cfg = self.config
        with_keys = reads_key_positions(cfg)
        key_positions = rest[0] if with_keys else None  # read only by ALiBi and sliding windows
        caches = rest[1:] if with_keys else rest
        ctx = PoolContext(key_allowed, position_ids, key_positions, slot_mapping, key_slots, caches)
        ropes = None
        if cfg.position == "rope":
            rope = self.rope(position_ids)
            ropes = (rope, rope if cfg.local_rope_theta is None else self.rope(position_ids, local=True))
        return (self.transformer.run(input_ids, ctx, ropes), *ctx.present)


def trace_inputs(config: ModelConfig) -> tuple[torch.Tensor, ...]:
    B, T, S, P = (TRACE_SHAPE[k] for k in ("batch", "seq", "kv_len", "pool_slots"))
    logical = torch.arange(S - T, S).expand(B, T)
    inputs = [torch.randint(0, config.vocab_size, (B, T)), logical.clone(), logical + torch.tensor([[0], [S]]),
              torch.arange(B * S).view(B, S), torch.arange(S)[None, None, :] <= logical[:, :, None]]
    if reads_key_positions(config):
        inputs.append(torch.arange(S).expand(B, S).clone())
    inputs += [torch.zeros(P, config.n_kv_heads, config.head_dim) for _ in range(2 * config.n_layers)]
    return tuple(inputs)


def dynamic_axes(config: ModelConfig) -> dict[str, dict[int, str]]:
    axes = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
            "slot_mapping": {0: "batch", 1: "seq"}, "key_slots": {0: "batch", 1: "kv_len"},
            "key_allowed": {0: "batch", 1: "seq", 2: "kv_len"}, "key_position_ids": {0: "batch", 1: "kv_len"},
            "logits": {0: "batch", 1: "seq"}}
    for name in layer_names(config, "pool") + layer_names(config, "present_pool"):
        axes[name] = {0: "pool_slots"}
    return {name: axes[name] for name in input_names(config) + output_names(config)}


def export_paged_decoder(checkpoint: Checkpoint, path: Path) -> None:
    """Write the fp32 paged decoder step of `checkpoint` to `path` (one self-contained .onnx file)."""
    check_exportable(checkpoint)
    step = PagedDecoderStep(checkpoint).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices; the suites check the graph
        torch.onnx.export(step, trace_inputs(checkpoint.config), str(path), dynamo=False, opset_version=OPSET,
                          input_names=input_names(checkpoint.config), output_names=output_names(checkpoint.config),
                          dynamic_axes=dynamic_axes(checkpoint.config), do_constant_folding=True)
