"""The paged variant of the exported decoder step (graph.py): keys and values live in a block pool, and the graph
gathers each query's keys from the pool slots its sequence's block table resolves to (capability `batching:paged`).

Every packed token of a step is a batch row of one query (N rows, T = 1), so a prefill chunk of one sequence and
single decode tokens of others run in one session call with no padding. Inputs (P pool slots; S key slots per
query, the step's longest context):

    input_ids        (N, 1) int64    the new tokens
    position_ids     (N, 1) int64    their positions
    slot_mapping     (N, 1) int64    the pool slot each new token's key/value is written to (vLLM's slot mapping)
    key_slots        (N, S) int64    the pool slots of its sequence's logical slots 0 .. S-1, through its block table
    key_allowed      (N, S) bool     which of them the query attends to: its sequence's slots up to its own
    key_position_ids (N, S) int64    the position each of them holds (ALiBi and sliding-window models only)
    pool.{i}.key/value (P, Hkv, D)   the block pool of layer i, slot-major

Outputs: `logits` (N, 1, V) fp32 and `present_pool.{i}.key/value` (P, Hkv, D), the pool with the new keys and values
scattered in at `slot_mapping` (bound to the pool's buffer: in place). Every layer writes the step's keys and
values before it gathers, so a prefill chunk's queries see the chunk's own earlier tokens. A gathered slot the
query may not attend to is zeroed before attention: a pool slot no sequence wrote may hold anything (the tests
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

TRACE_SHAPE = {"tokens": 3, "kv_len": 7, "pool_slots": 11}  # traced sizes: distinct, none 0 or 1


def input_names(config: ModelConfig) -> list[str]:
    extra = ["key_position_ids"] if reads_key_positions(config) else []
    return ["input_ids", "position_ids", "slot_mapping", "key_slots", "key_allowed", *extra,
            *layer_names(config, "pool")]


def output_names(config: ModelConfig) -> list[str]:
    return ["logits", *layer_names(config, "present_pool")]


class PoolContext(AttentionContext):
    """An attention context whose keys/values are scattered into the pool and gathered back per query."""

    def __init__(self, key_allowed, query_positions, key_positions, slot_mapping, key_slots, pool):
        super().__init__(key_allowed[:, None, None, :], query_positions, key_positions)  # allowed: (N, 1, 1, S)
        self.slot_mapping, self.key_slots, self.pool = slot_mapping, key_slots, pool
        self.keep = key_allowed[:, :, None, None]  # (N, S, 1, 1)
        self.present: list[torch.Tensor] = []

    def keys_values(self, layer, k, v):
        index = self.slot_mapping[:, :, None].expand(-1, k.shape[1], k.shape[3])  # (N, Hkv, D): token n -> its slot
        out = []
        for pool, new in zip(self.pool[2 * layer: 2 * layer + 2], (k, v)):
            present = pool.scatter(0, index, new[:, :, 0].to(pool.dtype))  # (P, Hkv, D)
            self.present.append(present)
            gathered = torch.where(self.keep, present[self.key_slots], 0.0)  # (N, S, Hkv, D)
            out.append(gathered.transpose(1, 2))  # (N, Hkv, S, D)
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
    N, S, P = (TRACE_SHAPE[k] for k in ("tokens", "kv_len", "pool_slots"))
    positions = torch.arange(S - N, S)[:, None]
    inputs = [torch.randint(0, config.vocab_size, (N, 1)), positions.clone(), positions.clone(),
              torch.arange(S).expand(N, S).clone(), torch.arange(S)[None, :] <= positions]
    if reads_key_positions(config):
        inputs.append(torch.arange(S).expand(N, S).clone())
    inputs += [torch.zeros(P, config.n_kv_heads, config.head_dim) for _ in range(2 * config.n_layers)]
    return tuple(inputs)


def dynamic_axes(config: ModelConfig) -> dict[str, dict[int, str]]:
    axes = {"input_ids": {0: "tokens"}, "position_ids": {0: "tokens"}, "slot_mapping": {0: "tokens"},
            "key_slots": {0: "tokens", 1: "kv_len"}, "key_allowed": {0: "tokens", 1: "kv_len"},
            "key_position_ids": {0: "tokens", 1: "kv_len"}, "logits": {0: "tokens"}}
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
