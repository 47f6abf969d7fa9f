"""Cross-backend tables: the measured differences from the reference backend behind each check."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.report import Table, table

LOGITS = {"backend": "backend", "model": "model", "param.position": "position", "param.kind": "attention kind",
          "param.inputs": "inputs",
          "metric.optimized_error": "error vs fp64", "metric.plain_error": "fp32 reference's error",
          "metric.ratio": "ratio (limit 2)"}
GREEDY = {"backend": "backend", "model": "model", "param.prompt_lengths": "prompt lengths",
          "metric.identical_rows": "identical rows",
          "metric.optimized_error": "error vs fp64", "metric.plain_error": "reference's own error",
          "metric.ratio": "ratio (limit 2)"}
ERRORS = {"error vs fp64": "error", "reference's own error": "error", "plain path's error": "error",
          "ratio (limit 2)": "ratio"}
ORACLE = {"backend": "backend", "model": "model", "quant": "strategy", "param.plain_path": "plain path",
          "param.inputs": "inputs",
          "metric.optimized_error": "error vs fp64", "metric.plain_error": "plain path's error",
          "metric.ratio": "ratio (limit 2)"}


def _rows(frame: pd.DataFrame, function: str, columns: dict[str, str]) -> pd.DataFrame:
    rows = frame[(frame["function"] == function) & (frame["outcome"] == "passed")]
    present = [c for c in columns if c in rows]
    return rows[present].rename(columns=columns).reset_index(drop=True)


@table("cross_backend")
def differences(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    tables = []
    logits = _rows(frame, "test_fp32_logits_match_reference", LOGITS)
    if len(logits):
        tables.append(Table("fp32 logits against the fp64 reference, beside the harness's fp32 reference model's error",
                            logits, formats=ERRORS, notes=[
                                "A left-padded batch of 3 prompts (5, 11, 2 tokens) prefilled into an empty cache, "
                                "then a 3-token chunk and 5 single tokens at explicit positions; real tokens only (a "
                                "backend without padding masks or explicit positions: each prompt alone from 0). "
                                "The rule: at most 2x the fp32 reference's error (floored at one ulp of the largest "
                                "logit); that model computes its rotary angles in fp32, as engines do."]))
    greedy = _rows(frame, "test_greedy_decoding_matches_reference", GREEDY)
    if len(greedy):
        tables.append(Table("Greedy decoding in fp32, 64 tokens, batch 2, against the reference backend", greedy,
                            ["Tokens must be identical; the logits along the path are judged against the fp64 "
                             "reference by the same rule. Lossy strategies are judged by the oracle below, and "
                             "their token agreement by the quality figures."], formats=ERRORS))
    oracle = _rows(frame, "test_low_precision_logits_by_the_oracle", ORACLE)
    if len(oracle):
        tables.append(Table("Lossy strategies by the oracle", oracle, formats=ERRORS, notes=[
                            "The backend's max abs Δlogit against the fp64 reference, beside the plain path's: the "
                            "same format simulated exactly in fp64 (int8-dynamic, int4-block32/128: "
                            "harness/references.py) or the harness's reference model in the same precision (fp16, bf16); "
                            "the rule allows at most 2x."]))
    return tables
