"""The published tables: number formats, the exactness summary's counts, parameters as columns, a column per
machine, the headline and the seed's claims computed from records, and no `nan` cell in any published page."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from harness.records import Record, load_all
from harness.report import (Table, exactness_summary, format_bytes, format_error, format_number, format_percent,
                            format_ratio, outcome_details, per_machine, records_frame, write_pages)

REPO = Path(__file__).resolve().parents[1]
MACHINE = {"id": "test-cpu x2"}


def make(test: str, outcome: str = "passed", *, suite: str = "kv_cache", tier: str = "exactness",
         backend: str | None = "torch", strategy=None, params=None, metrics=None, reason=None,
         machine=MACHINE, model: str = "default-target") -> Record:
    return Record(suite=suite, tier=tier, test=f"suites/test_{suite}.py::{test}", backend=backend, model=model,
                  strategy=strategy if strategy is not None else {"quant": "fp32"}, params=params or {},
                  outcome=outcome, metrics=metrics or {}, reason=reason, machine=machine, commit="abc1234")


@pytest.mark.parametrize("value, text", [(2.518e7, "25.2 MB"), (4.824e6, "4.82 MB"), (6144, "6.14 kB"), (512, "512 B"),
                                         (1.38e11, "138 GB")])
def test_bytes_are_printed_in_decimal_units(value, text):
    assert format_bytes(value) == text


@pytest.mark.parametrize("value, text", [(1.7, "1.7x"), (10.84, "10.8x"), (0.3443, "0.344x"), (285.2, "285x"),
                                         (1.0, "1x")])
def test_ratios_have_three_significant_figures_and_an_x(value, text):
    assert format_ratio(value) == text


@pytest.mark.parametrize("value, text", [(3.2e-6, "3.2e-6"), (1.27e-5, "1.3e-5"), (0.0, "0"), (0.059, "0.059"),
                                         (4.2, "4.2"), (math.inf, "inf")])
def test_errors_are_short(value, text):
    assert format_error(value) == text


@pytest.mark.parametrize("value, text", [(2.518e7, "25,180,000"), (3339.0, "3,339"), (0.5, "0.5"), (32.08, "32.1"),
                                         (2.5e-5, "2.5e-5"), ("rope", "rope")])
def test_other_numbers_never_print_an_exponent_above_1e_minus_3(value, text):
    assert format_number(value) == text


def test_percent():
    assert format_percent(0.815) == "81.5%" and format_percent(0.0012) == "0.12%"


def test_a_missing_cell_says_why_and_the_table_says_how_to_reproduce():
    frame = pd.DataFrame({"strategy": ["fp32", "int8"], "speedup": [1.7, math.nan], "size": [2.5e7, 6.3e6]})
    text = Table("Speed", frame, formats={"speedup": "ratio", "size": "bytes"},
                 missing="int8 was not timed (backend lacks int8 kernels)", reproduce="python -m harness run").markdown()
    assert "nan" not in text.lower()
    assert " n/a |" in text and "n/a: int8 was not timed (backend lacks int8 kernels)." in text
    assert "1.7x" in text and "25 MB" in text and "6.3 MB" in text
    assert "Reproduce: `python -m harness run`" in text


def test_a_table_without_missing_cells_has_no_missing_note():
    text = Table("T", pd.DataFrame({"a": [1.0]})).markdown()
    assert "n/a" not in text


def test_exactness_summary_counts_outcomes_and_keeps_the_worst_ratio():
    records = [
        make("test_a[1]", metrics={"ratio": 1.25, "optimized_error": 3e-6, "plain_error": 9.0}),
        make("test_a[2]", metrics={"ratio": math.inf}),  # an exact plain path: judged by a bound, not a ratio
        make("test_b[1]", "failed", metrics={"error_ratio": 2.5}),
        make("test_c[1]", "skipped", reason="backend torch lacks capability kv-cache"),
        make("test_d[1]", "xfailed", metrics={"ratio": 40.0}, reason="documented"),
        make("test_a[3]", backend="onnxrt", metrics={"ratio": 0.5}),
    ]
    checks = records_frame(records).dropna(axis=1, how="all")
    table = exactness_summary(checks, "kv_cache")
    rows = table.frame.set_index("backend")
    torch = rows.loc["torch"]
    assert (torch["checks"], torch["passed"], torch["failed"], torch["skipped (n/a)"], torch["xfail (documented)"]) \
        == (5, 2, 1, 1, 1)
    assert torch["worst error ratio"] == 2.5 and torch["its limit"] == 2  # the failure's, not the xfail's 40, not inf
    assert torch["max abs error"] == 3e-6  # the plain path's own error (9.0) is the yardstick, not a result
    assert torch["why skipped"] == "backend torch lacks capability kv-cache"
    assert rows.loc["onnxrt", "passed"] == 1 and rows.loc["onnxrt", "why skipped"] == "-"
    text = table.markdown()
    assert "2.5x" in text and "3e-6" in text and "nan" not in text.lower()
    assert "Reproduce: `python -m pytest suites/test_kv_cache.py -m exactness --backend onnxrt --backend torch" in text


def test_each_strategy_gets_its_own_summary_row_named_by_its_records():
    records = [make("test_a[torch-fp32]"),
               make("test_a[torch-int8-dynamic]", "failed", strategy={"quant": "int8-dynamic"}),
               make("test_h[torch-flash-bf16]", strategy={"attention": "flash"}, params={"dtype": "bf16"})]
    table = exactness_summary(records_frame(records).dropna(axis=1, how="all"), "kv_cache")
    rows = table.frame.set_index("strategy")
    assert sorted(rows.index) == ["bf16, flash", "fp32", "int8-dynamic"]
    assert (rows.loc["fp32", "passed"], rows.loc["int8-dynamic", "failed"], rows.loc["bf16, flash", "passed"]) \
        == (1, 1, 1)


def test_the_same_check_run_under_two_session_models_counts_once(tmp_path):
    kernel = [make("test_head_dims[torch-flash-64]", suite="flash_attention", model=model, strategy={"attention": "flash"},
                   metrics={"error_ratio": 1.2}) for model in ("default-target", "tiny-random")]
    model_level = [make("test_logits[torch-flash]", suite="flash_attention", model=model, strategy={"attention": "flash"},
                        metrics={"error_ratio": ratio}) for model, ratio in (("default-target", 1.1), ("other", 1.3))]
    write_pages(tmp_path, kernel + model_level)
    [summary_row] = [line for line in (tmp_path / "flash_attention.md").read_text().splitlines()
                     if line.startswith("| torch ")][:1]
    assert re.match(r"\| torch +\| flash +\| +3 \| +3 \|", summary_row), summary_row


def test_a_parameter_such_as_k_spreads_across_columns():
    records = [make(f"test_greedy[{draft}-{k}]", suite="speculative", params={"draft": draft, "k": k},
                    outcome="failed" if (draft, k) == ("b", 10) else "passed")
               for draft in ("a", "b") for k in (1, 2, 10)]
    [table] = outcome_details(records_frame(records), "speculative")
    assert table.collapsed and list(table.frame.columns) == ["draft", "k=1", "k=2", "k=10"]  # numeric order
    assert table.frame.set_index("draft").loc["b", "k=10"] == "FAIL"
    assert table.markdown().startswith("<details><summary>test_greedy: 6 checks</summary>")


def test_parameters_varied_in_pairs_stay_rows():
    records = [make(f"test_q[{q}-{k}]", params={"q_len": q, "k_len": k}) for q, k in ((1, 17), (64, 1025), (300, 97))]
    [table] = outcome_details(records_frame(records), "kv_cache")
    assert list(table.frame.columns) == ["k_len", "q_len", "test_q"] and len(table.frame) == 3


def test_a_column_per_machine_only_where_the_figures_differ():
    rows = pd.DataFrame({"machine": ["m1", "m2"], "backend": ["torch", "torch"], "exact": ["yes", "yes"],
                         "speedup": [10.8, 3.1]})
    wide = per_machine(rows, ["backend"], ["exact", "speedup"])
    assert list(wide.columns) == ["backend", "exact", "speedup (m1)", "speedup (m2)"]
    assert len(wide) == 1 and wide.loc[0, "speedup (m2)"] == 3.1
    single = per_machine(rows.iloc[:1], ["backend"], ["exact", "speedup"])
    assert list(single.columns) == ["backend", "exact", "speedup"]


def kv_cache_records(machine=MACHINE, slowdown: float = 1.0) -> list[Record]:
    records = [make("test_cached_decode_matches_recompute[torch-rope]", machine=machine,
                    metrics={"max_abs_logit_error": 2e-6}),
               make("test_cached_decode_in_low_precision_by_the_oracle[torch-bf16]", machine=machine,
                    strategy={"quant": "bf16"}, metrics={"ratio": 1.1})]
    for n in (16, 32, 64, 128):
        for mode, seconds in (("cached", 0.004 * n), ("recompute", 0.0001 * n * n * slowdown)):
            records.append(make(f"test_decode_time_cache_vs_recompute[torch-{mode}-{n}]", tier="bench", machine=machine,
                                params={"n_new": n, "mode": mode}, metrics={"median_s": seconds}))
    return records


def test_the_headline_and_the_seed_claims_are_computed_from_the_records(tmp_path):
    written = write_pages(tmp_path, kv_cache_records())
    assert tmp_path / "README.md" in written and tmp_path / "kv_cache.md" in written
    readme = (tmp_path / "README.md").read_text()
    [kv_row] = [line for line in readme.splitlines() if line.startswith("| KV cache ")]
    assert "yes: 2/2 passed" in kv_row and "error ratio 1.1x (limit 2)" in kv_row
    assert "3.2x faster than recomputing, 128 new tokens" in kv_row  # 0.0001*128^2 / (0.004*128)
    assert "[kv_cache](kv_cache.md)" in kv_row
    [quant_row] = [line for line in readme.splitlines() if line.startswith("| Quantization ")]
    assert "bf16" in quant_row and "n/a (no test_tokens_per_second records for torch" in quant_row
    # the calculator's figures, and a claim without records says which suite measures it
    [line_114] = [line for line in readme.splitlines() if line.startswith("| 114 ")]
    assert "llama-2-70b 0.328" in line_114 and "| corrected " in line_114 and "[kv_calc](kv_calc.md)" in line_114
    [growth] = [line for line in readme.splitlines() if line.startswith("| 94, 102 ")]
    assert "| holds " in growth and "N^2" in growth
    [flash] = [line for line in readme.splitlines() if "2-4x attention speed" in line]
    assert "n/a (no passed test_attention_time_and_memory records: run suites/test_flash_attention.py)" in flash
    assert "nan" not in readme.lower()


def test_two_machines_get_a_column_each_where_their_figures_differ(tmp_path):
    records = kv_cache_records() + kv_cache_records(machine={"id": "other-cpu x8"}, slowdown=2.0)
    write_pages(tmp_path, records)
    readme = (tmp_path / "README.md").read_text()
    header = next(line for line in readme.splitlines() if line.startswith("| optimization"))
    assert "what it buys (other-cpu x8)" in header and "what it buys (test-cpu x2)" in header
    assert "| exact? (passed/run) " in header  # the same on both machines: one column


def test_a_suite_the_headline_does_not_know_still_gets_its_page_and_the_readme(tmp_path):
    written = write_pages(tmp_path, [make("test_loads[torch-fp32]", suite="x", metrics={"vocab": 256.0})])
    assert {p.name for p in written} == {"x.md", "README.md"}
    assert "n/a (no passed test_speedup records: run suites/test_speculative.py)" in (tmp_path / "README.md").read_text()


def test_the_published_pages_have_no_nan_and_say_how_to_reproduce_each_table(tmp_path):
    records = load_all(REPO / "results" / "records")
    if not records:
        pytest.skip("no committed records under results/records")
    for path in write_pages(tmp_path, records):
        text = path.read_text()
        # a figure that is NaN: a cell reading nan (a failure message quoted in a cell may say "NaN" in words)
        assert not re.search(r"\|\s*-?nan\S*\s*\|", text, re.IGNORECASE), path.name
        tables = text.count("\n## ") + text.count("<details><summary>")
        assert text.count("Reproduce: `") == tables, path.name


def quantization_records() -> list[Record]:
    records = []
    for backend, quant, top1, kld, delta_ppl, bits, ratio in (
            ("torch", "fp32", 1.0, 0.0, 0.0, 32.0, 1.0),
            ("torch", "int8-weight", 0.99, 0.002, 0.05, 8.1, 0.8),
            ("onnxrt", "int4-block128", 0.9, 0.05, 2.0, 4.25, 1.2),
            ("onnxrt", "int4-gptq-block128", 0.93, 0.03, 1.0, 4.25, 1.2)):
        strategy = {"quant": quant}
        records.append(make(f"test_quality_against_fp32[{backend}-{quant}]", suite="quantization", tier="bench",
                            backend=backend, strategy=strategy,
                            params={"implementation": "x", "scored_tokens": 4096},
                            metrics={"ppl": 20 + delta_ppl, "ppl_err": 0.1, "base_ppl": 20.0, "delta_ppl": delta_ppl,
                                     "delta_ppl_err": 0.1, "mean_kld": kld, "mean_kld_err": 0.001, "kld_p99": kld * 5,
                                     "kld_max": kld * 20, "rms_delta_p": 0.01, "rms_delta_p_err": 0.001,
                                     "same_top1": top1, "same_top1_err": 0.003}))
        records.append(make(f"test_speed_against_fp32[{backend}-{quant}-decode-1]", suite="quantization",
                            tier="bench", backend=backend, strategy=strategy,
                            params={"implementation": "x", "phase": "decode", "batch": 1, "prompt_tokens": 64,
                                    "decode_tokens": 64},
                            metrics={"ratio_to_fp32": ratio, "tokens_per_s": 100 * ratio, "base_tokens_per_s": 100.0,
                                     "achieved_GBps": 5.0 * ratio * bits / 32, "machine_read_GBps": 9.5,
                                     "last_level_cache_bytes": 32.0 * 2**20, "weights_fit_in_cache": float(bits < 8)}))
        records.append(make(f"test_memory[{backend}-{quant}]", suite="quantization", tier="bench", backend=backend,
                            strategy=strategy, params={"implementation": "x"},
                            metrics={"bits_per_weight": bits, "weight_bytes": 5e7 * bits / 32,
                                     "kv_bytes_per_token": 6144.0, "peak_rss_bytes": 6e8, "load_peak_bytes": 5e7}))
    return records


def test_the_quantization_page_plots_and_judges_the_seed_claims(tmp_path):
    write_pages(tmp_path, quantization_records())
    page = (tmp_path / "quantization.md").read_text()
    assert (tmp_path / "quantization_quality_vs_size.png").stat().st_size > 0
    assert (tmp_path / "quantization_speed_vs_quality.png").stat().st_size > 0
    assert "measured read bandwidth of 9.5 GB/s" in page and "32 MiB last-level cache" in page
    int8 = next(line for line in page.splitlines() if "minimal quality loss" in line)
    assert "torch int8-weight: same top-1 99%" in int8 and "| holds " in int8
    throughput = next(line for line in page.splitlines() if "2-4x throughput" in line)
    assert "onnxrt int4-block128: decode b1 1.2x" in throughput and "| does not hold here " in throughput
    slight = next(line for line in page.splitlines() if "Slight degradation" in line)
    assert "holds only for onnxrt int4-gptq-block128" in slight  # PPL +5.0% is within 5%, +10% is not
    size_70b = next(line for line in page.splitlines() if "it needs ~35GB" in line and "stored here" in line)
    assert "int4-block128 (4.25 bits/weight stored here)" in size_70b
    assert "holds only for llama-2-70b int4-block128" in size_70b  # 36.6 GB within 5% of 35; llama-3-70b's 37.5 not
    assert "nan" not in page.lower()


def test_the_engines_page_shows_ratios_roofline_and_the_same_token_check(tmp_path):
    from harness.report import suite_tables

    def speed(backend, phase, batch, ratio, roofline=None):
        metrics = {"tokens_per_s": 100 * ratio, "baseline_tokens_per_s": 100.0, "ratio_to_torch_fp32": ratio}
        params = {"phase": phase, "batch": batch, "threads": 1, "prompt_tokens": 64, "decode_tokens": 128}
        if roofline is not None:
            metrics.update(roofline_fraction=roofline, machine_read_GBps=12.5)
            params["weights_fit_in_llc"] = False
        return make(f"test_engine_tokens_per_second[{backend}-{phase}-b{batch}]", suite="engines", tier="bench",
                    backend=backend, params=params, metrics=metrics)

    records = [speed("torch", "decode", 1, 1.0, 0.31), speed("transformers", "decode", 1, 0.8, 0.25),
               speed("transformers", "prefill", 1, 0.9),
               make("test_same_tokens[transformers]", suite="engines", tier="bench", backend="transformers",
                    metrics={"first_mismatch": -1})]
    text = "\n".join(t.markdown() for t in suite_tables("engines", records_frame(records), tmp_path))
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| transformers")}
    assert rows["transformers"] == ["fp32", "1", "25%"]  # the last table with such a row: the roofline
    assert "| transformers | fp32       |         1 |         0.9x |        0.8x |" in text
    assert "31%" in text and "12.5 GB/s" in text and "do not fit in the last-level cache" in text
    assert "Same tokens as torch fp32" in text and "nan" not in text.lower()
    assert (tmp_path / "engines_default-target.png").is_file()


def fault_record(fault: str, area: str, outcome: str = "passed", caught: bool = True, escapes: str = "") -> Record:
    """A record as tests/test_fault_coverage.py writes it."""
    return Record(suite="fault_coverage", tier="faults",
                  test=f"tests/test_fault_coverage.py::test_the_suite_meant_for_the_fault_catches_it[{fault}]",
                  backend=None, model="default-target", strategy={}, outcome=outcome, machine=MACHINE,
                  params={"fault": fault, "area": area, "what": f"the {fault} bug", "suite_meant": f"suites/{area}.py",
                          "selection": "x", "message": "*", "escapes": escapes,
                          "caught_by": "test_x" if caught else "", "matched": "FAILED x - boom" if caught else ""},
                  metrics={"run_s": 1.5, "failed": float(caught), "passed": 0.0, "caught": float(caught)})


def test_the_fault_coverage_page_shows_the_share_caught_and_each_escape(tmp_path):
    records = [fault_record("a", "kv-cache"), fault_record("b", "kv-cache"), fault_record("c", "batching"),
               fault_record("d", "batching", "xfailed", caught=False, escapes="needs a longer context")]
    write_pages(tmp_path, records)
    page = (tmp_path / "fault_coverage.md").read_text()
    assert "Caught by the suite meant for them: 3 of 4 planted faults (75%; goal 95%)" in page
    assert "| d " in page and "escapes" in page and "d escapes: needs a longer context" in page
    assert re.search(r"\| batching +\| +2 \| +1 \| +1 \| suites/batching.py +\| +50% \|", page), page
    assert page.count("Reproduce: `python -m harness faults`") == page.count("\n## ")
    assert "nan" not in page.lower()


def test_the_mutation_score_is_killed_over_mutants_with_tests_and_lists_the_survivors(tmp_path):
    pytest.importorskip("mutmut", reason="mutmut (the faults extra) is not installed")
    from harness.mutation import mutation_records

    codes = {"harness/oracles.py": {"harness.oracles.x_f__mutmut_1": 1, "harness.oracles.x_f__mutmut_2": 0,
                                    "harness.oracles.x_g__mutmut_1": 33, "harness.oracles.x_g__mutmut_2": 1},
             "backends/algorithms/generation.py": {"backends.algorithms.generation.x_h__mutmut_1": 36}}
    chosen = {module: sorted(names) for module, names in codes.items()}
    records = mutation_records(codes, chosen, {"harness/oracles.py": 9, "backends/algorithms/generation.py": 5},
                               60.0, 20, 13)
    oracles = next(r for r in records if r.params["module"] == "harness/oracles.py")
    assert (oracles.metrics["killed"], oracles.metrics["survived"], oracles.metrics["no_tests"]) == (2, 1, 1)
    assert oracles.params["survived"] == "harness.oracles.x_f__mutmut_2"
    write_pages(tmp_path, [fault_record("a", "kv-cache")] + records)
    page = (tmp_path / "fault_coverage.md").read_text()
    # the timeout counts as survived; the mutant no test runs is left out: 2 killed of 4 tested
    assert "Mutation score: 2 killed of 4 mutants tested (50%)" in page
    assert "harness.oracles.x_f__mutmut_2" in page and "backends.algorithms.generation.x_h__mutmut_1" in page
