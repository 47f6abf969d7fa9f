"""The fused decoder step: the graph.py contract built directly from ONNX Runtime's contrib ops.

The same inputs and outputs as graph.py's export (so the runner, the cache and the quantizers serve both), but
each layer is a handful of fused kernels, the way onnxruntime-genai's model builder lays out a Llama
(onnxruntime_genai/models/builders/base.py): SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization
(RMSNorm, with the residual add fused in), one packed QKV MatMul, GroupQueryAttention with the rotary embedding
inside, reading and writing the cache in place (past and present bound to one buffer), and the SwiGLU MLP.

How the contract maps onto GroupQueryAttention (com.microsoft, ONNX Runtime's contrib op):
- each row's new tokens go to slots cache_position[b, 0..T-1], the row's last T slots: seqlens_k[b] is the
  row's length after the step minus one, cache_position[b, -1]; total_sequence_length is the mask's width S;
- explicit positions: its position_ids input rotates queries and keys by the positions given, not the slots;
- padding inside a row (left padding, masked tokens): attention_bias, 0 where a slot is valid or is the query's
  own slot, the float minimum elsewhere (causal_mask's rule: a query always sees itself).

Only configurations these ops express exactly are built this way (fused_graph_refusal names the others), and
those are served by graph.py's general export: ALiBi, learned and sinusoidal positions, RoPE whose tables depend
on the sequence length (dynamic NTK, LongRoPE), partial rotary, sliding windows (the op windows by slot, the
contract by position), Gemma's norms and soft-caps, Qwen3's q/k norms, LayerNorm and GELU MLPs, parallel
residuals.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from backends.checkpoint import Checkpoint, ModelConfig
from backends.strategies import Attention
from backends.torch_ref.backend import build_model
from backends.torch_ref.model import rope_frequencies

from .graph import OPSET, check_exportable, input_names, layer_names, output_names

CONTRIB = "com.microsoft"
STATIC_ROPE_SCALINGS = (None, "linear", "ntk", "llama3", "yarn")  # tables that depend on the position alone
MIN_ROPE_TABLE = 4096  # rotary rows tabulated at least; a position past the table is refused by the runner
GQA_HEAD_DIM_MULTIPLE = 16  # GroupQueryAttention's rotary kernel refuses other head sizes ("head_size shall be ...")


def fused_graph_refusal(config: ModelConfig) -> str | None:
    """Why the fused graph cannot express `config` exactly, or None when it can."""
    checks = [
        (config.position == "rope", f"position {config.position!r} (GroupQueryAttention rotates by RoPE only)"),
        (config.rope_scaling is None or config.rope_scaling.kind in STATIC_ROPE_SCALINGS,
         f"RoPE scaling {config.rope_scaling.kind if config.rope_scaling else None!r} depends on the sequence length"),
        (config.rotary_fraction == 1.0, "partial rotary"),
        (config.head_dim % GQA_HEAD_DIM_MULTIPLE == 0, f"head_dim {config.head_dim} (not a multiple of 16)"),
        (config.sliding_window is None, "a sliding window by position"),
        (config.norm == "rmsnorm", f"norm {config.norm!r}"),
        (config.mlp == "swiglu", f"mlp {config.mlp!r}"),
        (not (config.qk_norm or config.parallel_residual or config.sandwich_norms or config.embed_scale),
         "q/k norms, parallel residuals, sandwich norms or embedding scale"),
        (config.attn_softcap is None and config.logit_softcap is None, "soft-capping"),
        (config.local_rope_theta is None, "a second RoPE base"),
    ]
    reasons = [reason for ok, reason in checks if not ok]
    return "; ".join(reasons) or None


def rope_table_length(config: ModelConfig) -> int:
    return max(config.max_position_embeddings, MIN_ROPE_TABLE)


def rope_tables(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (positions, rotary_dim/2) in fp32: model.rope_cos_sin's values (angles in fp64, the magnitude in),
    the half GroupQueryAttention reads (Llama's half-split layout repeats them)."""
    inv_freq, magnitude = rope_frequencies(config, 1)  # static kinds only: seq_len does not matter
    angles = torch.arange(rope_table_length(config), dtype=torch.float64)[:, None] * inv_freq
    return (angles.cos() * magnitude).float().numpy(), (angles.sin() * magnitude).float().numpy()


class GraphBuilder:
    """Nodes and initializers, named in order."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []

    def constant(self, name: str, array) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, n_outputs: int = 1, domain: str = "",
           float_outputs: bool = False, outputs: list[str] | None = None, **attrs) -> list[str]:
        """Outputs named `name`/out<i> unless given ("" leaves one uncomputed). float_outputs: declare those fp32,
        for ops onnx's shape inference does not know (contrib ops), so the quantizers can type what they read."""
        outputs = outputs or [f"{name}/out{i}" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain, **attrs))
        if float_outputs:
            self.value_info += [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
                                for out in outputs if out.startswith(f"{name}/")]
        return outputs

    def norm(self, inputs: list[str], weight: torch.Tensor, name: str, eps: float) -> tuple[str, str]:
        """RMSNorm of inputs[0] (+ inputs[1], the residual, fused in): (normed, the residual sum)."""
        inputs = [*inputs, self.constant(f"{name}.weight", weight.detach().float().numpy())]
        if len(inputs) == 2:
            return self.op("SimplifiedLayerNormalization", inputs, name, float_outputs=True, axis=-1, epsilon=eps,
                           stash_type=1)[0], inputs[0]
        # outputs 1 and 2 (mean, inverse std) are not computed
        normed, _, _, sum_ = self.op("SkipSimplifiedLayerNormalization", inputs, name, domain=CONTRIB,
                                     float_outputs=True, outputs=[f"{name}/out0", "", "", f"{name}/out3"], epsilon=eps)
        return normed, sum_

    def one(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        return self.op(op_type, inputs, name, **attrs)[0]

    def linear(self, x: str, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> str:
        """x @ weight.T (+ bias): a MatMul on an initializer, which the quantizers (MatMulNBits, int8) recognize."""
        out = self.one("MatMul", [x, self.constant(f"{name}.weight", weight.detach().float().T.contiguous().numpy())],
                       f"{name}/MatMul")
        if bias is not None:
            out = self.one("Add", [out, self.constant(f"{name}.bias", bias.detach().float().numpy())], f"{name}/Add")
        return out


def concat_linear(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([l.weight for l in linears])
    bias = None if linears[0].bias is None else torch.cat([l.bias for l in linears])
    return weight, bias


def build_fused_decoder(checkpoint: Checkpoint) -> onnx.ModelProto:
    config = checkpoint.config
    refusal = fused_graph_refusal(config)
    if refusal is not None:
        raise ValueError(f"{checkpoint.name}: the fused graph cannot express {refusal}; use graph.export_decoder")
    check_exportable(checkpoint)
    model = build_model(checkpoint, Attention.NAIVE)
    body, g = model.model, GraphBuilder()
    eps = float(config.norm_eps)

    # GroupQueryAttention's bookkeeping inputs, from the contract's
    last_slot = g.one("Gather", ["cache_position", g.constant("minus_one", np.array(-1, np.int64))], "last_slot", axis=1)
    seqlens_k = g.one("Cast", [last_slot], "seqlens_k", to=TensorProto.INT32)  # (B,): length after the step - 1
    width = g.one("Gather", [g.one("Shape", ["attention_mask"], "mask_shape"), g.constant("one", np.array(1, np.int64))],
                  "mask_width")
    total_length = g.one("Cast", [width], "total_sequence_length", to=TensorProto.INT32)
    # every row brings the T new tokens: the op's chunked-prefill input, which lets a batch extend a filled cache
    n_new = g.one("Cast", [g.one("Gather", [g.one("Shape", ["input_ids"], "ids_shape"), "one"], "n_new")], "n_new_int",
                  to=TensorProto.INT32)
    query_seqlens = g.one("Expand", [n_new, g.one("Shape", [seqlens_k], "batch_shape")], "query_seqlens")
    key_slots = g.one("Range", [g.constant("zero", np.array(0, np.int64)), width, "one"], "key_slots")  # (S,)
    own_slot = g.one("Equal", [g.one("Unsqueeze", ["cache_position", g.constant("axis2", np.array([2], np.int64))],
                                     "query_slots"), key_slots], "own_slot")  # (B, T, S)
    valid = g.one("Unsqueeze", ["attention_mask", g.constant("axis1", np.array([1], np.int64))], "valid_keys")  # (B, 1, S)
    allowed = g.one("Or", [own_slot, valid], "allowed")
    bias = g.one("Where", [allowed, g.constant("no_bias", np.array(0.0, np.float32)),
                           g.constant("masked", np.array(np.finfo(np.float32).min, np.float32))], "bias")
    attention_bias = g.one("Unsqueeze", [bias, "axis1"], "attention_bias")  # (B, 1, T, S)
    cos, sin = rope_tables(config)
    g.constant("cos_cache", cos)
    g.constant("sin_cache", sin)

    x = g.one("Gather", [g.constant("embed_tokens.weight", body.embed_tokens.weight.detach().float().numpy()),
                         "input_ids"], "embed")
    past, present = layer_names(config, "past_key_values"), layer_names(config, "present")
    # RMSNorm of the residual stream; each later norm fuses the residual add before it
    normed, residual = g.norm([x], body.layers[0].input_layernorm.weight, "layers.0.input_norm", eps)
    for i, layer in enumerate(body.layers):
        attn = layer.self_attn
        qkv = g.linear(normed, *concat_linear(attn.q_proj, attn.k_proj, attn.v_proj), f"layers.{i}.qkv_proj")
        gqa_inputs = [qkv, "", "", past[2 * i], past[2 * i + 1], seqlens_k, total_length, "cos_cache", "sin_cache",
                      "position_ids", attention_bias, "", "", "", "", "", query_seqlens]
        attended = g.op("GroupQueryAttention", gqa_inputs, f"layers.{i}/attention", domain=CONTRIB, float_outputs=True,
                        outputs=[f"layers.{i}/attention/out0", present[2 * i], present[2 * i + 1]],
                        num_heads=config.n_heads, kv_num_heads=config.n_kv_heads, do_rotary=1, rotary_interleaved=0, causal=1,
                        scale=1.0 / math.sqrt(config.query_pre_attn_scalar or config.head_dim))
        out = g.linear(attended[0], attn.o_proj.weight, attn.o_proj.bias, f"layers.{i}.o_proj")
        normed, residual = g.norm([out, residual], layer.post_attention_layernorm.weight,
                                  f"layers.{i}.post_attention_norm", eps)
        mlp = layer.mlp
        gate = g.linear(normed, mlp.gate_proj.weight, None, f"layers.{i}.gate_proj")
        up = g.linear(normed, mlp.up_proj.weight, None, f"layers.{i}.up_proj")
        silu = g.one("Mul", [gate, g.one("Sigmoid", [gate], f"layers.{i}/sigmoid")], f"layers.{i}/silu")
        down = g.linear(g.one("Mul", [silu, up], f"layers.{i}/gated"), mlp.down_proj.weight, mlp.down_proj.bias,
                        f"layers.{i}.down_proj")
        last = i + 1 == len(body.layers)
        normed, residual = g.norm([down, residual], (body.norm if last else body.layers[i + 1].input_layernorm).weight,
                                  "final_norm" if last else f"layers.{i + 1}.input_norm", eps)
    g.linear(normed, model.lm_head.weight, None, "lm_head")
    g.nodes[-1].output[0] = "logits"  # the head's MatMul writes the graph output itself (no Identity copy)

    batch, seq, width_dim, capacity = "batch", "seq", "kv_len", "capacity"
    kv_shape = [batch, config.n_kv_heads, capacity, config.head_dim]
    shapes = {"input_ids": (TensorProto.INT64, [batch, seq]), "position_ids": (TensorProto.INT64, [batch, seq]),
              "cache_position": (TensorProto.INT64, [batch, seq]), "attention_mask": (TensorProto.BOOL, [batch, width_dim]),
              "logits": (TensorProto.FLOAT, [batch, seq, config.vocab_size])}
    for name in past + present:
        shapes[name] = (TensorProto.FLOAT, kv_shape)
    graph = helper.make_graph(
        g.nodes, "exactbench_fused_decoder",
        [helper.make_tensor_value_info(n, *shapes[n]) for n in input_names(config)],
        [helper.make_tensor_value_info(n, *shapes[n]) for n in output_names(config)],
        g.initializers, value_info=g.value_info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(CONTRIB, 1)],
                             producer_name="exactbench")


def export_fused_decoder(checkpoint: Checkpoint, path: Path) -> None:
    """Write the fused fp32 decoder step of `checkpoint` to `path` (one self-contained .onnx file)."""
    onnx.save(build_fused_decoder(checkpoint), str(path))
