"""The packed variant of the exported decoder step (graph.py): one session run per continuous-batching step.

Every packed token of a step is a batch row of one query (as in paged_graph.py), over the contiguous cache of the
step graph, (B, Hkv, C, D) per layer and kind, so the same OrtValues serve both graphs. Each token's key/value is
written at (its cache row, its slot); each query then reads its own row's slots, gathered by row index.
Inputs (N packed tokens, S slots read per query):

    input_ids        (N, 1) int64   the new tokens
    position_ids     (N, 1) int64   their positions
    cache_rows       (N, 1) int64   the cache row of each token
    cache_position   (N, 1) int64   the slot each token is written to in its row
    key_allowed      (N, S) bool    which of its row's slots 0 .. S-1 the query attends to
    key_position_ids (N, S) int64   the position each of them holds (ALiBi and sliding-window models only)
    past_key_values.{i}.key/value (B, Hkv, C, D)

Outputs: `logits` (N, 1, V) and `present.{i}.key/value`, the cache with the new keys and values written (bound to
its buffer: in place).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from backends.checkpoint import Checkpoint, ModelConfig
from backends.torch_ref.model import AttentionContext

from .graph import OPSET, check_exportable, layer_names, reads_key_positions
from .paged_graph import PagedDecoderStep

TRACE_SHAPE = {"tokens": 3, "kv_len": 7, "batch": 2, "capacity": 9}  # traced sizes: distinct, none 0 or 1


def input_names(config: ModelConfig) -> list[str]:
    extra = ["key_position_ids"] if reads_key_positions(config) else []
    return ["input_ids", "position_ids", "cache_rows", "cache_position", "key_allowed", *extra,
            *layer_names(config, "past_key_values")]


def output_names(config: ModelConfig) -> list[str]:
    return ["logits", *layer_names(config, "present")]


class RowsContext(AttentionContext):
    """Keys/values written at (row, slot) of the contiguous cache and read back by each query's row."""

    def __init__(self, key_allowed, query_positions, key_positions, rows, slots, past):
        super().__init__(key_allowed[:, None, None, :], query_positions, key_positions)  # allowed: (N, 1, 1, S)
        self.rows, self.slots, self.past = rows, slots, past  # rows, slots: (N, 1)
        self.keep = key_allowed[:, None, :, None]  # (N, 1, S, 1)
        self.present: list[torch.Tensor] = []

    def keys_values(self, layer, k, v):
        n, heads = k.shape[0], k.shape[1]
        heads_index = torch.arange(heads)[None, :].expand(n, heads)  # (N, Hkv)
        where = (self.rows.expand(n, heads), heads_index, self.slots.expand(n, heads))
        span = self.keep.shape[2]
        out = []
        for past, new in zip(self.past[2 * layer: 2 * layer + 2], (k, v)):
            present = past.index_put(where, new[:, :, 0].to(past.dtype))  # (B, Hkv, C, D)
            self.present.append(present)
            gathered = present[:, :, :span][self.rows[:, 0]]  # (N, Hkv, S, D): each query's own row
            out.append(torch.where(self.keep, gathered, 0.0))
        return out[0], out[1]


class PackedDecoderStep(PagedDecoderStep):
    context_class = RowsContext


def trace_inputs(config: ModelConfig) -> tuple[torch.Tensor, ...]:
    N, S, B, C = (TRACE_SHAPE[k] for k in ("tokens", "kv_len", "batch", "capacity"))
    slots = torch.arange(S - N, S)[:, None]
    inputs = [torch.randint(0, config.vocab_size, (N, 1)), slots.clone(), torch.tensor([[0], [1], [1]]), slots.clone(),
              torch.arange(S)[None, :] <= slots]
    if reads_key_positions(config):
        inputs.append(torch.arange(S).expand(N, S).clone())
    inputs += [torch.zeros(B, config.n_kv_heads, C, config.head_dim) for _ in range(2 * config.n_layers)]
    return tuple(inputs)


def dynamic_axes(config: ModelConfig) -> dict[str, dict[int, str]]:
    axes = {"input_ids": {0: "tokens"}, "position_ids": {0: "tokens"}, "cache_rows": {0: "tokens"},
            "cache_position": {0: "tokens"}, "key_allowed": {0: "tokens", 1: "kv_len"},
            "key_position_ids": {0: "tokens", 1: "kv_len"}, "logits": {0: "tokens"}}
    for name in layer_names(config, "past_key_values") + layer_names(config, "present"):
        axes[name] = {0: "batch", 2: "capacity"}
    return {name: axes[name] for name in input_names(config) + output_names(config)}


def export_packed_decoder(checkpoint: Checkpoint, path: Path) -> None:
    """Write the fp32 packed decoder step of `checkpoint` to `path` (one self-contained .onnx file)."""
    check_exportable(checkpoint)
    step = PackedDecoderStep(checkpoint).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(step, trace_inputs(checkpoint.config), str(path), dynamo=False, opset_version=OPSET,
                          input_names=input_names(checkpoint.config), output_names=output_names(checkpoint.config),
                          dynamic_axes=dynamic_axes(checkpoint.config), do_constant_folding=True)
