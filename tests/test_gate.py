"""The regression gate: a planted slowdown and a planted exactness fault fail it, rerunning the same code passes
it, bad baselines and configs are one-line errors."""
import json
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from backends import registry
from backends.torch_ref.backend import TorchRunner
from harness.__main__ import main as harness_main
from harness.gate import DEFAULT_RULES, GateConfig, Rule, compare, rule_for
from harness.records import Record, dumps, load_all

from .faults.kv_cache import RopeOffByOneRunner, planted

SUITES = Path(__file__).resolve().parents[1] / "suites"
SLEEP_PER_DECODE_STEP_S = 0.004


class SlowDecodeRunner(TorchRunner):
    """Correct, but every single-token step sleeps: a decode slowdown."""

    def forward(self, cache, tokens, positions, token_mask=None):
        if tokens.shape[1] == 1:
            time.sleep(SLEEP_PER_DECODE_STEP_S)
        return super().forward(cache, tokens, positions, token_mask)


def run_as_engine(pytester, runner_cls, results: Path, *args: str):
    """Run a suite selection with `runner_cls` registered as backend `engine` (the same test ids every run)."""
    registry.register(planted("engine", runner_cls))
    try:
        return pytester.runpytest_inprocess("--backend", "engine", "--model", "tiny-random", "--quant", "fp32",
                                            "--results-dir", str(results), "-p", "no:randomly", "-q", *args)
    finally:
        registry.unregister("engine")


def speed_run(pytester, runner_cls, results: Path):
    run_as_engine(pytester, runner_cls, results, str(SUITES / "test_backend_speed.py"), "-m", "bench",
                  "-k", "decode and 1]").assert_outcomes(passed=1)
    return results / "records"


CACHE_CHECK = """
import pytest
from backends.algorithms.generation import generate
from backends.strategies import Strategy
from harness.oracles import max_abs_error


@pytest.mark.exactness
def test_cached_decode_matches_recompute(load_runner, checkpoint, quant):
    runner = load_runner(checkpoint, Strategy(quant))
    cached, recomputed = generate(runner, [[5, 6, 7]], 8), generate(runner, [[5, 6, 7]], 8, use_cache=False)
    assert max_abs_error(cached.logits, recomputed.logits) < 1e-4
"""


def kv_run(pytester, runner_cls, results: Path, expect: dict):
    pytester.makepyfile(test_cache_check=CACHE_CHECK)
    run_as_engine(pytester, runner_cls, results, "-m", "exactness", "test_cache_check.py").assert_outcomes(**expect)
    return results / "records"


def gate(*args) -> int:
    return harness_main(["gate", *map(str, args)])


def test_a_planted_decode_slowdown_fails_the_gate_and_a_rerun_passes_it(pytester, capsys, tmp_path):
    baseline = speed_run(pytester, TorchRunner, tmp_path / "baseline")
    rerun = speed_run(pytester, TorchRunner, tmp_path / "rerun")
    slowed = speed_run(pytester, SlowDecodeRunner, tmp_path / "slowed")
    capsys.readouterr()

    assert gate(rerun, "--baseline", baseline) == 0, capsys.readouterr().out
    junit = tmp_path / "gate.xml"
    assert gate(slowed, "--baseline", baseline, "--junit", junit) == 1
    out = capsys.readouterr().out
    assert "## exactbench gate: FAIL" in out and "| regression |" in out and "ratio_to_torch_fp32" in out
    assert 'failures="1"' in junit.read_text()


def test_a_planted_exactness_fault_fails_the_gate(pytester, capsys, tmp_path, monkeypatch):
    baseline = kv_run(pytester, TorchRunner, tmp_path / "baseline", {"passed": 1})
    broken = kv_run(pytester, RopeOffByOneRunner, tmp_path / "broken", {"failed": 1})
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    capsys.readouterr()
    assert gate(broken, "--baseline", baseline) == 1
    assert "| regression |" in summary.read_text() and "| outcome | passed | failed |" in summary.read_text()


def record(test: str, outcome: str = "passed", samples=None, **metrics) -> Record:
    return Record(suite="x", tier="bench", test=test, backend="torch", model="m", strategy={}, params={},
                  outcome=outcome, metrics=metrics, machine={"id": "box"}, time="2026-01-01T00:00:00",
                  samples=samples or {})


def test_a_test_missing_from_the_run_is_reported_and_an_unknown_metric_is_named():
    baseline = [record("a"), record("b", mystery=1.0)]
    run = [record("b", mystery=2.0)]
    statuses = {(f.test, f.what): f.status for f in compare(run, baseline, GateConfig())}
    assert statuses[("a", "outcome")] == "missing" and statuses[("b", "mystery")] == "ungated"


@pytest.mark.parametrize("samples_new, verdict", [
    ([0.80, 0.81, 0.79, 0.80, 0.82], "regression"),  # 20% slower, every repeat below the baseline's
    ([0.80, 1.30, 0.70, 1.20, 0.75], "unchanged"),  # median 20% lower, but inside the noise
])
def test_speed_is_gated_only_outside_the_noise(samples_new, verdict):
    old = record("t", samples={"speedup": [1.0, 1.01, 0.99, 1.0, 1.02]}, speedup=1.0)
    new = record("t", samples={"speedup": samples_new}, speedup=0.8)
    [_, finding] = compare([new], [old], GateConfig())
    assert finding.what == "speedup" and finding.status == verdict


def test_quality_is_hard_within_its_tolerance_in_its_direction():
    config = GateConfig()
    assert DEFAULT_RULES["ppl"].better == "lower"
    worse = compare([record("q", ppl=20.5)], [record("q", ppl=20.0)], config)[1]
    better = compare([record("q", ppl=19.0)], [record("q", ppl=20.0)], config)[1]
    same = compare([record("q", ppl=20.1)], [record("q", ppl=20.0)], config)[1]
    assert (worse.status, better.status, same.status) == ("regression", "improvement", "unchanged")


def test_the_config_overrides_a_rule(tmp_path):
    config = tmp_path / "gate.toml"
    config.write_text('[tool.exactbench.gate]\nalpha = 0.05\n[tool.exactbench.gate.metrics.ppl]\n'
                      'kind = "quality"\nbetter = "lower"\ntolerance = 0.5\n')
    loaded = GateConfig.load(config)
    assert loaded.alpha == 0.05 and loaded.rules["ppl"] == Rule("quality", "lower", 0.5)


@pytest.mark.parametrize("content, message", [
    ("not a run\n", "holds no readable records"),
    (None, "no such run file or directory"),
])
def test_a_corrupt_or_absent_baseline_is_a_one_line_error(tmp_path, capsys, content, message):
    run = tmp_path / "run.jsonl"
    run.write_text(dumps({"run": {}}) + "\n" + dumps(asdict(record("a"))) + "\n")
    baseline = tmp_path / "baseline.jsonl"
    if content is not None:
        baseline.write_text(content)
    assert gate(run, "--baseline", baseline) == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and message in err_lines[0]


@pytest.mark.parametrize("content", ['[tool.exactbench.gate]\nalpha = 2\n',
                                     '[tool.exactbench.gate.metrics.ppl]\nkind = "fast"\n', "not = [toml"])
def test_a_bad_config_is_a_one_line_error(tmp_path, capsys, content):
    config = tmp_path / "gate.toml"
    config.write_text(content)
    run = tmp_path / "run.jsonl"
    run.write_text(dumps(asdict(record("a"))) + "\n")
    assert gate(run, "--baseline", run, "--config", config) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: gate config") and "\n" not in err


def test_update_baseline_makes_the_run_the_baseline(tmp_path, capsys):
    run = tmp_path / "run.jsonl"
    run.write_text(dumps({"run": {}}) + "\n" + dumps(asdict(record("a", "failed"))) + "\n")
    baseline = tmp_path / "baseline.jsonl"
    baseline.write_text(dumps(asdict(record("a"))) + "\n")
    assert gate(run, "--baseline", baseline) == 1
    assert gate(run, "--baseline", baseline, "--update-baseline") == 0
    assert gate(run, "--baseline", baseline) == 0
    assert [r.outcome for r in load_all(tmp_path) if r.test == "a"] == ["failed"]
    json.loads(baseline.read_text().splitlines()[0])["run"]


def test_every_metric_the_published_records_hold_has_a_gate_rule():
    published = load_all(Path(__file__).resolve().parents[1] / "results" / "records")
    names = {name for record in published for name in record.metrics}
    assert names, "no published records"
    assert sorted(name for name in names if rule_for(name, DEFAULT_RULES) is None) == []
