"""ONNX export table: build and cache-hit time and file size per strategy."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.report import Table, table

COLUMNS = {"backend": "backend", "model": "model", "quant": "strategy", "metric.build_s": "export or derive (s)",
           "metric.cache_hit_s": "cache hit (s)", "metric.session_s": "session start (s)",
           "metric.file_mb": "file (MB)"}


@table("onnx_export")
def export_times(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    bench = frame[(frame["function"] == "test_export_then_cache_hit") & (frame["outcome"] == "passed")]
    if not len(bench) or "metric.build_s" not in bench:
        return []
    rows = bench[list(COLUMNS)].rename(columns=COLUMNS).sort_values(["backend", "model", "strategy"])
    notes = ["fp32 is exported from the PyTorch reference model; the other strategies are derived from the fp32 "
             "file (which the timing excludes). A cache hit checks the manifest, the size and the sha256 of the file."]
    return [Table("Export and cache-hit time", rows.reset_index(drop=True), notes)]
