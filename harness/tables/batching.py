"""Batching tables: serving metrics per strategy over a request-rate sweep (and a throughput-latency plot),
concurrency at a fixed KV budget, the prefix-sharing sweep, parallel sampling's shared blocks, KV waste and
throughput by block size, and the issue's goals beside the measured figures."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from harness.plots import figure, label
from harness.report import Table, table

ORDER = ["sequential", "static", "continuous", "paged", "paged-prefix"]
SERVING_COLUMNS = {
    "param.batching": "batching",
    "param.rate": "rate (req/s)",
    "metric.request_throughput": "req/s",
    "metric.output_throughput": "output tok/s",
    "metric.goodput": "goodput (req/s)",
    "metric.slo_met_pct": "SLO met %",
    "metric.ttft_mean_ms": "TTFT mean",
    "metric.ttft_p50_ms": "TTFT p50",
    "metric.ttft_p99_ms": "TTFT p99",
    "metric.tpot_mean_ms": "TPOT mean",
    "metric.tpot_p99_ms": "TPOT p99",
    "metric.itl_p99_ms": "ITL p99",
    "metric.e2el_mean_ms": "E2EL mean",
    "metric.e2el_p99_ms": "E2EL p99",
    "metric.kv_waste_pct": "KV waste %",
    "metric.preemptions": "preemptions",
    "metric.max_running": "max running",
}
UNITS = ("Latencies in ms (vLLM's definitions: TTFT to the first token, TPOT = (E2EL - TTFT)/(n_out - 1), ITL every "
         "gap, E2EL arrival to last token); throughputs count generated tokens over the run's duration. KV waste: "
         "reserved slots holding no token, over all steps. Idle time before an arrival is skipped, not slept.")


def arrivals(row: pd.Series) -> str:
    """How the row's requests arrived: gamma with the recorded burstiness (records before --burstiness: Poisson)."""
    burstiness = row.get("param.burstiness")
    if burstiness is None or pd.isna(burstiness) or burstiness == 1:
        return "Poisson arrivals (gamma, burstiness 1)"
    return f"gamma arrivals of burstiness {burstiness:g} (1 = Poisson; below 1 burstier)"


def slo_note(row: pd.Series) -> str:
    slo = row.get("param.slo")
    if slo is None or pd.isna(slo):
        return "Goodput: n/a (recorded before --slo)."
    return (f"Goodput (vLLM's --goodput): requests per second meeting every objective of the SLO {slo} (milliseconds; "
            "set with --slo NAME:MS); SLO met %: the share of requests that did.")


def passed(frame: pd.DataFrame, function: str) -> pd.DataFrame:
    return frame[(frame["function"] == function) & (frame["outcome"] == "passed")]


def by_strategy(rows: pd.DataFrame, column: str = "batching") -> pd.DataFrame:
    rank = rows[column].map({name: i for i, name in enumerate(ORDER)})
    return rows.assign(_rank=rank).sort_values(["_rank"] + [c for c in rows if c == "rate (req/s)"]).drop(columns="_rank")


def _plot(rows: pd.DataFrame, title: str, path: Path) -> None:
    with figure(path, figsize=(6.5, 4)) as (_, ax):
        for index, (batching, group) in enumerate(by_strategy(rows).groupby("batching", sort=False)):
            ax.plot(group["output tok/s"], group["E2EL mean"], marker="o", color=f"C{index}", label=batching)
        label(ax, "output tokens/s", "mean end-to-end latency (ms)", title)


@table("batching")
def serving(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    bench = passed(frame, "test_serving")
    if not len(bench):
        return []
    tables = []
    for (backend, model, profile), group in bench.groupby(["backend", "model", "param.profile"]):
        rows = by_strategy(group.reindex(columns=list(SERVING_COLUMNS)).rename(columns=SERVING_COLUMNS))
        static = rows[rows["batching"] == "static"].set_index("rate (req/s)")["req/s"]
        rows.insert(3, "x static", rows["req/s"] / rows["rate (req/s)"].map(static))
        plot = f"batching_{backend}_{model}_{profile}.png"
        _plot(rows, f"{backend}, {model}, {profile} profile: one point per request rate", results_dir / plot)
        first = group.iloc[0]
        notes = [f"{int(first['param.requests'])} requests, {arrivals(first)} at each rate (inf: all at once), "
                 f"the same KV budget of {int(first['param.kv_tokens'])} tokens and at most "
                 f"{int(first['param.max_batch'])} running for every strategy. 'x static': request throughput over "
                 "static batching's at the same rate.", slo_note(first), UNITS]
        tables.append(Table(f"Serving: {backend}, {model}, {profile} profile", rows.reset_index(drop=True), notes, plot))
    return tables


@table("batching")
def concurrency(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    bench = passed(frame, "test_concurrency_at_a_fixed_kv_budget")
    if not len(bench):
        return []
    columns = {"backend": "backend", "model": "model", "param.batching": "batching", "param.kv_tokens": "KV tokens",
               "metric.max_running": "max running", "metric.kv_waste_pct": "KV waste %",
               "metric.preemptions": "preemptions", "metric.output_throughput": "output tok/s"}
    rows = by_strategy(bench.reindex(columns=list(columns)).rename(columns=columns))
    notes = ["48 requests of 64 prompt + 32 output tokens, all at once, no cap on running sequences: how many "
             "sequences the same KV budget holds at once. continuous reserves the model's maximum length per "
             "sequence; the paged strategies take blocks as tokens arrive and preempt (recompute) when the pool "
             "runs out."]
    return [Table("Concurrent sequences at a fixed KV budget", rows.reset_index(drop=True), notes)]


@table("batching")
def prefix_sharing(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    bench = passed(frame, "test_prefix_sharing")
    if not len(bench):
        return []
    columns = {"backend": "backend", "model": "model", "param.sharing": "sharing",
               "metric.shared_prefix_skipped_pct": "shared prefix skipped %",
               "metric.prefix_tokens_skipped": "prefill tokens skipped",
               "metric.ttft_mean_ms_uncached": "TTFT mean, paged", "metric.ttft_mean_ms": "TTFT mean, paged-prefix",
               "metric.ttft_cut_pct": "TTFT cut %"}
    rows = bench.reindex(columns=list(columns)).rename(columns=columns).sort_values(["backend", "model", "sharing"])
    first = bench.iloc[0]
    notes = [f"A {int(first['param.shared_prefix'])}-token system prompt starts the prompts of the given fraction "
             f"of 32 requests ({arrivals(first)}, {first['param.rate']:g} req/s); paged and paged-prefix serve the "
             "same requests side by side. Skipped %: of the shared prefix of the requests that carry it (a request "
             "admitted before the prefix was computed cannot hit)."]
    return [Table("Prefix caching: prefill skipped and TTFT by sharing", rows.reset_index(drop=True), notes)]


@table("batching")
def parallel_sampling(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    bench = passed(frame, "test_parallel_sampling")
    if not len(bench):
        return []
    columns = {"backend": "backend", "model": "model", "param.batching": "batching",
               "metric.peak_blocks_held": "peak blocks, shared", "metric.peak_blocks_held_unshared": "peak blocks, separate",
               "metric.blocks_saved_pct": "blocks saved %", "metric.copies_on_write": "copies on write",
               "metric.output_throughput": "output tok/s, shared",
               "metric.output_throughput_unshared": "output tok/s, separate",
               "metric.output_throughput_ratio": "x separate"}
    rows = by_strategy(bench.reindex(columns=list(columns)).rename(columns=columns))
    first = bench.iloc[0]
    notes = [f"{int(first['param.requests'])} heavy-tailed requests of {int(first['param.samples'])} samples each "
             "(temperature 1), all at once, at most "
             f"{int(first['param.max_batch'])} sequences running: the samples of a request share its prompt's blocks, "
             "the last partial one until each sample's first write (copy-on-write, PagedAttention's parallel "
             "sampling), against the same samples sent as requests of their own (their tokens checked equal). Peak "
             "blocks: the most pool blocks held at once, a shared block counted once. Under paged-prefix the separate "
             "requests share their prompts' full blocks through the prefix cache too. Throughputs: medians of "
             "alternate runs; 'x separate' the median ratio."]
    return [Table("Parallel sampling: KV blocks with and without sharing", rows.reset_index(drop=True), notes)]


@table("batching")
def block_sizes(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    bench = passed(frame, "test_block_size_sweep")
    if not len(bench):
        return []
    columns = {"backend": "backend", "model": "model", "param.block_size": "block size",
               "metric.kv_waste_pct": "KV waste %", "metric.peak_blocks_held": "peak blocks",
               "metric.output_throughput": "output tok/s", "metric.output_throughput_ratio": "x block 16"}
    rows = bench.reindex(columns=list(columns)).rename(columns=columns).sort_values(["backend", "model", "block size"])
    notes = [f"paged, {int(bench.iloc[0]['param.requests'])} heavy-tailed requests all at once (the KV-waste goal's "
             "run). KV waste is internal fragmentation (vLLM's definition): reserved slots holding no token, over all "
             "steps; only a sequence's last block is partly empty, so it is about half a block over the mean tokens a "
             "sequence holds, small for the paper's long ShareGPT sequences, larger for these short ones (prompts "
             "16-96 tokens, outputs of median 12). 'x block 16': output throughput over the default block size's, "
             "median of alternate runs in one test."]
    return [Table("KV waste and throughput by block size", rows.reset_index(drop=True), notes)]


def _metric(frame: pd.DataFrame, function: str, metric: str, **params) -> float:
    rows = passed(frame, function)
    for name, value in params.items():
        column = f"param.{name}"
        if column not in rows:
            return math.nan
        rows = rows[rows[column] == value]
    return float(rows[f"metric.{metric}"].iloc[0]) if len(rows) and f"metric.{metric}" in rows else math.nan


@table("batching")
def goals(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    """The issue's goals and the seed's claims, each beside the figure measured in this run."""
    rows = []
    for (backend, model), group in frame.groupby(["backend", "model"]):
        heavy = dict(function="test_serving", profile="heavy-tailed", rate=math.inf)
        ratio = (_metric(group, metric="request_throughput", batching="continuous", **heavy)
                 / _metric(group, metric="request_throughput", batching="static", **heavy))
        waste = _metric(group, metric="kv_waste_pct", batching="paged", **heavy)
        contiguous_waste = _metric(group, metric="kv_waste_pct", batching="continuous", **heavy)
        users = (_metric(group, "test_concurrency_at_a_fixed_kv_budget", "max_running", batching="paged")
                 / _metric(group, "test_concurrency_at_a_fixed_kv_budget", "max_running", batching="continuous"))
        skipped = _metric(group, "test_prefix_sharing", "shared_prefix_skipped_pct", sharing=0.75)
        ttft_cut = _metric(group, "test_prefix_sharing", "ttft_cut_pct", sharing=0.75)
        checks = [
            ("continuous / static request throughput, heavy-tailed, all at once", ratio, ">= 2x", ratio >= 2,
             "continuous batching 2-5x throughput", f"{ratio:.2f}x"),
            ("paged KV waste, heavy-tailed, all at once", waste, "<= 4%", waste <= 4,
             f"(continuous wastes {contiguous_waste:.1f}%)", f"{waste:.1f}%"),
            ("paged / continuous concurrent sequences at the same KV budget", users, ">= 2x", users >= 2,
             "PagedAttention 2-4x more users", f"{users:.2f}x"),
            ("shared prefix skipped at 75% sharing", skipped, ">= 90%", skipped >= 90,
             "prompt caching saves 50-90% of input", f"{skipped:.1f}%"),
            ("mean TTFT cut by prefix caching at 75% sharing", ttft_cut, ">= 50%", ttft_cut >= 50, "", f"{ttft_cut:.1f}%"),
        ]
        for goal, value, target, met, claim, shown in checks:
            if math.isnan(value):
                continue
            rows.append({"backend": backend, "model": model, "goal": goal, "target": target, "measured": shown,
                         "verdict": "met" if met else "not met", "seed's claim": claim})
    if not rows:
        return []
    notes = ["Goals from issue 11, each measured side by side in one run; 'not met' is reported as measured."]
    return [Table("Goals and claims against the measurements", pd.DataFrame(rows), notes)]
