"""onnxruntime-genai as a peer backend ('ortgenai'): ONNX Runtime's own LLM engine, the one users run, judged by the
same suites. onnxruntime-genai is an optional dependency (the `peers` extra); without it, loading skips naming it."""
from .backend import OrtGenaiBackend, genai_model

__all__ = ["OrtGenaiBackend", "genai_model"]
