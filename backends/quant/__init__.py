"""Quantized number formats, backend-agnostic: one home for each stored format (backends/quant/formats.py)."""
