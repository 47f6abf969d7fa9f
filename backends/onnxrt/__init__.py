"""The ONNX Runtime backend: the reference model exported to ONNX, quantized with ONNX Runtime's tools, run with
an in-place KV cache through IO binding. graph.py: the exported graph's contract and the export; quantize.py:
the strategies; store.py: the on-disk cache of model files; runner.py: sessions, the cache, the runner."""
from .backend import OnnxRuntimeBackend

__all__ = ["OnnxRuntimeBackend"]
