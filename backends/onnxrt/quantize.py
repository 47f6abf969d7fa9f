"""Each strategy's model, derived from the fp32 export with ONNX Runtime's own tools.

- fp16: every float tensor in half precision, the KV cache included; logits stay fp32 (the contract's output).
- int8-dynamic: MatMul weights int8 per output channel, activations quantized per call. QUInt8 weights: ORT's
  QInt8 x QInt8 kernels lose accuracy on CPUs without VNNI (top-1 agreement 0.74 against 0.98, DESIGN.md).
- int4-block32/128: MatMulNBits, symmetric 4-bit weights in blocks of 32 or 128 along the input dimension,
  accuracy_level 4 (int8 activations inside the kernel: the fastest 4-bit variant measured, DESIGN.md).
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx

from backends.strategies import Quant

from .backend import QUANTS
INT4_BLOCKS = {Quant.INT4_BLOCK32: 32, Quant.INT4_BLOCK128: 128}
INT4_ACCURACY_LEVEL = 4
IMPLEMENTATION = {
    Quant.FP32: "onnxruntime fp32",
    Quant.FP16: "onnxruntime fp16 graph (convert_float_to_float16)",
    Quant.INT8_DYNAMIC: "onnxruntime quantize_dynamic (QUInt8 per channel)",
    **{q: f"onnxruntime MatMulNBits (accuracy_level {INT4_ACCURACY_LEVEL})" for q in INT4_BLOCKS},
}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def derive(quant: Quant, fp32_path: Path, out_path: Path) -> None:
    """Write `quant`'s model, made from the fp32 model at `fp32_path`, to `out_path`."""
    if quant == Quant.FP16:
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
                         f"{', '.join(q.value for q in QUANTS if q != Quant.FP32)}")
