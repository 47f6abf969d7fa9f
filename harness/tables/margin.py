"""The low-precision oracle's margin: how close correct backends come to its factor (harness/oracles.py's
PRECISION_FACTOR), from the `oracle_ratio` every check judged by assert_by_precision_reference records."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.oracles import PRECISION_FACTOR
from harness.report import Table, table


@table("kv_cache")
def precision_margin(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    if "metric.oracle_ratio" not in frame:
        return []
    checks = frame[(frame["tier"] == "exactness") & frame["metric.oracle_ratio"].notna()]
    if not len(checks):
        return []
    checks = checks.assign(check=checks["function"].str.removeprefix("test_"),
                           precision=checks.reindex(columns=["quant"])["quant"].fillna("fp32"))
    ratios = checks.groupby(["backend", "check", "precision"], sort=True)["metric.oracle_ratio"]
    summary = pd.DataFrame({
        "cases": ratios.size(), "median ratio": ratios.median(), "p99 ratio": ratios.quantile(0.99),
        "max ratio": ratios.max(), "factor": PRECISION_FACTOR,
        "margin (factor / max)": PRECISION_FACTOR / ratios.max(),
        "failed": checks.groupby(["backend", "check", "precision"], sort=True)["outcome"].agg(
            lambda outcomes: int((outcomes == "failed").sum())),
    }).reset_index()
    notes = ["ratio = max |logit - fp64 logit| of the backend / that of the harness's own reference model run in the "
             "same precision (fp32: floored at one ulp of the largest logit); a check fails above the factor. A "
             "correct backend stays well below it; a precision fault (an accumulator, the rotary angles or the KV "
             "cache in a narrower format) lands far above (tests/faults/escapes.py)."]
    return [Table("Low-precision oracle: legitimate ratios against its factor", summary, notes,
                  formats={c: "ratio" for c in ("median ratio", "p99 ratio", "max ratio", "factor",
                                                "margin (factor / max)")})]
