"""Quantization tables: a quality scoreboard sorted by mean KLD (llama.cpp's perplexity/KLD style) and a speed and
memory table with ratios to fp32 of the same backend (torchao's README style), each row naming its implementation."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.plots import figure, label
from harness.report import Table, table

QUALITY, SPEED, MEMORY = "test_quality_against_fp32", "test_speed_against_fp32", "test_memory"
SIZE_PLOT, SPEED_PLOT = "quantization_quality_vs_size.png", "quantization_speed_vs_quality.png"


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
                      "metric.kv_bytes_per_token": "KV bytes/token", "metric.peak_rss_bytes": "peak RSS MB",
                      "metric.load_peak_bytes": "load peak MB"}
    sizes = memory.set_index(["backend", "quant"]).reindex(columns=list(memory_columns)).rename(columns=memory_columns)
    for column in ("weight MB", "model file MB", "peak RSS MB", "load peak MB"):
        sizes[column] = sizes[column] / 1e6
    decode = speed[(speed["param.phase"] == "decode") & (speed["param.batch"] == 1)]
    bandwidth = decode.set_index(["backend", "quant"]).reindex(
        columns=["metric.achieved_GBps", "metric.weights_fit_in_cache"]).rename(
        columns={"metric.achieved_GBps": "decode b1 GB/s", "metric.weights_fit_in_cache": "weights in LLC"})
    bandwidth["weights in LLC"] = bandwidth["weights in LLC"].map({1.0: "yes", 0.0: "no"})
    joined = sizes.join(ratios, how="outer").join(bandwidth, how="left").reset_index().rename(
        columns={"quant": "strategy"})
    joined.columns.name = None
    return joined.dropna(axis=1, how="all")


def machine_note(speed: pd.DataFrame) -> str:
    """This machine's read bandwidth and last-level cache, as the run measured them (harness/machine.py)."""
    decode = speed[speed["param.phase"] == "decode"]
    if "metric.machine_read_GBps" not in decode or decode["metric.machine_read_GBps"].isna().all():
        return "decode b1 GB/s: not measured in these records."
    read = decode["metric.machine_read_GBps"].dropna().iloc[0]
    text = (f"decode b1 GB/s: weight bytes x decode steps/s (every weight read once per step), beside this "
            f"machine's measured read bandwidth of {read:.1f} GB/s (one thread summing a buffer far larger than "
            "the last-level cache, median of repeats: harness/machine.py).")
    if "metric.last_level_cache_bytes" in decode and decode["metric.last_level_cache_bytes"].notna().any():
        llc = decode["metric.last_level_cache_bytes"].dropna().iloc[0]
        text += (f" weights in LLC: whether the weights fit in the {llc / 2**20:.0f} MiB last-level cache; where "
                 "they do, they are read from cache and DRAM bandwidth is the wrong ceiling.")
    return text


def plot_quality_size_speed(quality: pd.DataFrame, speed: pd.DataFrame, memory: pd.DataFrame,
                            results_dir: Path, model: str) -> tuple[str | None, str | None]:
    """Mean KLD against bits per weight, and decode speed against mean KLD, one point per backend and strategy.
    Returns the files written (None where a plot had no points)."""
    kld = quality.set_index(["backend", "quant"])["metric.mean_kld"]
    bits = memory.set_index(["backend", "quant"]).reindex(columns=["metric.bits_per_weight"]).iloc[:, 0]
    decode = speed[(speed["param.phase"] == "decode") & (speed["param.batch"] == 1)]
    ratio = decode.set_index(["backend", "quant"])["metric.ratio_to_fp32"]
    written = []
    for name, x, y, xlabel, ylabel, title in (
            (SIZE_PLOT, bits, kld, "bits per weight (scales included)", "mean KLD vs fp32", "quality against size"),
            (SPEED_PLOT, kld, ratio, "mean KLD vs fp32", "decode tokens/s over fp32 (batch 1)",
             "speed against quality")):
        points = pd.concat([x.rename("x"), y.rename("y")], axis=1, join="inner").dropna()
        points = points[points["x"] > 0] if name == SPEED_PLOT else points  # fp32 itself: KLD 0, off a log axis
        if not len(points):
            written.append(None)
            continue
        with figure(results_dir / name) as (_, ax):
            for backend, rows in points.groupby(level="backend"):
                ax.scatter(rows["x"], rows["y"], label=backend)
                for (_, quant), row in rows.iterrows():
                    ax.annotate(quant, (row["x"], row["y"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if name == SIZE_PLOT:
                ax.set_yscale("symlog", linthresh=1e-4)
            else:
                ax.set_xscale("log")
            label(ax, xlabel, ylabel, f"{title}: {model}")
        written.append(name)
    return written[0], written[1]


@table("quantization")
def quantization_tables(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    from .seed_claims import QUANTIZATION_LINES, claims_table

    tables = []
    for model, group in frame.groupby("model"):
        quality, speed, memory = passed(group, QUALITY), passed(group, SPEED), passed(group, MEMORY)
        size_plot, speed_plot = plot_quality_size_speed(quality, speed, memory, results_dir, model)
        if len(quality):
            tokens = int(quality["param.scored_tokens"].iloc[0])
            tables.append(Table(f"Quality against fp32 of the same backend: {model}", scoreboard(quality), [
                f"{tokens:,} scored held-out tokens (the second half of each 256-token window; harness/corpus.py's "
                "held-out documents), against the backend's own fp32 log-probabilities. llama.cpp's definitions: "
                "KLD = KL(fp32 || strategy) per token; RMS Δp = root mean square change in the probability of the "
                "true token; ΔPPL's error from the covariance of the two runs' NLLs. ± is one standard error. "
                "Sorted by mean KLD within each backend."], plot=size_plot))
        if len(speed) or len(memory):
            prompt = int(speed["param.prompt_tokens"].iloc[0]) if len(speed) else None
            decode = int(speed["param.decode_tokens"].iloc[0]) if len(speed) else None
            tables.append(Table(f"Speed and memory against fp32 of the same backend: {model}",
                                speed_memory(speed, memory), [
                f"×fp32: tokens/s over the same backend's fp32, both timed alternately in one test (median of the "
                f"timed rounds after a warm-up). Prefill: {prompt} tokens per row in one call; decode: {decode} "
                "single-token calls after the prompt; bN = batch of N rows.",
                "bits/weight: stored bits of the linear layers' weights, scales and zero points included, over "
                "their weight count (torch: the stored tensors; onnxrt: the model file's initializers). weight MB: "
                "every stored weight tensor (embeddings stay fp32). model file MB: the ONNX file. peak RSS: VmHWM "
                "of a fresh spawned child that loads the model under the strategy and decodes. load peak MB: that "
                "peak above what the child held before loading (interpreter, imports, the fp32 checkpoint): onnxrt "
                "opens its stored, already-quantized file, so this is the strategy's own; torch builds the fp32 "
                "model and then swaps its layers, so its figure includes one fp32 copy of the weights. KV "
                "bytes/token: the cache as allocated.", machine_note(speed)], plot=speed_plot))
    if len(frame):
        claims = claims_table(frame, {"quantization"}, QUANTIZATION_LINES)
        tables.append(Table("The seed's quantization claims, measured here", claims.frame, claims.notes[:2]))
    return tables
