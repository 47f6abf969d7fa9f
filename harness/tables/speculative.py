"""Speculative-decoding tables: speedup over the target alone beside Leviathan et al.'s prediction (and a plot),
and the statistics of the sampler's exactness tests."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.plots import figure, label
from harness.report import Table, table

SPEEDUP_COLUMNS = {
    "param.draft": "draft",
    "param.k": "k",
    "metric.acceptance_rate": "acceptance a",
    "metric.tokens_per_target_call": "tokens / target call",
    "metric.tokens_per_s": "tokens/s",
    "metric.target_tokens_per_s": "target alone tokens/s",
    "metric.speedup": "speedup",
    "metric.predicted_speedup": "predicted",
    "metric.c": "c",
    "metric.verify_cost": "verify cost v",
    "metric.predicted_with_verify_cost": "predicted with v",
}


def _plot(rows: pd.DataFrame, title: str, path: Path) -> None:
    with figure(path, figsize=(6.5, 4)) as (_, ax):
        for index, (draft, group) in enumerate(rows.groupby("draft", sort=True)):
            color = f"C{index}"
            ax.plot(group["k"], group["speedup"], marker="o", color=color, label=f"{draft} (measured)")
            ax.plot(group["k"], group["predicted"], linestyle="--", color=color, label=f"{draft} (predicted)")
            ax.plot(group["k"], group["predicted with v"], linestyle=":", color=color,
                    label=f"{draft} (predicted with v)")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        label(ax, "draft tokens per round k", "speedup over the target alone", title)


@table("speculative")
def speedup_against_theory(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    bench = frame[(frame["function"] == "test_speedup") & (frame["outcome"] == "passed")]
    if not len(bench) or "metric.speedup" not in bench:
        return []
    tables = []
    for (backend, model), group in bench.groupby(["backend", "model"]):
        rows = group.reindex(columns=list(SPEEDUP_COLUMNS)).rename(columns=SPEEDUP_COLUMNS)  # older records lack some
        rows = rows.astype({"k": int}).sort_values(["draft", "k"]).reset_index(drop=True)
        plot = f"speculative_speedup_{backend}_{model}.png"
        _plot(rows, f"{backend}, {model}: greedy, batch 1 (dashed: theorem; dotted: with measured v)", results_dir / plot)
        best = rows.loc[rows.groupby("draft")["speedup"].idxmax()]
        notes = [
            "predicted = (1 - a^(k+1)) / ((1 - a)(c k + 1)) (Leviathan et al. 2023, Theorem 3.8), with a the "
            "measured acceptance rate (accepted / judged draft tokens) and c the draft's cost per drafted token "
            "over the target's cost per token alone, both measured in the same run.",
            "verify cost v: one verification forward (k+1 tokens) plus the sampler, in target-step units; the "
            "theorem assumes v = 1 (verification as cheap as a step, true where decoding is memory-bound); "
            "'predicted with v' puts the measured v in place of that 1: tokens per round / (c k + v).",
            "Prompt lookup proposes nothing where no n-gram matches (a plain step), which the formula ignores.",
            "Speedups are ratios of medians of alternated runs (target alone, then speculative) after one warm-up.",
            "Best k per draft: " + "; ".join(f"{r.draft} k={r.k}: {r.speedup:.2f}x" for r in best.itertuples()) + ".",
        ]
        tables.append(Table(f"Speedup over the target alone: {backend}, {model}", rows, notes, plot, formats={
            "acceptance a": "percent", "speedup": "ratio", "predicted": "ratio", "predicted with v": "ratio"},
            missing="an older record without this metric"))
    return tables


@table("speculative")
def sampler_statistics(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    if "metric.min_pvalue" not in frame:
        return []
    checks = frame.dropna(subset=["metric.min_pvalue"])
    rows = pd.DataFrame({
        "check": checks["function"],
        "backend": checks["backend"].fillna("(none: tensors)"),
        "draft": checks["param.draft"].fillna("(synthetic q)") if "param.draft" in checks else "(synthetic q)",
        "draws": checks["metric.draws"].astype(int),
        "smallest p-value": checks["metric.min_pvalue"],
        "outcome": checks["outcome"],
    }).sort_values(["check", "backend", "draft"]).reset_index(drop=True)
    notes = ["Chi-square goodness of fit at significance 1e-4 (cells expected fewer than 5 times pooled); "
             "a test fails when a p-value falls below 1e-4. Fixed seeds: the same p-values every run."]
    return [Table("Sampler statistics", rows, notes, formats={"smallest p-value": "pvalue"})]
