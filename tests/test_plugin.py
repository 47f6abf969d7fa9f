"""The plugin seen from outside, through pytester: options, usage errors, parametrization, skips, records."""
import json

import pytest

from harness.__main__ import main as harness_main
from harness.models import DEFAULT_MODEL

SUITE = """
import pytest
import torch
from backends.strategies import Quant, Strategy
from harness.models import small_checkpoint


@pytest.mark.exactness
def test_loads(load_runner, quant, record):
    runner = load_runner(small_checkpoint("rope", "gqa"), Strategy(quant))
    logits = runner.forward_full(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]))
    record(vocab=logits.shape[-1])
    assert logits.shape == (1, 3, 256)


@pytest.mark.bench
def test_timed(benchmark, backend):
    assert benchmark(sum, range(100)) == 4950
"""


def test_help_lists_the_options_in_their_own_group_with_defaults(pytester):
    result = pytester.runpytest_inprocess("--help")
    result.stdout.fnmatch_lines(["exactbench: exactness and performance of LLM inference backends:"])
    text = result.stdout.str()
    for option, default in [("--backend", "default: torch"), ("--model", f"default: {DEFAULT_MODEL}"),
                            ("--quant", "default: every one"), ("--attention", "default: every one"),
                            ("--results-dir", "default: results")]:
        assert option in text
        assert default in " ".join(text.split()), f"{option} help does not state {default!r}"


@pytest.mark.parametrize("args, message", [
    (["--backend", "nope"], "ERROR: unknown backend 'nope'; available: *torch*"),
    (["--quant", "int3"], "ERROR: unknown quantization strategy 'int3'; accepted: fp32, bf16, *"),
    (["--attention", "fast"], "ERROR: unknown attention strategy 'fast'; accepted: naive, *"),
    (["--model", "no-such-model"], "ERROR: unknown model 'no-such-model': not a built-in (*) nor an existing directory"),
])
def test_bad_option_values_are_one_line_usage_errors(pytester, args, message):
    pytester.makepyfile(test_x=SUITE)
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_malformed_model_directory_is_a_usage_error(pytester):
    model = pytester.mkdir("broken-model")
    (model / "config.json").write_text("{not json")
    pytester.makepyfile(test_x=SUITE)
    result = pytester.runpytest_subprocess("--model", str(model))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: */config.json: not valid JSON*"])


def test_backend_and_strategies_are_parametrized_with_readable_ids(pytester):
    pytester.makepyfile(test_x=SUITE)
    result = pytester.runpytest_inprocess("--collect-only", "-q", "-m", "exactness")
    result.stdout.fnmatch_lines(["test_x.py::test_loads[[]torch-fp32[]]", "test_x.py::test_loads[[]torch-bf16[]]",
                                 "test_x.py::test_loads[[]torch-fp16[]]"])


def test_missing_capability_skips_naming_backend_and_capability(pytester):
    pytester.makepyfile(test_x=SUITE)
    result = pytester.runpytest_inprocess("-m", "exactness", "--quant", "int8-dynamic", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*backend torch lacks capability quant:int8-dynamic*"])


def test_markers_are_strict_and_select_tiers(pytester):
    pytester.makepyfile(test_x=SUITE + "\n@pytest.mark.exactnes\ndef test_typo():\n    pass\n")
    result = pytester.runpytest_inprocess("--strict-markers")
    result.stdout.fnmatch_lines(["*'exactnes' not found in `markers` configuration option*"])


def test_records_are_written_and_merged_then_tabulated(pytester, capsys):
    pytester.makepyfile(test_x=SUITE)
    pytester.runpytest_inprocess("--quant", "fp32", "--quant", "int8-dynamic").assert_outcomes(passed=2, skipped=1)
    path = pytester.path / "results" / "records" / "x.json"
    records = json.loads(path.read_text())
    by_test = {r["test"]: r for r in records}
    loads = by_test["test_x.py::test_loads[torch-fp32]"]
    assert loads["backend"] == "torch" and loads["model"] == "small-rope-gqa" and loads["tier"] == "exactness"
    assert loads["strategy"] == {"quant": "fp32"} and loads["outcome"] == "passed"
    assert loads["metrics"] == {"vocab": 256.0}
    assert loads["machine"]["cores"] and "torch" in loads["machine"]
    skipped = by_test["test_x.py::test_loads[torch-int8-dynamic]"]
    assert skipped["outcome"] == "skipped" and "quant:int8-dynamic" in skipped["reason"]
    timed = by_test["test_x.py::test_timed[torch]"]
    assert timed["tier"] == "bench" and timed["metrics"]["median_s"] > 0 and timed["metrics"]["rounds"] >= 1

    # a second run re-measures one test: merged, not appended, and nothing else lost
    pytester.runpytest_inprocess("--quant", "fp32", "-m", "exactness").assert_outcomes(passed=1)
    assert len(json.loads(path.read_text())) == 3

    assert harness_main(["report", "--results-dir", str(pytester.path / "results")]) == 0
    table = (pytester.path / "results" / "x.md").read_text()
    assert "## Exactness outcomes" in table and "n/a" in table and "pass" in table


def test_report_on_a_corrupt_records_file_is_a_one_line_error(tmp_path, capsys):
    records = tmp_path / "records"
    records.mkdir()
    (records / "kv_cache.json").write_text('[{"suite": "kv_cache"')
    assert harness_main(["report", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "kv_cache.json: corrupt records file" in err and "\n" not in err
    assert not list(tmp_path.glob("*.md"))
