"""Cross-implementation table: the largest relative fp32 logit difference from transformers, per checkpoint and check."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.report import Table, table


@table("cross_implementation")
def logit_differences(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    if "metric.relative_logit_error" not in frame or "param.case" not in frame:
        return []
    measured = frame.dropna(subset=["metric.relative_logit_error"]).copy()
    cache = measured["param.use_cache"].map({True: " (cache)", False: " (no cache)"}) if "param.use_cache" in measured \
        else pd.Series("", index=measured.index)
    measured["check"] = measured["function"].str.removeprefix("test_") + cache.fillna("")
    rows = measured.pivot_table(index=["backend", "param.case"], columns="check",
                                values="metric.relative_logit_error", aggfunc="max").reset_index()
    rows = rows.rename(columns={"param.case": "checkpoint"})
    rows.columns.name = None
    notes = ["Max |logit difference| against transformers (fp32, eager attention) on the same directory, relative to "
             "the largest |logit|; the bound is 4e-6 (about 32 fp32 ulps of the largest logit). Greedy columns "
             "compare the logits of all 32 steps, each side following its own tokens (which must be identical). "
             "Random families are built by transformers with seeded weights; the default models are the embedded "
             "ones; `model-<name>` is the --model checkpoint."]
    formats = {c: "error" for c in rows.columns if c not in ("backend", "checkpoint")}
    return [Table("Largest fp32 logit difference from transformers, relative to the largest logit", rows, notes, formats=formats,
                  missing="the check did not run on this checkpoint")]
