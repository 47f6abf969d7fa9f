"""The embedded models' table: size, training time, held-out perplexity and top-1 agreement with the target."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.report import Table, table

COLUMNS = {
    "param.model": "model",  # the model under test (the record's own model is the last one the test loaded)
    "metric.parameters": "parameters",
    "metric.weights_bytes": "weights",
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
    # one table when every backend measured the same figures (fp32 on the same weights), one per backend otherwise
    figures = {backend: group.reindex(columns=list(COLUMNS)).sort_values("param.model").round(4).to_numpy().tolist()
               for backend, group in measured.groupby("backend")}
    same = len({repr(f) for f in figures.values()}) == 1
    groups = [(", ".join(sorted(figures)), measured.drop_duplicates("param.model"))] if same \
        else list(measured.groupby("backend"))
    tables = []
    for backends, group in groups:
        rows = group.reindex(columns=list(COLUMNS)).rename(columns=COLUMNS).reset_index(drop=True)
        rows["parameters"] = rows["parameters"].map(lambda n: f"{n / 1e6:.2f}M")
        target = rows["model"] == "default-target"
        for column in ("same top-1 as target", "top-1 ±"):
            rows[column] = rows[column].astype(object).where(~target, "(the target)")
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
        tables.append(Table(f"Embedded models on held-out text ({backends}, fp32)", rows, notes,
                            formats={"weights": "bytes", "same top-1 as target": "percent", "top-1 ±": "percent"},
                            missing="the model's training.log gives no training CPU time"))
    return tables
