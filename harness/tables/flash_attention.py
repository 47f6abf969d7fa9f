"""Tables and plot of the flash attention suite: error ratios against the rule, time and peak memory against N."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.plots import figure, growth_exponent
from harness.report import Table, latest, table

RULE_K = 2  # the oracle rule the suite asserts: error <= 2 x the plain path's error
FIT_FROM = 1024  # fit growth on N >= this: every flash tile is full size there, so the constant is constant
PLOT = "flash_attention.png"
TILES_ROW = "flash, tiles 16-256"


def _keys(frame: pd.DataFrame, keys: list[str]) -> list[str]:
    """Keys present in the frame; the machine only when records from several machines are merged."""
    present = [k for k in keys if k in frame]
    return (["machine"] if frame["machine"].nunique() > 1 else []) + present


@table("flash_attention")
def error_ratios(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    if "metric.error_ratio" not in frame:
        return []
    checks = frame[(frame["tier"] == "exactness") & frame["metric.error_ratio"].notna()]
    checks = checks.reindex(columns=checks.columns.union(["param.dtype", "quant", "attention"], sort=False))
    kernel_level = checks["function"] != "test_model_logits_match_naive"
    checks["level"] = np.where(kernel_level, "kernel", "model")
    # the kernel tests name their precision; the model test runs under a quantization strategy
    checks["precision"] = checks["param.dtype"].fillna(checks["quant"])
    # test_flash_block_sizes runs the torch flash kernel itself, at tile sizes 16 to 256
    checks["attention"] = checks["attention"].fillna(TILES_ROW)
    checks["backend"] = checks["backend"].fillna("torch")
    keys = _keys(checks, ["backend", "attention", "level", "precision"])
    summary = checks.groupby(keys, sort=True).agg(
        cases=("metric.error_ratio", "size"),
        **{"max ratio": ("metric.error_ratio", "max"), "median ratio": ("metric.error_ratio", "median")},
        failed=("outcome", lambda o: int((o == "failed").sum())),
    ).reset_index()
    notes = [f"ratio = max error vs the fp64 reference / the plain path's max error; the rule is ratio <= {RULE_K}.",
             "Plain path: the plain formula in the same precision (kernel level), attention=naive (model level).",
             "fp32 plain errors are floored at one fp32 ulp of the output magnitude (an exact plain path is no "
             f"yardstick); bf16 and fp16 have no floor. '{TILES_ROW}': the torch flash kernel at every tile size "
             "of test_flash_block_sizes."]
    return [Table("Error ratios against the rule, by level", summary, notes,
                  formats={"max ratio": "ratio", "median ratio": "ratio"})]


@table("flash_attention")
def time_and_memory(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    needed = {"metric.extra_peak_bytes", "metric.median_s", "param.seq_len", "param.batch"}
    if not needed <= set(frame):
        return []
    bench = frame[(frame["tier"] == "bench") & (frame["outcome"] == "passed")].copy()
    bench = bench.rename(columns={"param.seq_len": "N", "param.batch": "batch"}).astype({"N": int, "batch": int})
    bench = latest(bench, ["machine", "backend", "attention", "batch", "N"])
    bench["ms"] = bench["metric.median_s"] * 1e3
    bench["MiB"] = bench["metric.extra_peak_bytes"] / 2**20
    keys = _keys(bench, ["backend", "batch", "N"])
    wide = bench.pivot_table(index=keys, columns="attention", values=["ms", "MiB"], aggfunc="first")
    columns = {}
    for attention in sorted(bench["attention"].unique()):
        columns[f"{attention} ms"] = wide[("ms", attention)]
        if "naive" in bench["attention"].values and attention != "naive":
            columns[f"{attention} speed vs naive"] = wide[("ms", "naive")] / wide[("ms", attention)]
        columns[f"{attention} MiB"] = wide[("MiB", attention)]
    result = pd.DataFrame(columns).reset_index()

    fits = []
    for group, rows in bench[bench["N"] >= FIT_FROM].groupby(_keys(bench, ["backend", "attention", "batch"])):
        if rows["N"].nunique() >= 3:
            *names, batch = group
            exponent = growth_exponent(rows["N"], rows["metric.extra_peak_bytes"])
            fits.append(f"{' '.join(map(str, names))} batch {batch}: N^{exponent:.2f}")
    first = bench.iloc[0]
    notes = [f"Causal prefill, fp32, {first['param.heads']:.0f} heads of dim {first['param.head_dim']:.0f}, "
             f"{first['param.threads']:.0f} thread(s). ms: median of repeats after warm-up (pytest-benchmark); "
             "speed vs naive: naive's median / this one's, same run. MiB: peak resident memory above the inputs, "
             "in a fresh spawned child (VmHWM after a reset, harness/memory.py).",
             f"Growth of the extra memory, fitted as a + b*N^c on N >= {FIT_FROM} (a absorbs what does not grow "
             "with N): " + "; ".join(fits) + ".",
             "sdpa's extra memory is close to 4*B*N^2 bytes: torch turns the boolean mask of the kernel contract "
             "into a float mask."]
    _plot(bench, results_dir / PLOT)
    formats = {c: "ratio" for c in result.columns if c.endswith("speed vs naive")}
    return [Table("Time and peak extra memory against N", result, notes, plot=PLOT, formats=formats,
                  missing="this implementation was not measured at this N and batch")]


def _plot(bench: pd.DataFrame, path: Path) -> None:
    with figure(path, ncols=2, figsize=(11, 4.2)) as (_, (memory, time)):
        for (backend, attention, batch), rows in bench.groupby(["backend", "attention", "batch"]):
            rows = rows.sort_values("N")
            style = dict(marker="o", linestyle="-" if batch == 1 else "--", label=f"{backend} {attention} batch {batch}")
            memory.plot(rows["N"], rows["MiB"].clip(lower=1e-2), **style)
            time.plot(rows["N"], rows["ms"], **style)
        for axis, label in ((memory, "peak extra memory (MiB)"), (time, "median time (ms)")):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("sequence length N")
            axis.set_ylabel(label)
            axis.grid(True, which="both", alpha=0.3)
        time.legend(fontsize=7)
