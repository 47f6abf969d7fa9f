"""results/README.md, the page a reader lands on: one row per optimization and backend (is it exact, what it buys,
on which model and machine), then the seed's quoted figures beside the figures measured here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from harness.report import (Table, distinct_checks, exactness_figures, format_error, format_percent, format_ratio,
                            is_missing, latest, per_machine, provenance)
from harness.tables.speculative import greedy_batch1

NA = "n/a"


def _passed(frame: pd.DataFrame, suite: str, function: str) -> pd.DataFrame:
    return frame[(frame["suite"] == suite) & (frame["function"] == function) & (frame["outcome"] == "passed")]


def _why_not(frame: pd.DataFrame, suite: str, function: str, backend: str) -> str:
    """Why a measurement is absent: the skip reason the records give, else that it was not run."""
    rows = frame[(frame["suite"] == suite) & (frame["function"] == function) & (frame["backend"] == backend)]
    reasons = rows["reason"].dropna().unique() if "reason" in rows else []
    if len(reasons):
        return f"{NA} ({reasons[0]})"
    return f"{NA} (no {function} records for {backend}: run suites/test_{suite}.py -m bench)"


# --- what each optimization buys, from the bench records -------------------------------------------------------
# Each returns (figure, measured on) for one backend (and strategy) from all records.


def cache_speedup(frame: pd.DataFrame, backend: str, strategy: str) -> tuple[str, str]:
    """Recompute time over cached time for the largest number of new tokens measured in both modes."""
    bench = _passed(frame, "kv_cache", "test_decode_time_cache_vs_recompute")
    bench = bench[bench["backend"] == backend]
    if not len(bench):
        return _why_not(frame, "kv_cache", "test_decode_time_cache_vs_recompute", backend), NA
    times = bench.pivot_table(index="param.n_new", columns="param.mode", values="metric.median_s").dropna()
    n = times.index.max()
    speedup = times.loc[n, "recompute"] / times.loc[n, "cached"]
    return (f"{format_ratio(speedup)} faster than recomputing, {int(n)} new tokens",
            f"{bench['model'].iloc[0]}, fp32")


def attention_timings(frame: pd.DataFrame) -> pd.DataFrame:
    """The attention benchmarks at the smallest batch, the latest run of each implementation and N."""
    bench = _passed(frame, "flash_attention", "test_attention_time_and_memory")
    if not len(bench):
        return bench
    bench = bench[bench["param.batch"] == bench["param.batch"].min()]
    return latest(bench, ["backend", "attention", "param.seq_len"])


def attention_speedup(frame: pd.DataFrame, backend: str, attention: str) -> tuple[str, str]:
    """Naive attention's time and extra memory over this implementation's, at the longest N, smallest batch."""
    function = "test_attention_time_and_memory"
    bench = attention_timings(frame)
    bench = bench[bench["backend"] == backend]
    if not len(bench):
        return _why_not(frame, "flash_attention", function, backend), NA
    wide = bench.pivot_table(index="param.seq_len", columns="attention",
                             values=["metric.median_s", "metric.extra_peak_bytes"])
    if attention not in wide["metric.median_s"] or "naive" not in wide["metric.median_s"]:
        return f"{NA} (no timing of {attention} beside naive)", NA
    times = wide["metric.median_s"][["naive", attention]].dropna()
    n = times.index.max()
    figure = f"{format_ratio(times.loc[n, 'naive'] / times.loc[n, attention])} faster than naive"
    memory = wide["metric.extra_peak_bytes"].get(attention, pd.Series(dtype=float)).get(n)
    naive_memory = wide["metric.extra_peak_bytes"]["naive"].get(n)
    if memory and naive_memory and memory > 0:
        figure += f", {format_ratio(naive_memory / memory)} less extra memory"
    first = bench.iloc[0]
    return (f"{figure}, N={int(n)}, batch {int(first['param.batch'])}",
            f"attention alone: {int(first['param.heads'])} heads of dim {int(first['param.head_dim'])}, fp32")


def speculative_speedup(frame: pd.DataFrame, backend: str, strategy: str) -> tuple[str, str]:
    """The best speedup over the target alone, with the draft, k and acceptance that gave it."""
    bench = greedy_batch1(frame[frame["suite"] == "speculative"])
    bench = bench[bench["backend"] == backend]
    if not len(bench):
        return _why_not(frame, "speculative", "test_speedup", backend), NA
    best = bench.loc[bench["metric.speedup"].idxmax()]
    draft = best["param.draft"] + (f" ({best['param.draft_model']})" if not is_missing(best.get("param.draft_model"))
                                   else "")
    return (f"{format_ratio(best['metric.speedup'])} tokens/s of the target alone (best: {draft} draft, "
            f"k={int(best['param.k'])}, acceptance {format_percent(best['metric.acceptance_rate'])})",
            f"{best['model']}, greedy, batch 1")


def _speed(frame: pd.DataFrame, backend: str, quant: str) -> pd.DataFrame:
    bench = _passed(frame, "backend_speed", "test_tokens_per_second")
    bench = bench[(bench["backend"] == backend) & (bench["quant"] == quant)]
    return bench.set_index(["param.phase", "param.batch"])["metric.ratio_to_torch_fp32"] if len(bench) else None


def backend_speedup(frame: pd.DataFrame, backend: str, strategy: str) -> tuple[str, str]:
    """This backend's fp32 tokens/s over torch fp32's, measured side by side, batch 1."""
    ratios = _speed(frame, backend, "fp32")
    if ratios is None:
        return _why_not(frame, "backend_speed", "test_tokens_per_second", backend), NA
    batch = min(b for _, b in ratios.index)
    return (f"decode {format_ratio(ratios[('decode', batch)])}, prefill {format_ratio(ratios[('prefill', batch)])} "
            f"torch's tokens/s (fp32, batch {int(batch)})", _speed_model(frame))


def _speed_model(frame: pd.DataFrame) -> str:
    return str(_passed(frame, "backend_speed", "test_tokens_per_second")["model"].iloc[0])


def speed_gain(frame: pd.DataFrame, backend: str, quant: str) -> pd.Series | None:
    """Tokens/s of a strategy over the same backend's fp32, per (phase, batch): the quotient of the two ratios to
    torch fp32, each measured side by side with it."""
    ratios, baseline = _speed(frame, backend, quant), _speed(frame, backend, "fp32")
    if ratios is None or baseline is None:
        return None
    return (ratios / baseline).dropna()


def quantization_gain(frame: pd.DataFrame, backend: str, quant: str) -> tuple[str, str]:
    """Decode tokens/s over the same backend's fp32 (batch 1), and the exported file's size against fp32's."""
    gain = speed_gain(frame, backend, quant)
    if gain is None:
        return _why_not(frame, "backend_speed", "test_tokens_per_second", backend), NA
    batch = min(b for _, b in gain.index)
    figure = f"decode {format_ratio(gain[('decode', batch)])} {backend} fp32's tokens/s (batch {int(batch)})"
    export = _passed(frame, "onnx_export", "test_export_then_cache_hit")
    sizes = export[export["backend"] == backend].set_index("quant")["metric.file_mb"]
    if quant in sizes and "fp32" in sizes:
        figure += f"; file {format_ratio(sizes['fp32'] / sizes[quant])} smaller"
    return figure, _speed_model(frame)


def nothing_bought(frame: pd.DataFrame, backend: str, strategy: str) -> tuple[str, str]:
    return f"{NA} (a correctness check: nothing to buy)", NA


# --- the optimizations -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Optimization:
    name: str
    pages: tuple[str, ...]  # the suite pages that show its checks and figures
    select: Callable[[pd.DataFrame], pd.DataFrame]  # its exactness checks among every record
    by: str  # the strategy column that makes a row beside the backend, or "" for one row per backend
    buys: Callable[[pd.DataFrame, str, str], tuple[str, str]]


def _suite(name: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda checks: checks[checks["suite"] == name]


def _attention(checks: pd.DataFrame) -> pd.DataFrame:
    checks = checks[checks["suite"] == "flash_attention"].copy()
    if not len(checks):
        return checks
    # test_flash_block_sizes runs the torch flash kernel itself, at every tile size
    tiles = checks["function"] == "test_flash_block_sizes"
    checks.loc[tiles, "backend"], checks.loc[tiles, "attention"] = "torch", "flash"
    return checks[checks["attention"] != "naive"]  # naive is the plain path the others are judged against


def _quantized(checks: pd.DataFrame) -> pd.DataFrame:
    return checks[checks["quant"].notna() & (checks["quant"] != "fp32")]


OPTIMIZATIONS = (
    Optimization("KV cache", ("kv_cache",), _suite("kv_cache"), "", cache_speedup),
    Optimization("Attention kernel", ("flash_attention",), _attention, "attention", attention_speedup),
    Optimization("Speculative decoding", ("speculative",), _suite("speculative"), "", speculative_speedup),
    Optimization("Cross-backend (vs the torch reference)", ("cross_backend", "backend_speed"),
                 _suite("cross_backend"), "", backend_speedup),
    Optimization("Cross-implementation (vs transformers)", ("cross_implementation",), _suite("cross_implementation"),
                 "",
                 nothing_bought),
    Optimization("Quantization", ("backend_speed", "onnx_export", "cross_backend", "kv_cache"), _quantized, "quant",
                 quantization_gain),
)


def ran(figures: dict) -> int:
    return figures["passed"] + figures["failed"] + figures["xpassed"]


def exact_cell(figures: dict) -> str:
    judged = ran(figures)
    if not judged:
        return f"{NA} (skipped: {figures['main_skip_reason'] or 'no check ran'})"
    verdict = "yes" if not figures["failed"] and not figures["xpassed"] else "NO"
    text = f"{verdict}: {figures['passed']}/{judged} passed"
    if figures["skipped"]:
        text += f", {figures['skipped']} n/a"
    if figures["xfailed"]:
        text += f", {figures['xfailed']} xfail (documented deviation)"
    return text


def worst_cell(figures: dict) -> str:
    if not ran(figures):
        return f"{NA} (no check ran)"
    if not is_missing(figures["worst_ratio"]):
        return f"error ratio {format_ratio(figures['worst_ratio'])} (limit {figures['ratio_limit']:g})"
    if not is_missing(figures["max_error"]):
        return f"max abs error {format_error(figures['max_error'])}"
    if not is_missing(figures["min_pvalue"]):
        return f"smallest p-value {format_error(figures['min_pvalue'])} (limit 1e-4)"
    return f"{NA} (token equality; no error figure recorded)"


def headline_rows(frame: pd.DataFrame, pages: set[str]) -> pd.DataFrame:
    checks_all = distinct_checks(frame[frame["tier"] == "exactness"])
    rows = []
    for machine, on_machine in frame.groupby("machine", sort=True):
        checks_machine = checks_all[checks_all["machine"] == machine]
        for opt in OPTIMIZATIONS:
            checks = opt.select(checks_machine)
            keys = ["backend"] + ([opt.by] if opt.by else [])
            for key, group in checks.groupby(keys, sort=True):
                backend, strategy = (key[0], key[1]) if opt.by else (key[0], "")
                figures = exactness_figures(group)
                bought, measured_on = opt.buys(on_machine, backend, strategy)
                if not ran(figures):
                    bought, measured_on = f"{NA} (no check ran)", NA
                rows.append({
                    "machine": machine, "optimization": opt.name, "backend": backend, "strategy": strategy or "-",
                    "exact? (passed/run)": exact_cell(figures), "worst against its oracle": worst_cell(figures),
                    "what it buys": bought, "measured on": measured_on,
                    "details": ", ".join(f"[{page}]({page}.md)" for page in opt.pages if page in pages) or NA,
                })
    columns = ["machine", "optimization", "backend", "strategy", "exact? (passed/run)", "worst against its oracle",
               "what it buys", "measured on", "details"]
    table = pd.DataFrame(rows, columns=columns)
    keys = ["optimization", "backend", "strategy"]
    return per_machine(table, keys, [c for c in table.columns if c not in keys + ["machine"]])


HEADLINE_NOTES = [
    "exact?: the optimization's exactness checks (every model, strategy and parameter in its suite) that ran; "
    "n/a: skipped for the reason given; xfail: a documented deviation (see the page). worst against its oracle: "
    "the largest error ratio (the path's error over the plain path's error against a high-precision "
    "oracle; the rule is at most 2), else the largest absolute difference from the oracle, else the smallest "
    "p-value of the sampler's chi-square tests.",
    "what it buys: a ratio measured side by side in one run (medians of repeats after a warm-up), on the "
    "machine named above; Quantization compares with the same backend's fp32.",
]


def readme(frame: pd.DataFrame, pages: set[str]) -> str:
    from .seed_claims import claims_table

    frame = frame.reindex(columns=frame.columns.union(["quant", "attention", "reason"], sort=False))  # absent if unused
    headline = Table("Headline: is each optimization exact, and what does it buy?", headline_rows(frame, pages),
                     HEADLINE_NOTES, reproduce="python -m harness run")
    claims = claims_table(frame, pages)
    links = " · ".join(f"[{page}]({page}.md)" for page in sorted(pages | {"kv_calc"}))
    return (f"# exactbench results\n\nGenerated from the records (results/records/) by `python -m harness report` "
            f"({provenance(frame)}). Every figure below is computed from those records (or, for real models' "
            f"memory, by harness/kv_calc.py); the suite pages hold the full tables: {links}.\n\n"
            + headline.markdown() + "\n" + claims.markdown())
