"""The ONNX Runtime backend, registered as 'onnxrt'.

onnxruntime and onnx are imported only when a model is loaded, so the registry (and every other backend) works
without them; loading then raises BackendUnavailable naming the missing package, which the plugin reports as
a skip.
"""
from __future__ import annotations

from backends.base import Backend, ModelRunner, import_package
from backends.checkpoint import POSITIONS, Checkpoint
from backends.registry import register
from backends.strategies import Attention, Batching, Quant, Strategy

QUANTS = (Quant.FP32, Quant.FP16, Quant.INT8_DYNAMIC, Quant.INT4_BLOCK32, Quant.INT4_BLOCK128, Quant.INT4_GPTQ_BLOCK128,
          Quant.FP16_KV)
DEPENDENCIES = {"onnxruntime": "onnxruntime", "onnx": "onnx"}  # module -> the package that provides it


def check_dependencies() -> None:
    for module, package in DEPENDENCIES.items():
        import_package(module, package)


@register
class OnnxRuntimeBackend(Backend):
    name = "onnxrt"

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        return frozenset(
            [f"quant:{q.value}" for q in QUANTS]
            + [f"attention:{Attention.NATIVE.value}"]  # ONNX Runtime runs the exported attention its own way
            + [f"position:{p}" for p in POSITIONS]
            + [f"batching:{b.value}" for b in Batching]  # paged: a gather of pool slots inside the graph
            + ["kv-cache", "ragged-batch", "explicit-positions", "padding-mask", "cache-rollback", "onnx-export"]
        )
    # Two graphs serve these, chosen per model (store.graph_kind): the fused graph (fused_graph.py: ONNX Runtime's
    # GroupQueryAttention, fused RMSNorms) for RoPE Llama-style models it expresses exactly, every capability above
    # included; graph.py's general export for the rest (ALiBi, learned/sinusoidal positions, dynamic-NTK and
    # LongRoPE, partial rotary, head_dim not a multiple of 16, sliding windows, Gemma, Qwen3, GPT-2, GPT-NeoX) and
    # for fp16-kv and int4-gptq-block128 (store.GENERAL_ONLY); paged batching has a graph of its own.

    def load(self, checkpoint: Checkpoint, strategy: Strategy) -> ModelRunner:
        self.check_strategy(strategy)
        check_dependencies()
        from .runner import OrtRunner
        from .store import model_file

        return OrtRunner(checkpoint, strategy, model_file(checkpoint, strategy.quant).path)
