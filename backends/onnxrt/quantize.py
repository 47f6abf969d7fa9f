"""Each strategy's model, derived from the fp32 export with ONNX Runtime's own tools.

- fp16: every float tensor in half precision, the KV cache included; logits stay fp32 (the contract's output).
- int8-dynamic: MatMul weights int8 per output channel, activations quantized per call. QUInt8 weights: ORT's
  QInt8 x QInt8 kernels lose accuracy on CPUs without VNNI (top-1 agreement 0.74 against 0.98, DESIGN.md).
- int4-block32/128: MatMulNBits, symmetric 4-bit weights in blocks of 32 or 128 along the input dimension,
  accuracy_level 4 (int8 activations inside the kernel: the fastest 4-bit variant measured, DESIGN.md).
- int4-gptq-block128: the same MatMulNBits nodes and format as int4-block128, holding the blocks GPTQ chose on
  the torch side (backends/torch_ref/quantize.gptq_blocks, cached by checkpoint): the same stored weights on both
  backends. Each MatMul is matched to its torch layer by its weight's value (the export keeps weight.T exactly;
  TorchScript's node names drop module prefixes).
- fp16-kv: not derived; exported with the past/present keys and values in fp16 and everything else fp32 (store.py).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import onnx

from backends.checkpoint import Checkpoint
from backends.strategies import Quant

from .backend import QUANTS
INT4_BLOCKS = {Quant.INT4_BLOCK32: 32, Quant.INT4_BLOCK128: 128}
INT4_ACCURACY_LEVEL = 4
IMPLEMENTATION = {
    Quant.FP32: "onnxruntime fp32",
    Quant.FP16: "onnxruntime fp16 graph (convert_float_to_float16)",
    Quant.INT8_DYNAMIC: "onnxruntime quantize_dynamic (QUInt8 per channel)",
    **{q: f"onnxruntime MatMulNBits (accuracy_level {INT4_ACCURACY_LEVEL})" for q in INT4_BLOCKS},
    Quant.INT4_GPTQ_BLOCK128: f"torch GPTQ blocks in onnxruntime MatMulNBits (accuracy_level {INT4_ACCURACY_LEVEL})",
    Quant.FP16_KV: "onnxruntime fp32, fp16 cache",
}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def derive(quant: Quant, checkpoint: Checkpoint, fp32_path: Path, out_path: Path) -> None:
    """Write `quant`'s model, made from `checkpoint`'s fp32 model at `fp32_path`, to `out_path`."""
    if quant == Quant.INT4_GPTQ_BLOCK128:
        from backends.torch_ref.quantize import gptq_blocks

        onnx.save(with_int4_blocks(onnx.load(str(fp32_path)), checkpoint, gptq_blocks(checkpoint)), str(out_path))
    elif quant == Quant.FP16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=["logits"])
        onnx.save(model, str(out_path))
    elif quant == Quant.INT8_DYNAMIC:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # it advises shape-inference pre-processing, which changes nothing here: every weight is a MatMul initializer
        advice = _DropMessage("Please consider to run pre-processing before quantization")
        logging.getLogger().addFilter(advice)
        try:
            quantize_dynamic(str(fp32_path), str(out_path), op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QUInt8)
        finally:
            logging.getLogger().removeFilter(advice)
    elif quant in INT4_BLOCKS:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), block_size=INT4_BLOCKS[quant], is_symmetric=True,
                                         accuracy_level=INT4_ACCURACY_LEVEL)
        quantizer.process()
        onnx.save(quantizer.model.model, str(out_path))
    else:
        raise ValueError(f"no ONNX derivation for strategy {quant.value!r}; accepted: "
                         f"{', '.join(q.value for q in QUANTS if q not in (Quant.FP32, Quant.FP16_KV))}")


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def with_int4_blocks(model: onnx.ModelProto, checkpoint: Checkpoint, blocks: dict) -> onnx.ModelProto:
    """`model` with every MatMul whose weight is a torch layer's (found by value) replaced by a MatMulNBits node
    holding that layer's stored int4 blocks (backends/quant/formats.Int4Blocks, by torch layer name)."""
    from onnx import helper, numpy_helper

    from backends.torch_ref.backend import build_model
    from backends.torch_ref.quantize import layer_name, linears

    torch_model = build_model(checkpoint)
    by_value = {_digest(linear.weight.detach().T.numpy()): blocks[layer_name(torch_model, linear)]
                for _, _, linear in linears(torch_model)}
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes, replaced = [], set()
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        key = None if weight is None else _digest(numpy_helper.to_array(weight))
        if key not in by_value:
            nodes.append(node)
            continue
        stored, (k, n) = by_value[key], weight.dims
        packed = numpy_helper.from_array(stored.packed.reshape(n, k // stored.block, stored.block // 2).numpy(),
                                         f"{weight.name}_Q4")
        scales = numpy_helper.from_array(stored.scales.numpy(), f"{weight.name}_scales")
        graph.initializer.extend([packed, scales])
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], packed.name, scales.name], list(node.output),
                                      name=f"{node.name}_Q4", domain="com.microsoft", K=k, N=n, bits=4,
                                      block_size=stored.block, accuracy_level=INT4_ACCURACY_LEVEL))
        replaced.add(key)
    if replaced != set(by_value):
        raise ValueError(f"{len(by_value) - len(replaced)} of {len(by_value)} torch linears have no MatMul of the "
                         "same weight in the ONNX model: it was not exported from this checkpoint")
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]  # the fp32 weights go
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


LINEAR_OPS = ("MatMul", "MatMulInteger", "MatMulNBits")
# ONNX Runtime's quantizers name a quantized weight <weight>_quantized (quantize_dynamic) or <weight>_Q4
# (MatMulNBits, and with_int4_blocks above), and its scales and zero points <weight>_scale(s) / _zero_point(s)
QUANTIZED_SUFFIXES = ("_quantized", "_Q4")


def stored_weight_figures(path: Path) -> dict[str, float]:
    """From the model file's initializers: weight bytes (every stored tensor) and bits per weight of the linear
    layers (their stored weights with scales and zero points, over the number of weights they stand for)."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    sizes = {init.name: numpy_helper.to_array(init).nbytes for init in model.graph.initializer}
    shapes = {init.name: init.dims for init in model.graph.initializer}
    weights: dict[str, int] = {}  # the original weight name -> how many weights it holds
    for node in model.graph.node:
        if node.op_type not in LINEAR_OPS or len(node.input) < 2 or node.input[1] not in sizes:
            continue  # activations times activations (attention), not a weight
        name = node.input[1]
        base = next((name.removesuffix(s) for s in QUANTIZED_SUFFIXES if name.endswith(s)), name)
        if node.op_type == "MatMulNBits":
            attributes = {a.name: a.i for a in node.attribute}
            weights[base] = attributes["K"] * attributes["N"]
        else:
            weights[base] = int(np.prod(shapes[name]))
    if not weights:
        raise ValueError(f"{path}: no MatMul with a stored weight; accepted ops: {', '.join(LINEAR_OPS)}")
    linear_bytes = sum(size for name, size in sizes.items()
                       if any(name == base or name.startswith(base + "_") for base in weights))
    return {"weight_bytes": sum(sizes.values()), "bits_per_weight": 8 * linear_bytes / sum(weights.values())}
