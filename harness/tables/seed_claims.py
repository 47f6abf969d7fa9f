"""The seed document's quoted figures that the harness measures, each beside the figure measured here (from the
records, or from harness/kv_calc.py for real models' memory) and a verdict: holds, corrected (the seed's
arithmetic or facts are wrong; the right figure is given), or does not hold here (measured on this machine)."""
from __future__ import annotations

import pandas as pd

from harness import kv_calc
from harness.plots import growth_exponent
from harness.tables.headline import attention_timings, speed_gain
from harness.report import (Table, distinct_checks, exactness_figures, format_number, format_percent, format_ratio,
                            is_missing)
from harness.tables.speculative import greedy_batch1

HOLDS, CORRECTED, NOT_HERE = "holds", "corrected", "does not hold here"
CONSTANT_PER_TOKEN = 1.5  # "roughly constant": the slowest per-token time within 1.5x the fastest
LINEAR, QUADRATIC = 1.25, 1.5  # growth exponents read as O(N) (at most) and O(N^2)-like (at least)
SIZE_TOLERANCE = 0.1  # a compression factor holds within 10% of the quoted one
MINIMAL_LOSS_TOP1 = 0.98  # "minimal quality loss": at least 98% same top-1 as fp32 (issue 12's goal)
SLIGHT_PPL_INCREASE = 0.05  # "slight degradation": perplexity at most 5% above fp32's
INT4_70B_GB, INT4_70B_MODELS = 35, ("llama-2-70b", "llama-3-70b")


def _passed(frame: pd.DataFrame, suite: str, function: str) -> pd.DataFrame:
    return frame[(frame["suite"] == suite) & (frame["function"] == function) & (frame["outcome"] == "passed")]


def _missing(suite: str, function: str) -> tuple[str, str]:
    return f"n/a (no passed {function} records: run suites/test_{suite}.py)", "n/a"


def _row(line, quote: str, page: str, measured: str, verdict: str) -> dict:
    return {"seed line": str(line), "the seed says": quote, "measured here": measured, "verdict": verdict,
            "shown in": page}


def cache_growth(frame: pd.DataFrame) -> tuple[str, str]:
    bench = _passed(frame, "kv_cache", "test_decode_time_cache_vs_recompute")
    if not len(bench):
        return _missing("kv_cache", "test_decode_time_cache_vs_recompute")
    parts, holds = [], True
    for backend, group in bench.groupby("backend", sort=True):
        times = group.pivot_table(index="param.n_new", columns="param.mode", values="metric.median_s").dropna()
        cached, recompute = (growth_exponent(times.index, times[mode]) for mode in ("cached", "recompute"))
        holds &= cached <= LINEAR and recompute >= QUADRATIC
        parts.append(f"{backend}: total time grows as N^{cached:.2f} cached, N^{recompute:.2f} recomputing "
                     f"(N = {int(times.index.min())}..{int(times.index.max())} new tokens)")
    return "; ".join(parts), HOLDS if holds else NOT_HERE


def constant_decode(frame: pd.DataFrame) -> tuple[str, str]:
    bench = _passed(frame, "kv_cache", "test_decode_time_cache_vs_recompute")
    if len(bench):
        bench = bench[bench["param.mode"] == "cached"]
    if not len(bench):
        return _missing("kv_cache", "test_decode_time_cache_vs_recompute")
    parts, holds = [], True
    for backend, group in bench.groupby("backend", sort=True):
        per_token = group["metric.median_s"] / group["param.n_new"] * 1e3
        holds &= per_token.max() <= CONSTANT_PER_TOKEN * per_token.min()
        parts.append(f"{backend}: {per_token.min():.2f} to {per_token.max():.2f} ms per cached token over "
                     f"N = {int(group['param.n_new'].min())}..{int(group['param.n_new'].max())}")
    return "; ".join(parts), HOLDS if holds else NOT_HERE


def compression(quants: tuple[str, ...], claimed: float):
    def measure(frame: pd.DataFrame) -> tuple[str, str]:
        export = _passed(frame, "onnx_export", "test_export_then_cache_hit")
        sizes = export.set_index("quant")["metric.file_mb"] if len(export) else pd.Series(dtype=float)
        present = [q for q in quants if q in sizes]
        if "fp32" not in sizes or not present:
            return _missing("onnx_export", "test_export_then_cache_hit")
        factors = {q: sizes["fp32"] / sizes[q] for q in present}
        holds = all(abs(f / claimed - 1) <= SIZE_TOLERANCE for f in factors.values())
        text = ", ".join(f"{q} {format_ratio(f)}" for q, f in factors.items())
        return (f"exported ONNX file of {export['model'].iloc[0]} vs fp32: {text}", HOLDS if holds else NOT_HERE)
    return measure


def verdict(reached: dict[str, bool]) -> str:
    """holds where every case reaches the claim, does not hold where none does, else the cases that do."""
    if all(reached.values()):
        return HOLDS
    if not any(reached.values()):
        return NOT_HERE
    return "holds only for " + ", ".join(case for case, ok in reached.items() if ok)


def int4_gains(frame: pd.DataFrame) -> dict[tuple[str, str], pd.Series]:
    """Tokens/s of each int4 strategy over the same backend's fp32 per (phase, batch): the quantization suite's
    side-by-side ratio where it ran, else backend_speed's (two ratios to torch fp32)."""
    direct = _passed(frame, "quantization", "test_speed_against_fp32")
    if len(direct):
        direct = direct[direct["quant"].str.startswith("int4")]
        return {key: group.set_index(["param.phase", "param.batch"])["metric.ratio_to_fp32"]
                for key, group in direct.groupby(["backend", "quant"], sort=True)}
    bench = _passed(frame, "backend_speed", "test_tokens_per_second")
    return {(b, q): speed_gain(frame, b, q)
            for b, q in sorted({(b, q) for b, q in zip(bench["backend"], bench["quant"]) if q.startswith("int4")})}


def int4_throughput(frame: pd.DataFrame) -> tuple[str, str]:
    parts, reached = [], {}
    for (backend, quant), gain in int4_gains(frame).items():
        order = sorted(gain.items(), key=lambda item: (item[0][0] != "decode", item[0][1]))
        parts.append(f"{backend} {quant}: " + ", ".join(f"{phase} b{int(batch)} {format_ratio(value)}"
                                                      for (phase, batch), value in order))
        for (phase, batch), value in order:
            case = f"{backend} {phase} batch {int(batch)}"
            reached[case] = reached.get(case, True) and value >= 2
    if not parts:
        return _missing("quantization", "test_speed_against_fp32")
    return "tokens/s over the same backend's fp32 (bN: batch N): " + "; ".join(parts), verdict(reached)


def _quality(frame: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """The quantization suite's quality records of the weight formats whose name starts with `prefix`."""
    quality = _passed(frame, "quantization", "test_quality_against_fp32")
    quant = quality["quant"].astype(str)  # an empty selection has no string dtype
    return quality[quant.str.startswith(prefix) & ~quant.str.endswith("-kv")]


def _quality_text(row) -> str:
    return (f"{row['backend']} {row['quant']}: same top-1 {format_percent(row['metric.same_top1'])}, mean KLD "
            f"{format_number(row['metric.mean_kld'])}, PPL {row['metric.delta_ppl'] / row['metric.base_ppl']:+.1%}")


def int8_quality(frame: pd.DataFrame) -> tuple[str, str]:
    quality = _quality(frame, "int8")
    if not len(quality):
        return _missing("quantization", "test_quality_against_fp32")
    reached = {f"{r['backend']} {r['quant']}": r["metric.same_top1"] >= MINIMAL_LOSS_TOP1 for _, r in quality.iterrows()}
    return "; ".join(_quality_text(r) for _, r in quality.iterrows()), verdict(reached)


def int4_quality(frame: pd.DataFrame) -> tuple[str, str]:
    quality = _quality(frame, "int4")
    if not len(quality):
        return _missing("quantization", "test_quality_against_fp32")
    reached = {f"{r['backend']} {r['quant']}": r["metric.delta_ppl"] <= SLIGHT_PPL_INCREASE * r["metric.base_ppl"]
               for _, r in quality.iterrows()}
    return "; ".join(_quality_text(r) for _, r in quality.iterrows()), verdict(reached)


def int4_70b_at_measured_bits(frame: pd.DataFrame) -> tuple[str, str]:
    """The seed's ~35 GB for a 70B model at INT4, at the bits per weight stored here (scales included)."""
    memory = _passed(frame, "quantization", "test_memory")
    if len(memory) and "metric.bits_per_weight" in memory:
        memory = memory[memory["quant"].str.startswith("int4")].dropna(subset=["metric.bits_per_weight"])
    if not len(memory):
        return _missing("quantization", "test_memory")
    bits = memory.groupby("quant")["metric.bits_per_weight"].first()
    params = {name: kv_calc.param_count(kv_calc.NAMED[name]) for name in INT4_70B_MODELS}
    sizes = {(name, quant): n * b / 8 / 1e9 for name, n in params.items() for quant, b in bits.items()}
    reached = {f"{name} {quant}": abs(gb / INT4_70B_GB - 1) <= kv_calc.APPROX for (name, quant), gb in sizes.items()}
    text = "; ".join(f"{name} {quant} ({b:.3g} bits/weight stored here): {gb:.1f} GB"
                     for (name, quant), gb in sizes.items() for b in [bits[quant]])
    return "weights at the bits per weight stored here, scales included: " + text, verdict(reached)


def speculative_speed(frame: pd.DataFrame) -> tuple[str, str]:
    bench = greedy_batch1(frame[frame["suite"] == "speculative"])
    if not len(bench):
        return _missing("speculative", "test_speedup")
    parts, reached = [], {}
    for (backend, draft), group in bench.groupby(["backend", "param.draft"], sort=True):
        best = group.loc[group["metric.speedup"].idxmax()]
        case = f"{backend} {draft}"
        parts.append(f"{case} {format_ratio(best['metric.speedup'])} (k={int(best['param.k'])})")
        reached[case] = best["metric.speedup"] >= 2
    low, high = bench["metric.acceptance_rate"].min(), bench["metric.acceptance_rate"].max()
    return (f"best speedup over the target alone per backend and draft: {'; '.join(parts)}. Acceptance here "
            f"{format_percent(low)} to {format_percent(high)}, not ~70%", verdict(reached))


def exactness(select):
    def measure(frame: pd.DataFrame) -> tuple[str, str]:
        checks = select(distinct_checks(frame[frame["tier"] == "exactness"]))
        if not len(checks):
            return "n/a (no exactness records)", "n/a"
        f = exactness_figures(checks)
        text = f"{f['passed']}/{f['passed'] + f['failed']} checks passed"
        if not is_missing(f["worst_ratio"]):
            text += (f"; worst error ratio {format_ratio(f['worst_ratio'])} against the plain path "
                     "(limit 2, not bitwise)")
        return text, HOLDS if not f["failed"] else NOT_HERE
    return measure


def flash_speed(frame: pd.DataFrame) -> tuple[str, str]:
    bench = attention_timings(frame)
    times = bench.pivot_table(index="param.seq_len", columns="attention", values="metric.median_s") \
        if len(bench) else None
    if times is None or not {"naive", "flash"} <= set(times.columns):
        return _missing("flash_attention", "test_attention_time_and_memory")
    speedup = (times["naive"] / times["flash"]).dropna()
    text = ", ".join(f"{format_ratio(s)} at N={int(n)}" for n, s in speedup.items())
    text = f"flash (torch kernel) vs naive, batch {int(bench['param.batch'].min())}: {text}"
    return text, verdict({f"N={int(n)}": s >= 2 for n, s in speedup.items()})


def distillation(frame: pd.DataFrame) -> tuple[str, str]:
    quality = _passed(frame, "model_quality", "test_heldout_quality").drop_duplicates("model").set_index("model")
    if not {"default-draft", "default-draft-nodistill"} <= set(quality.index):
        return _missing("model_quality", "test_heldout_quality")
    soft, hard = quality.loc["default-draft"], quality.loc["default-draft-nodistill"]
    gap = soft["metric.same_top1"] - hard["metric.same_top1"]
    margin = 2 * (soft["metric.same_top1_err"] ** 2 + hard["metric.same_top1_err"] ** 2) ** 0.5
    text = (f"same top-1 as the target: {format_percent(soft['metric.same_top1'])} (soft labels, default-draft) vs "
            f"{format_percent(hard['metric.same_top1'])} (hard labels, same size); held-out PPL "
            f"{soft['metric.ppl']:.1f} vs {hard['metric.ppl']:.1f}")
    return text, HOLDS if gap > margin else NOT_HERE


MEASURED = (
    ("94, 102", "Total K,V computations: O(N^2) [without a cache] ... O(N) [with it]", "kv_cache", cache_growth),
    (133, "[Decode] Latency is roughly constant per token", "kv_cache", constant_decode),
    (337, "FP16: 16 bits per parameter (2x compression, ~same quality)", "onnx_export", compression(("fp16",), 2)),
    (339, "INT8 (8-bit): 8 bits per parameter (4x compression, ...)", "onnx_export",
     compression(("int8-dynamic",), 4)),
    (340, "INT4 (4-bit): 4 bits per parameter (8x compression, ...)", "onnx_export",
     compression(("int4-block32", "int4-block128"), 8)),
    (339, "INT8 (8-bit): 8 bits per parameter (4x compression, minimal quality loss)", "quantization", int8_quality),
    (355, "At INT4, it needs ~35GB", "quantization", int4_70b_at_measured_bits),
    (430, "Quantization (INT4) | Memory, compute | 2-4x throughput", "quantization", int4_throughput),
    (430, "Quantization (INT4) | ... | Slight degradation", "quantization", int4_quality),
    ("369, 431", "If draft model acceptance rate is ~70%, get ~2-3x throughput improvement", "speculative",
     speculative_speed),
    (431, "Speculative decoding | ... | None (exact)", "speculative",
     exactness(lambda c: c[c["suite"] == "speculative"])),
    (434, "FlashAttention | Compute, memory | 2-4x attention speed", "flash_attention", flash_speed),
    (434, "FlashAttention | ... | None (exact)", "flash_attention",
     exactness(lambda c: c[(c["suite"] == "flash_attention") & ((c["attention"] == "flash")
                                                                  | (c["function"] == "test_flash_block_sizes"))])),
    (649, "Soft label: student learns the FULL distribution -- much richer signal", "model_quality", distillation),
)


def calculator_rows() -> list[dict]:
    """The KV calculator's checks of the seed's memory figures, one row per quoted figure."""
    rows = []
    for (line, quote), group in kv_calc.claims_table().groupby(["seed line", "claim"], sort=False):
        values = "; ".join(f"{r['model']} {format_number(r['computed'])}"
                           + (f": {r['reason']}" if r["holds"] != "yes" else "") for _, r in group.iterrows())
        verdict = HOLDS if (group["holds"] == "yes").all() else CORRECTED
        rows.append(_row(line, quote, "kv_calc", f"{group['quantity'].iloc[0]}: {values}", verdict))
    return rows


QUANTIZATION_LINES = {"339", "354", "355", "430"}  # the quantization page's claims: weights' quality, size, speed


def claims_table(frame: pd.DataFrame, pages: set[str], lines: set[str] | None = None) -> Table:
    """Every claim (or those of the seed `lines` given) beside its measured figure and verdict."""
    def wanted(line) -> bool:
        return lines is None or str(line).split(",")[0] in lines

    rows = [row for row in calculator_rows() if wanted(row["seed line"])]
    for line, quote, page, measure in MEASURED:
        if wanted(line):
            measured, verdict = measure(frame)
            rows.append(_row(line, quote, page, measured, verdict))
    table = pd.DataFrame(rows)
    table["shown in"] = table["shown in"].map(lambda p: f"[{p}]({p}.md)" if p in pages | {"kv_calc"} else "n/a")
    table = table.sort_values("seed line", key=lambda s: s.str.split(",").str[0].astype(int), kind="stable")
    notes = [f"Seed: {kv_calc.SEED}; [...] marks words added for context. Verdicts: holds; corrected (the seed's "
             "arithmetic or facts are wrong, the right figure is beside it); does not hold here (measured on the "
             "machine named above; another machine may differ).",
             f"Rules: '~' memory figures hold within {kv_calc.APPROX:.0%}; growth exponents (fitted a + b*N^c) read "
             f"as O(N) at most {LINEAR} and O(N^2)-like at least {QUADRATIC}; 'roughly constant' within "
             f"{CONSTANT_PER_TOKEN}x; a compression factor within {SIZE_TOLERANCE:.0%}; a speedup claim holds "
             "where the measured speedup reaches its lower end; soft labels beat hard labels when the agreement gap "
             f"exceeds two standard errors; 'minimal quality loss' is at least {MINIMAL_LOSS_TOP1:.0%} same top-1 "
             f"as fp32, 'slight degradation' a perplexity at most {SLIGHT_PPL_INCREASE:.0%} above fp32's.",
             "Memory figures of real models: `python -m harness kv-calc --all --publish results`."]
    return Table("The seed's figures, measured here", table.reset_index(drop=True), notes,
                 reproduce="python -m harness run && python -m harness kv-calc --all --publish results")
