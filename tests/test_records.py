"""The records store under the ways it was seen to lose data: concurrent runs, killed runs, environment errors,
corrupt lines, non-finite figures, file modes."""
import json
import math
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from harness.__main__ import main as harness_main
from harness.records import Record, RunWriter, dumps, latest, load_all, load_records, write_atomic

SUITE = """
import os, signal
import pytest

@pytest.mark.exactness
@pytest.mark.parametrize("n", range({count}))
def test_n(n, record):
    record(n=n)
    if n == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def record(test: str, outcome: str = "passed", time: str = "2026-01-01T00:00:00", **metrics: float) -> Record:
    return Record(suite="x", tier="exactness", test=test, backend="torch", model="m", strategy={}, params={},
                  outcome=outcome, metrics=metrics, machine={"id": "box"}, time=time)


def test_concurrent_runs_each_keep_every_record(pytester):
    pytester.makepyfile(test_x=SUITE.format(count=3, kill_at=-1))
    results = pytester.path / "shared"
    runs = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "--results-dir", str(results),
                              "-k", f"test_n[{i % 3}]"], cwd=pytester.path, stdout=subprocess.DEVNULL)
            for i in range(4)]
    assert [run.wait(timeout=300) for run in runs] == [0, 0, 0, 0]
    files = list((results / "records").glob("*.jsonl"))
    assert len(files) == 4, "each run has a file of its own"
    assert sum(len(f.read_text().splitlines()) - 1 for f in files) == 4, "no record lost"


def test_a_killed_run_keeps_the_tests_that_completed(pytester):
    pytester.makepyfile(test_x=SUITE.format(count=5, kill_at=2))
    results = pytester.path / "killed"
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--results-dir", str(results))
    assert result.ret != 0
    assert sorted(r.metrics["n"] for r in load_all(results / "records")) == [0.0, 1.0]


def test_an_environment_error_is_recorded_as_error_and_never_hides_an_earlier_outcome(pytester, monkeypatch):
    pytester.makepyfile(test_x="""
import os, pytest

@pytest.mark.exactness
def test_export(record):
    if os.environ.get("BROKEN"):
        raise PermissionError(13, "Permission denied", "/cache/export.onnx")
""")
    results = pytester.path / "r"
    pytester.runpytest_inprocess("--results-dir", str(results)).assert_outcomes(passed=1)
    first_files = set((results / "records").glob("*.jsonl"))
    monkeypatch.setenv("BROKEN", "1")
    pytester.runpytest_inprocess("--results-dir", str(results)).assert_outcomes(failed=1)
    # the second run's file by difference: two runs in one second and one process differ only by a random nonce
    [second_file] = set((results / "records").glob("*.jsonl")) - first_files
    second = json.loads(second_file.read_text().splitlines()[1])
    assert second["outcome"] == "error" and "Permission denied" in second["reason"]
    [kept] = load_all(results / "records")
    assert kept.outcome == "passed"


def test_latest_record_wins_per_test_model_and_machine():
    old, new = record("t", "failed", "2026-01-01T00:00:00"), record("t", "passed", "2026-01-02T00:00:00")
    other_machine = record("t", "failed", "2026-01-01T00:00:00")
    other_machine.machine = {"id": "other"}
    assert sorted((r.outcome, r.machine["id"]) for r in latest([new, old, other_machine])) == \
        [("failed", "other"), ("passed", "box")]


@pytest.mark.parametrize("bad_line, why", [
    (b'{"suite": "x", "tier": "exactness", "test": "t2", "backend": null, "model": null, "strategy": {}, '
     b'"params": {}, "outcome": "passed", "machine": null}', "field 'machine' is NoneType"),
    (b'{"suite": "x", "tier": "exactness", "test": "t2", "backend": null, "model": null, "strategy": {}, '
     b'"params": {}, "outcome": "passed", "metrics": [1, 2]}', "field 'metrics' is list"),
    (b'{"suite": "x", "tier": "exactness", "test": "t2", "backend": null, "model": null, "strategy": {}, '
     b'"params": {}, "outcome": "passed", "metrics": {"e": "big"}}', "not a number"),
    (b'{"suite": "x", "test": "t2"}', "missing fields"),
    (b'\xff\xfe garbage', "not UTF-8"),
    (b'{"suite": "x"', "not JSON"),
])
def test_a_bad_line_is_named_by_file_and_line_and_only_it_is_skipped(tmp_path, bad_line, why, capsys):
    records = tmp_path / "results" / "records"
    records.mkdir(parents=True)
    good = [dumps(asdict(record("t1"))).encode(), bad_line, dumps(asdict(record("t3"))).encode()]
    (records / "run.jsonl").write_bytes(b'{"run": {}}\n' + b"\n".join(good) + b"\n")
    problems = []
    assert sorted(r.test for r in load_records([records], problems.append)) == ["t1", "t3"]
    assert len(problems) == 1 and problems[0].startswith(f"{records / 'run.jsonl'}:3: ") and why in problems[0]
    # the report still tabulates the good records, naming the bad line on stderr
    assert harness_main(["report", "--results-dir", str(tmp_path / "results")]) == 0
    assert "run.jsonl:3" in capsys.readouterr().err


def test_non_finite_figures_are_strict_json_and_read_back(tmp_path):
    writer = RunWriter(tmp_path, "run", {"machine": {}})
    # a parameter too: a request rate of inf (all at once)
    writer.append(replace(record("t", ratio=math.inf, error=math.nan, low=-math.inf), params={"rate": math.inf}))
    writer.close()

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    for line in writer.path.read_text().splitlines():
        json.loads(line, parse_constant=refuse)
    [back] = load_all(tmp_path)
    assert back.metrics["ratio"] == math.inf and math.isnan(back.metrics["error"]) and back.metrics["low"] == -math.inf
    assert back.params == {"rate": math.inf}


def test_published_files_are_readable_by_everyone(tmp_path):
    path = tmp_path / "table.md"
    write_atomic(path, "x\n")
    assert path.stat().st_mode & 0o044 == 0o044


def test_a_run_file_is_never_reopened_for_writing(tmp_path):
    first = RunWriter(tmp_path, "run", {})
    first.append(record("t"))
    first.close()
    with pytest.raises(FileExistsError):
        RunWriter(tmp_path, "run", {}).append(record("t"))
    assert len(Path(tmp_path / "run.jsonl").read_text().splitlines()) == 2


def test_two_machines_runs_merge_into_one_report_with_a_column_each(tmp_path):
    from .test_report import kv_cache_records

    records_dir = tmp_path / "results" / "records"
    records_dir.mkdir(parents=True)
    for name, machine, slowdown in (("shard-a", {"id": "box-a x2"}, 1.0), ("shard-b", {"id": "box-b x8"}, 2.0)):
        writer = RunWriter(records_dir, name, {"machine": machine})
        for each in kv_cache_records(machine=machine, slowdown=slowdown):
            writer.append(each)
        writer.close()
    assert harness_main(["report", "--results-dir", str(tmp_path / "results")]) == 0
    readme = (tmp_path / "results" / "README.md").read_text()
    assert "what it buys (box-a x2)" in readme and "what it buys (box-b x8)" in readme

