"""Algorithms written once over the adapter contract (backends/base.py), for every backend: generation (greedy and
sampled decoding), speculative decoding and its rejection sampler, and serving (the batching scheduler, the block
manager and the step runners). A backend may override one natively; the same suites check it."""
