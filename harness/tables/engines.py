"""The engines page (results/engines.md): prefill and decode tokens/s of every engine x strategy x batch x thread
count, as ratios to torch fp32 measured side by side and absolute; decode as a fraction of the weight-bytes roofline;
the same-token check against torch fp32; a plot of the decode ratios."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.plots import ratio_bars
from harness.report import Table, strategy_label, table

SPEED = "test_engine_tokens_per_second"
SAME_TOKENS = "test_same_tokens"
ROW = ["backend", "strategy", "threads"]


def _plot(ratios: pd.DataFrame, title: str, path: Path) -> None:
    labels = [f"{b} {s} t{t}" for b, s, t in zip(ratios["backend"], ratios["strategy"], ratios["threads"])]
    series = {c: ratios[c] for c in ratios.columns if c.startswith("decode")}
    with ratio_bars(path, labels, series, "decode tokens/s relative to torch fp32 (same test, same threads)", title):
        pass


@table("engines")
def engine_tables(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    speed = frame[(frame["function"] == SPEED) & (frame["outcome"] == "passed")]
    tables = []
    for model, group in speed.groupby("model"):
        group = group.assign(strategy=strategy_label(group), threads=group["param.threads"].astype(int),
                             column=group["param.phase"] + " b" + group["param.batch"].astype(int).astype(str))
        order = [f"{p} b{b}" for p in ("prefill", "decode") for b in sorted(group["param.batch"].astype(int).unique())]

        def pivot(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
            wide = rows.pivot_table(index=ROW, columns="column", values=metric, aggfunc="first")
            wide = wide[[c for c in order if c in wide.columns]].reset_index()
            wide.columns.name = None
            return wide

        ratios, absolute = pivot(group, "metric.ratio_to_torch_fp32"), pivot(group, "metric.tokens_per_s")
        plot = f"engines_{model}.png"
        _plot(ratios, f"{model}: decode tokens/s relative to torch fp32", results_dir / plot)
        prompt, decode = int(group["param.prompt_tokens"].iloc[0]), int(group["param.decode_tokens"].iloc[0])
        notes = [f"Each row's tokens/s over torch fp32's at the same batch and thread count, timed alternately in the "
                 f"same test (median of the timed rounds after a warm-up). Prefill: {prompt} tokens per row in one "
                 f"call; decode: {decode} single-token calls after the prompt; bN = batch of N rows; threads: torch's "
                 f"and transformers' pools (torch.set_num_threads); ONNX Runtime sessions keep the onnxrt backend's count "
                 f"(onnxruntime-genai's rule: half the hardware threads, 1 to 16)."]
        missing = "the engine does not declare this strategy, or no record at this phase and batch"
        tables.append(Table(f"Engines relative to torch fp32: {model}", ratios, notes, plot, missing=missing,
                            formats={c: "ratio" for c in order}))
        tables.append(Table(f"Engines, tokens/s: {model} (absolute, on the machine named above)", absolute,
                            missing=missing))
        roofline = group[group["param.phase"] == "decode"].dropna(subset=["metric.roofline_fraction"]) \
            if "metric.roofline_fraction" in group else group.iloc[:0]
        if len(roofline):
            wide = pivot(roofline, "metric.roofline_fraction")
            bandwidth = roofline["metric.machine_read_GBps"].median()
            fits = roofline["param.weights_fit_in_llc"].iloc[0]
            tables.append(Table(
                f"Decode as a fraction of the fp32 weight-bytes roofline: {model}", wide,
                [f"Roofline = batch x read bandwidth / fp32 weight bytes per step ({bandwidth:.1f} GB/s measured in "
                 f"the run, one thread summing a buffer 8x the last-level cache). "
                 + ("The weights fit in the last-level cache, so DRAM bandwidth understates the ceiling."
                    if fits is True else "The weights do not fit in the last-level cache.")],
                formats={c: "percent" for c in wide.columns if c not in ROW}, missing=missing))
    same = frame[frame["function"] == SAME_TOKENS]
    if len(same):
        checks = same.assign(result=same["outcome"], first_mismatch=same.get("metric.first_mismatch"))
        checks = checks[["model", "backend", "result", "first_mismatch"]].reset_index(drop=True)
        tables.append(Table("Same tokens as torch fp32 (fp32, greedy)", checks,
                            ["first_mismatch: the step of the first differing token, -1 for none (a difference "
                             "is allowed only between each side's top-2 tokens)."],
                            missing="the check did not run to a figure"))
    return tables
