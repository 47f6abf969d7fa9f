"""Cross-backend tables: the measured differences from the reference backend behind each check."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.report import Table, table

LOGITS = {"backend": "backend", "param.position": "position", "param.kind": "attention kind",
          "metric.prefill_max_abs_error": "prefill max abs Δlogit", "metric.decode_max_abs_error": "decode max abs Δlogit"}
GREEDY = {"backend": "backend", "model": "model", "quant": "strategy", "metric.max_abs_logit_error": "max abs Δlogit",
          "metric.first_mismatch": "first mismatch (step)", "metric.identical_rows": "identical rows"}
ERRORS = {"prefill max abs Δlogit": "error", "decode max abs Δlogit": "error", "max abs Δlogit": "error",
          "error vs fp32": "error", "reference's own error": "error", "ratio (limit 2)": "ratio"}
ORACLE = {"backend": "backend", "model": "model", "quant": "strategy", "metric.optimized_error": "error vs fp32",
          "metric.plain_error": "reference's own error", "metric.ratio": "ratio (limit 2)"}


def _rows(frame: pd.DataFrame, function: str, columns: dict[str, str]) -> pd.DataFrame:
    rows = frame[(frame["function"] == function) & (frame["outcome"] == "passed")]
    present = [c for c in columns if c in rows]
    return rows[present].rename(columns=columns).reset_index(drop=True)


@table("cross_backend")
def differences(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    tables = []
    logits = _rows(frame, "test_fp32_logits_match_reference", LOGITS)
    if len(logits):
        tables.append(Table("fp32 logits against the reference backend (bound 1e-4)", logits, formats=ERRORS, notes=[
                            "A left-padded batch of 3 prompts (5, 11, 2 tokens) prefilled into an empty cache, "
                             "then a 3-token chunk and 5 single tokens at explicit positions; real tokens only."]))
    greedy = _rows(frame, "test_greedy_decoding_matches_reference", GREEDY)
    if len(greedy):
        tables.append(Table("Greedy decoding, 64 tokens, batch 2, against the reference in fp32", greedy,
                            ["fp32: tokens identical and logits within 1e-4. Lossy strategies: the first mismatch "
                             "(64 = none) must be a near-tie, each side's token in the other's top-5."],
                            formats=ERRORS, missing="max abs Δlogit is recorded for fp32 only (lossy strategies are "
                            "judged at the first mismatch instead); the first mismatch for lossy strategies only "
                            "(fp32 tokens must all be identical)"))
    oracle = _rows(frame, "test_low_precision_logits_by_the_oracle", ORACLE)
    if len(oracle):
        tables.append(Table("Low precision by the oracle", oracle, formats=ERRORS, notes=[
                            "The backend's max abs Δlogit against the fp32 reference, beside the reference backend's "
                             "own error in the same precision; the rule allows at most 2x."]))
    return tables
