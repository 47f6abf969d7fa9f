"""Quantization tables: a quality scoreboard sorted by mean KLD (llama.cpp's perplexity/KLD style) and a speed and
memory table with ratios to fp32 of the same backend (torchao's README style), each row naming its implementation."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.report import Table, table

QUALITY, SPEED, MEMORY = "test_quality_against_fp32", "test_speed_against_fp32", "test_memory"


def with_error(value: float, error: float, scale: float = 1.0, digits: int = 4) -> str:
    if pd.isna(value):
        return ""
    return f"{value * scale:.{digits}g} ± {error * scale:.2g}"


def passed(frame: pd.DataFrame, function: str) -> pd.DataFrame:
    return frame[(frame["function"] == function) & (frame["outcome"] == "passed")]


def scoreboard(quality: pd.DataFrame) -> pd.DataFrame:
    quality = quality.sort_values(["backend", "metric.mean_kld"])
    return pd.DataFrame({
        "backend": quality["backend"], "strategy": quality["quant"], "implementation": quality["param.implementation"],
        "PPL": [with_error(v, e) for v, e in zip(quality["metric.ppl"], quality["metric.ppl_err"])],
        "ΔPPL": [with_error(v, e) for v, e in zip(quality["metric.delta_ppl"], quality["metric.delta_ppl_err"])],
        "mean KLD": [with_error(v, e) for v, e in zip(quality["metric.mean_kld"], quality["metric.mean_kld_err"])],
        "KLD p99": quality["metric.kld_p99"], "KLD max": quality["metric.kld_max"],
        "RMS Δp %": [with_error(v, e, 100) for v, e in zip(quality["metric.rms_delta_p"],
                                                           quality["metric.rms_delta_p_err"])],
        "same top-1 %": [with_error(v, e, 100) for v, e in zip(quality["metric.same_top1"],
                                                               quality["metric.same_top1_err"])],
    }).reset_index(drop=True)


def speed_memory(speed: pd.DataFrame, memory: pd.DataFrame) -> pd.DataFrame:
    speed = speed.assign(column=speed["param.phase"] + " b" + speed["param.batch"].astype(int).astype(str) + " ×fp32")
    ratios = speed.pivot_table(index=["backend", "quant"], columns="column", values="metric.ratio_to_fp32",
                               aggfunc="first")
    order = [f"{phase} b{batch} ×fp32" for phase in ("prefill", "decode") for batch in (1, 8)]
    ratios = ratios[[c for c in order if c in ratios.columns]]
    memory_columns = {"param.implementation": "implementation", "metric.bits_per_weight": "bits/weight",
                      "metric.weight_bytes": "weight MB", "metric.model_file_bytes": "model file MB",
                      "metric.kv_bytes_per_token": "KV bytes/token", "metric.peak_rss_bytes": "peak RSS MB"}
    sizes = memory.set_index(["backend", "quant"]).reindex(columns=list(memory_columns)).rename(columns=memory_columns)
    for column in ("weight MB", "model file MB", "peak RSS MB"):
        sizes[column] = sizes[column] / 1e6
    joined = sizes.join(ratios, how="outer").reset_index().rename(columns={"quant": "strategy"})
    joined.columns.name = None
    return joined.dropna(axis=1, how="all")


@table("quantization")
def quantization_tables(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    tables = []
    for model, group in frame.groupby("model"):
        quality, speed, memory = passed(group, QUALITY), passed(group, SPEED), passed(group, MEMORY)
        if len(quality):
            tokens = int(quality["param.scored_tokens"].iloc[0])
            tables.append(Table(f"Quality against fp32 of the same backend: {model}", scoreboard(quality), [
                f"{tokens:,} scored held-out tokens (the second half of each 256-token window; harness/corpus.py's "
                "held-out documents), against the backend's own fp32 log-probabilities. llama.cpp's definitions: "
                "KLD = KL(fp32 || strategy) per token; RMS Δp = root mean square change in the probability of the "
                "true token; ΔPPL's error from the covariance of the two runs' NLLs. ± is one standard error. "
                "Sorted by mean KLD within each backend."]))
        if len(speed) or len(memory):
            prompt = int(speed["param.prompt_tokens"].iloc[0]) if len(speed) else None
            decode = int(speed["param.decode_tokens"].iloc[0]) if len(speed) else None
            tables.append(Table(f"Speed and memory against fp32 of the same backend: {model}",
                                speed_memory(speed, memory), [
                f"×fp32: tokens/s over the same backend's fp32, both timed alternately in one test (median of the "
                f"timed rounds after a warm-up). Prefill: {prompt} tokens per row in one call; decode: {decode} "
                "single-token calls after the prompt; bN = batch of N rows.",
                "bits/weight: stored bits of the linear layers' weights, scales included, over their weight count "
                "(torch). weight MB: every stored weight tensor (embeddings stay fp32). model file MB: the ONNX "
                "file (onnxrt reports no per-tensor figure). peak RSS: VmHWM of a fresh spawned child that loads "
                "the model under the strategy and decodes; KV bytes/token: the cache as allocated."]))
    return tables
