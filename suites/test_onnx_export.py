"""ONNX export: the time to export (fp32) or derive (other strategies) a model file, and to find it again.

A backend that exports to ONNX declares 'onnx-export'; others skip, naming it. Each strategy is built into an
empty cache directory (derived strategies start from an fp32 export already there), then fetched again: the
second fetch must be a hit, validated by size and sha256, with no export.
"""
from __future__ import annotations

import time

import pytest

from backends.strategies import Quant, Strategy
from harness.plugin import require


@pytest.mark.bench
def test_export_then_cache_hit(backend, checkpoint, quant, tmp_path, record):
    require(backend, "onnx-export")
    from backends.onnxrt.runner import OrtRunner
    from backends.onnxrt.store import model_file

    if quant != Quant.FP32:
        model_file(checkpoint, Quant.FP32, tmp_path)
    built = model_file(checkpoint, quant, tmp_path)
    hit = model_file(checkpoint, quant, tmp_path)
    assert built.built and not hit.built and hit.path == built.path
    start = time.perf_counter()
    OrtRunner(checkpoint, Strategy(quant), hit.path)
    record(build_s=built.seconds, cache_hit_s=hit.seconds, session_s=time.perf_counter() - start,
           file_mb=hit.path.stat().st_size / 1e6)
