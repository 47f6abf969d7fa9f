"""Backend speed tables: prefill and decode tokens/s of each backend and strategy as ratios to torch fp32
(measured side by side in the same test), the absolute tokens/s beside them, and a plot of the ratios."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.ticker import NullFormatter

from harness.plots import ratio_bars
from harness.report import Table, table

FUNCTION = "test_tokens_per_second"


def _plot(ratios: pd.DataFrame, title: str, path: Path) -> None:
    labels = [f"{b} {q}" for b, q in zip(ratios["backend"], ratios["strategy"])]
    series = {c: ratios[c] for c in ratios.columns if c not in ("backend", "strategy")}
    with ratio_bars(path, labels, series, "tokens/s relative to torch fp32 (log scale)", title) as ax:
        ax.set_xscale("log")
        # ratios read as 0.5x, 1x, 2x: labelled powers of two, no crowded minor labels
        values = pd.concat(list(series.values()))
        ticks = [2.0 ** e for e in range(math.floor(math.log2(values.min())), math.ceil(math.log2(values.max())) + 1)]
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())


@table("backend_speed")
def speed_ratios(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    bench = frame[(frame["function"] == FUNCTION) & (frame["outcome"] == "passed")]
    if not len(bench) or "metric.ratio_to_torch_fp32" not in bench:
        return []
    batches = bench["param.batch"].astype(int)  # float in the frame when other suites' records lack it
    bench = bench.assign(column=bench["param.phase"] + " b" + batches.astype(str), strategy=bench["quant"])
    order = [f"{phase} b{batch}" for phase in ("prefill", "decode") for batch in sorted(batches.unique())]
    tables = []
    for model, group in bench.groupby("model"):
        def pivot(metric: str) -> pd.DataFrame:
            wide = group.pivot_table(index=["backend", "strategy"], columns="column", values=metric, aggfunc="first")
            wide = wide[[c for c in order if c in wide.columns]].reset_index()
            wide.columns.name = None
            return wide

        ratios, absolute = pivot("metric.ratio_to_torch_fp32"), pivot("metric.tokens_per_s")
        prompt, decode = int(group["param.prompt_tokens"].iloc[0]), int(group["param.decode_tokens"].iloc[0])
        plot = f"backend_speed_{model}.png"
        _plot(ratios, f"{model}: tokens/s relative to torch fp32, same run", results_dir / plot)
        notes = [f"Ratio = the row's tokens/s over torch fp32's, both timed alternately within the same test "
                 f"(median of the timed rounds after a warm-up round). Prefill: {prompt} tokens per row in one call; "
                 f"decode: {decode} single-token calls after the prompt; bN = batch of N rows."]
        missing = "no record of this strategy at this phase and batch"
        tables.append(Table(f"Speed relative to torch fp32: {model}", ratios, notes, plot, missing=missing,
                            formats={c: "ratio" for c in ratios.columns if c not in ("backend", "strategy")}))
        tables.append(Table(f"Tokens/s: {model} (absolute, on the machine named above)", absolute, missing=missing))
    return tables
