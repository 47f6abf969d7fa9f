"""The embedded models' table: size, training time, held-out perplexity and top-1 agreement with the target."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.report import Table, table

COLUMNS = {
    "model": "model",
    "metric.parameters": "parameters",
    "metric.weights_bytes": "weights (bytes)",
    "metric.train_wall_s": "training wall (s)",
    "metric.train_cpu_s": "training CPU (s)",
    "metric.ppl": "held-out PPL",
    "metric.ppl_err": "PPL ±",
    "metric.same_top1": "same top-1 as target",
    "metric.same_top1_err": "top-1 ±",
}


@table("model_quality")
def heldout_quality(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    measured = frame[(frame["function"] == "test_heldout_quality") & (frame["outcome"] == "passed")]
    if not len(measured):
        return []
    tables = []
    for backend, group in measured.groupby("backend"):
        rows = group.reindex(columns=list(COLUMNS)).rename(columns=COLUMNS).reset_index(drop=True)
        rows["parameters"] = rows["parameters"].map(lambda n: f"{n / 1e6:.2f}M")
        first = group.iloc[0]
        notes = [
            f"Held-out set: {int(first['metric.heldout_tokens']):,} tokens of this Python's standard library and pydoc "
            f"topics (Python {first['param.python']}, corpus {first['param.corpus']}), in windows of 256 tokens; the "
            f"second half of each window is scored ({int(first['metric.scored_tokens']):,} tokens), as llama.cpp's "
            "perplexity does. ± is one standard error.",
            "same top-1 as target: the fraction of scored positions where the draft's most likely token is the "
            "target's; greedy speculative decoding accepts a drafted token exactly when they agree.",
            "Training times are from each model's training.log (fixed step counts; the 2-core machine was shared, "
            "so CPU seconds are the steadier figure).",
        ]
        tables.append(Table(f"Embedded models on held-out text ({backend}, fp32)", rows, notes))
    return tables
