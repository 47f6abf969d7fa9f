"""Hugging Face transformers as a peer backend ('transformers'): the engine users would run instead, judged by the
same suites. transformers is an optional dependency (the `peers` extra); without it, loading skips naming it."""
from .backend import TransformersBackend

__all__ = ["TransformersBackend"]
