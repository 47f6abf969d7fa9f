"""The plugin seen from outside, through pytester: options, usage errors, parametrization, skips, records."""
import json
import os

import pytest

from backends.torch_ref.backend import TorchBackend
from harness.__main__ import main as harness_main
from harness.models import DEFAULT_MODEL
from harness.records import load_all

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
                            ("--results-dir", "default: .exactbench/results")]:
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
    collected = {line.strip() for line in result.stdout.lines}
    # a set: the order is pytest-randomly's when it is installed
    assert {"test_x.py::test_loads[torch-fp32]", "test_x.py::test_loads[torch-bf16]",
            "test_x.py::test_loads[torch-fp16]"} <= collected


class Fp32OnlyTorch(TorchBackend):
    """The reference backend declaring no quantization but fp32 (the reference itself offers every one)."""

    name = "torch-fp32-only"

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        return frozenset(c for c in TorchBackend.capabilities() if not c.startswith("quant:") or c == "quant:fp32")


def test_missing_capability_skips_naming_backend_and_capability(pytester, register_backend):
    register_backend(Fp32OnlyTorch)
    pytester.makepyfile(test_x=SUITE)
    result = pytester.runpytest_inprocess("-m", "exactness", "--backend", Fp32OnlyTorch.name, "--quant",
                                          "int8-dynamic", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*backend torch-fp32-only lacks capability quant:int8-dynamic*"])


def test_markers_are_strict_and_select_tiers(pytester):
    pytester.makepyfile(test_x=SUITE + "\n@pytest.mark.exactnes\ndef test_typo():\n    pass\n")
    result = pytester.runpytest_inprocess("--strict-markers")
    result.stdout.fnmatch_lines(["*'exactnes' not found in `markers` configuration option*"])


def test_records_are_written_per_run_then_tabulated(pytester):
    pytester.makepyfile(test_x=SUITE)
    results = pytester.path / "published"
    # int4-block128 cannot express the small model (d_model 64): a skip with its reason
    pytester.runpytest_inprocess("--quant", "fp32", "--quant", "int4-block128", "--results-dir", str(results)
                                 ).assert_outcomes(passed=2, skipped=1)
    [first_run] = (results / "records").glob("*.jsonl")
    header, *lines = [json.loads(line) for line in first_run.read_text().splitlines()]
    assert header["run"]["machine"]["cores"] and header["run"]["versions"]["torch"]
    assert header["run"]["options"]["backends"] == ["torch"]
    by_test = {r["test"]: r for r in lines}
    loads = by_test["test_x.py::test_loads[torch-fp32]"]
    assert loads["backend"] == "torch" and loads["model"] == "small-rope-gqa" and loads["tier"] == "exactness"
    assert loads["strategy"] == {"quant": "fp32"} and loads["outcome"] == "passed"
    assert loads["metrics"] == {"vocab": 256.0}
    assert loads["machine"]["cores"] and "torch" in loads["machine"]
    skipped = by_test["test_x.py::test_loads[torch-int4-block128]"]
    assert skipped["outcome"] == "skipped" and "group size 128 does not divide" in skipped["reason"]
    timed = by_test["test_x.py::test_timed[torch]"]
    assert timed["tier"] == "bench" and timed["metrics"]["median_s"] > 0 and timed["metrics"]["rounds"] >= 1
    assert len(timed["samples"]["time_s"]) == timed["metrics"]["rounds"]
    assert first_run.stat().st_mode & 0o044 == 0o044, "run files are readable by everyone"

    # a second run writes a file of its own; readers take the latest record per test and lose nothing
    pytester.runpytest_inprocess("--quant", "fp32", "-m", "exactness", "--results-dir", str(results)
                                 ).assert_outcomes(passed=1)
    assert len(list((results / "records").glob("*.jsonl"))) == 2
    assert first_run.read_text().count("\n") == 4, "an earlier run's file is never rewritten"
    assert len(load_all(results / "records")) == 3

    assert harness_main(["report", "--results-dir", str(results)]) == 0
    table = (results / "x.md").read_text()
    assert "pass" in table and "n/a" in table


def test_plain_pytest_never_writes_into_results(pytester, monkeypatch):
    monkeypatch.delenv("EXACTBENCH_RESULTS_DIR")  # the default scratch directory, under the rootdir
    pytester.makepyfile(test_x=SUITE)
    (pytester.path / "results").mkdir()
    pytester.runpytest_inprocess("--quant", "fp32", "-m", "exactness").assert_outcomes(passed=1)
    assert not any((pytester.path / "results").iterdir())
    assert len(list((pytester.path / ".exactbench" / "results" / "records").glob("*.jsonl"))) == 1


@pytest.mark.parametrize("args, message", [
    (["--results-dir", ""], "ERROR: --results-dir is empty: name a directory"),
    (["--model", ""], "ERROR: --model is empty: *"),
    (["--results-dir", "a-file"], "ERROR: --results-dir a-file: cannot write records there (*)"),
    (["--results-dir", "a-file/below"], "ERROR: --results-dir a-file/below: cannot write records there (*)"),
    (["--results-dir", "read-only"], "ERROR: --results-dir read-only: cannot write records there (*)"),
    (["--shard", "3/2"], "ERROR: bad --shard '3/2': expected I/N with 1 <= I <= N, e.g. 1/4"),
])
def test_bad_results_dir_model_or_shard_is_a_usage_error_before_the_run(pytester, args, message):
    pytester.makepyfile(test_x=SUITE)
    pytester.makefile("", **{"a-file": "x"})
    read_only = pytester.mkdir("read-only")
    read_only.chmod(0o555)
    if "read-only" in args and os.access(read_only, os.W_OK):
        pytest.skip("this user (root) can write into read-only directories")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_shards_split_the_tests_and_their_runs_merge(pytester):
    pytester.makepyfile(test_x=SUITE)
    results = pytester.path / "merged"
    quants = ["--quant", "fp32", "--quant", "bf16", "--quant", "fp16"]
    outcomes = [pytester.runpytest_inprocess("-m", "exactness", "--shard", f"{i}/2", "--results-dir", str(results), *quants)
                .parseoutcomes() for i in (1, 2)]
    assert sum(o.get("passed", 0) for o in outcomes) == 3 and all(o.get("deselected") for o in outcomes)
    assert len(load_all(results / "records")) == 3


def test_each_xdist_worker_keeps_every_record(pytester):
    pytester.makepyfile(test_x=SUITE)
    results = pytester.path / "parallel"
    result = pytester.runpytest_subprocess("-n", "2", "--results-dir", str(results), "-rs",
                                           "--quant", "fp32", "--quant", "bf16", "--quant", "fp16")
    result.assert_outcomes(passed=3, skipped=1)
    result.stdout.fnmatch_lines(["*bench tests do not run under pytest-xdist*"])
    records = load_all(results / "records")
    assert sorted(r.test for r in records) == [f"test_x.py::test_loads[torch-{q}]" for q in ("bf16", "fp16", "fp32")]
    assert len(list((results / "records").glob("*.jsonl"))) == 2, "one file per worker"


def test_main_job_with_a_bad_pytest_option_regenerates_no_table(tmp_path, capsys):
    assert harness_main(["run", "--results-dir", str(tmp_path), "--bogus"]) == pytest.ExitCode.USAGE_ERROR
    assert "tables not regenerated" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.md"))
