"""The ONNX Runtime backend, registered as 'onnxrt'.

onnxruntime and onnx are imported only when a model is loaded, so the registry (and every other backend) works
without them; loading then raises BackendUnavailable naming the missing package, which the plugin reports as
a skip.
"""
from __future__ import annotations

import importlib

from backends.base import Backend, ModelRunner, UnsupportedModel
from backends.checkpoint import POSITIONS, Checkpoint
from backends.registry import register
from backends.strategies import Attention, Batching, Quant, Strategy

QUANTS = (Quant.FP32, Quant.FP16, Quant.INT8_DYNAMIC, Quant.INT4_BLOCK32, Quant.INT4_BLOCK128, Quant.INT4_GPTQ_BLOCK128,
          Quant.FP16_KV)
DEPENDENCIES = {"onnxruntime": "onnxruntime", "onnx": "onnx"}  # module -> the package that provides it


class BackendUnavailable(UnsupportedModel):
    """A package the backend needs is not installed."""


def check_dependencies() -> None:
    for module, package in DEPENDENCIES.items():
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise BackendUnavailable(f"{package} is not installed ({error}); pip install {package}") from None


@register
class OnnxRuntimeBackend(Backend):
    name = "onnxrt"

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        return frozenset(
            [f"quant:{q.value}" for q in QUANTS]
            + [f"attention:{Attention.NATIVE.value}"]  # ONNX Runtime runs the exported attention its own way
            + [f"position:{p}" for p in POSITIONS]
            # paged attention would need a gather of blocks inside the exported graph: not declared
            + [f"batching:{b.value}" for b in (Batching.SEQUENTIAL, Batching.STATIC, Batching.CONTINUOUS)]
            + ["kv-cache", "ragged-batch", "cache-rollback", "onnx-export"]
        )

    def load(self, checkpoint: Checkpoint, strategy: Strategy) -> ModelRunner:
        self.check_strategy(strategy)
        check_dependencies()
        from .runner import OrtRunner
        from .store import model_file

        return OrtRunner(checkpoint, strategy, model_file(checkpoint, strategy.quant).path)
